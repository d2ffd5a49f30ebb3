"""``python -m benchmarks.report``: docs/benchmarks.md, generated from the benchmarks' JSON results.

    python -m benchmarks.report            # rewrite docs/benchmarks.md from benchmarks/results/*.json
    python -m benchmarks.report --check    # exit 1 if docs/benchmarks.md is not what the files give

Every benchmark writes ``benchmarks/results/<benchmark>[-<anything>].json``. This module reads them all and
writes one section per benchmark, as the benchmark's module describes it (``REPORT = common.Benchmark(...)``: title,
what it measures, how to render one result; found by importing every module of this package), one subsection per
file: its table, the machine it ran on, the date, the command, and where a file
was transcribed from an earlier page rather than written by a run, its ``source``. A file may also carry
``notes`` (findings that belong to that measurement) and, for figures no benchmark script writes, a generic
``table`` (``columns`` and ``rows``) with the ``section`` it belongs to.

The page is data -> Markdown through one Jinja2 template (autoescaped); nothing in it is written by hand, so
``tests/test_docs.py`` regenerates it in memory and compares.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import Environment
from markupsafe import Markup

from benchmarks.common import Benchmark, Rendered, machine_text
from benchmarks.common import table as section_table

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
OUTPUT_PATH = REPO_ROOT / "docs" / "benchmarks.md"
GENERATOR = "python -m benchmarks.report"


@dataclass
class Result:
    """One JSON file of ``benchmarks/results``."""

    name: str  # file name
    data: dict[str, Any]
    section: str  # key of SECTIONS


# -- formatting ------------------------------------------------------------------------------------------------


_ABSOLUTE_PATH = re.compile(r"^(?P<scheme>[a-z+]+:///)?/(?:[^/\s]+/)*(?P<last>[^/\s]*)$")


def portable(command: str) -> str:
    """``command`` with absolute paths cut to their last part ('…/mlflow.db'): they name another machine's disk."""
    def shorten(token: str) -> str:
        match = _ABSOLUTE_PATH.match(token)
        if not match:
            return token
        return f"{match['scheme'] or ''}…/{match['last']}"

    return " ".join(shorten(token) for token in command.split(" "))


def date_text(data: dict) -> str:
    for key in ("date", "time", "measured_at", "timestamp"):
        if data.get(key):
            return str(data[key])[:10]
    return ""


def render_table(data: dict, out: Rendered) -> None:
    """A generic ``{"columns", "rows"}`` table: figures that no benchmark script writes (transcribed)."""
    out.tables.append(section_table(data["table"]["columns"], data["table"]["rows"]))


# -- sections ------------------------------------------------------------------------------------------------


# -- sections: one per benchmark module's REPORT, then figures no benchmark writes ---------------------------------

OTHER = Benchmark("other", "Other measurements", "Figures that no benchmark script writes.", render_table, order=1000)


def discover() -> dict[str, Benchmark]:
    """Every benchmark's description (a module of this package with a ``REPORT``), in page order, then ``other``."""
    found = []
    for module in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if module.name in ("report", "common"):
            continue
        description = getattr(importlib.import_module(f"benchmarks.{module.name}"), "REPORT", None)
        if isinstance(description, Benchmark):
            found.append(description)
    return {b.key: b for b in sorted([*found, OTHER], key=lambda b: (b.order, b.key))}


SECTIONS = discover()
PREFIXES = sorted((key for key in SECTIONS if key != "other"), key=len, reverse=True)


def section_of(name: str, data: dict) -> str:
    """Which section a result file belongs to: a generic table says so; else the benchmark's name or file name."""
    if "table" in data:
        section = data.get("section", "other")
        if section not in SECTIONS:
            raise ValueError(f"{name}: section {section!r} is not one of {', '.join(SECTIONS)}.")
        return section
    if data.get("benchmark") in SECTIONS:
        return data["benchmark"]
    stem = name[:-len(".json")]
    for key in PREFIXES:
        if stem == key or stem.startswith(key + "-"):
            return key
    raise ValueError(f"{name}: not a result of a known benchmark. Name it <benchmark>[-<anything>].json with "
                     f"<benchmark> one of {', '.join(PREFIXES)}, or give it a generic \"table\".")


def load_results(directory: Path = RESULTS_DIR) -> list[Result]:
    """Every ``*.json`` directly in ``directory`` (the benchmarks' stores and cells live in sub-folders)."""
    results = []
    for path in sorted(Path(directory).glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path.name} is not valid JSON ({error}); rerun its benchmark or fix the file.") from None
        if not isinstance(data, dict):
            # A bad file, reported like any other (main prints ValueErrors as one line).
            raise ValueError(f"{path.name}: expected a JSON object, found {type(data).__name__}.")  # noqa: TRY004
        results.append(Result(path.name, data, section_of(path.name, data)))
    return results


def render_result(result: Result) -> Rendered:
    section = SECTIONS[result.section]
    data = result.data
    commands = data.get("commands") if isinstance(data.get("commands"), dict) else {}
    command, command_note = data.get("command") or commands.get("benchmark"), ""
    if not command and section.reconstruct is not None:
        command, command_note = section.reconstruct(data), "rebuilt from the file's settings"
    rendered = Rendered(
        heading=data.get("title") or f"`{result.name}`", file=result.name,
        date=date_text(data) or "not recorded in the file",
        machine=machine_text(data.get("machine")),
        command=portable(command) if command else "", command_note=command_note, source=data.get("source"),
        notes=list(data.get("notes", [])),
    )
    (render_table if "table" in data else section.render)(data, rendered)
    return rendered


def _sort_key(result: Result) -> tuple:
    # A benchmark's own results before generic tables (earlier or hand-made figures); newest first, undated last.
    def descending(text: str) -> str:
        return "".join(chr(0x10FFFF - ord(c)) for c in text)

    date = date_text(result.data)
    return ("table" in result.data, date == "", descending(date), descending(result.name))


TEMPLATE = """\
{%- macro table(t) -%}
| {% for column in t.columns %}{{ column | cell }} |{% if not loop.last %} {% endif %}{% endfor %}
|{% for column in t.columns %}---|{% endfor %}
{% for row in t.rows %}| {% for value in row %}{{ value | cell }} |{% if not loop.last %} {% endif %}{% endfor %}
{% endfor %}
{%- endmacro -%}
# Benchmarks

<!-- Generated by `{{ generator }}` from benchmarks/results/*.json. Do not edit by hand. -->

*This page is generated by `{{ generator }}` from the JSON files in `benchmarks/results/`; do not edit it by hand.
Rerun a benchmark (each writes its JSON there), then regenerate the page. `tests/test_docs.py` fails when the page
and the files disagree.*

Every result below names the machine it ran on, the date and the command, newest first. A result whose **Source**
says "transcribed" was copied from a table of the README at commit 7ab0224 (or of another page, as it says): the
JSON files those runs wrote stayed on machines the project no longer has, and the figures describe the code of
their day, not of today.

{% for section in sections %}- [{{ section.title | text }}](#{{ section.anchor }})
{% endfor %}
{% for section in sections %}
## {{ section.title | text }}

{{ section.about | text }}{% if section.command %} Command: `{{ section.command | text }}`.{% endif %}

{% if section.missing %}{{ section.missing | text }}

{% endif %}{% for result in section.results %}### {{ result.heading | text }}

{% if result.source %}**Source:** {{ result.source | text }}.

{% endif %}- Machine: {{ result.machine | text }}
- Date: {{ result.date | text }}
- Command: {{ result.command_line | text }}
- File: `benchmarks/results/{{ result.file | text }}`

{% for line in result.lines %}{{ line | text }}

{% endfor %}{% for t in result.tables %}{{ table(t) }}
{% endfor %}{% for note in result.notes %}{% if loop.first %}Notes:

{% endif %}- {{ note | text }}
{% if loop.last %}
{% endif %}{% endfor %}{% endfor %}{% endfor %}"""


def _markdown_text(value: Any) -> Markup:
    """Text for Markdown: HTML's special characters escaped, nothing else (quotes and apostrophes stay)."""
    text = str(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return Markup(text)


def _markdown_cell(value: Any) -> Markup:
    """A Markdown table cell: escaped as text, pipes escaped, on one line."""
    return Markup(str(_markdown_text(value)).replace("|", "\\|").replace("\n", " "))


def anchor(title: str) -> str:
    """The anchor GitHub gives a heading."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def render_page(results: list[Result]) -> str:
    """docs/benchmarks.md for ``results``."""
    environment = Environment(autoescape=True, keep_trailing_newline=True)
    environment.filters["text"] = _markdown_text
    environment.filters["cell"] = _markdown_cell
    sections = []
    for key, section in SECTIONS.items():
        mine = sorted((r for r in results if r.section == key), key=_sort_key)
        if key == "other" and not mine:
            continue
        measured = [r for r in mine if "table" not in r.data]
        missing = ""
        if not measured and key != "other":
            missing = section.missing
        sections.append({"title": section.title, "anchor": anchor(section.title), "about": section.about,
                         "command": section.command, "results": [render_result(r) for r in mine],
                         "missing": missing})
    page = environment.from_string(TEMPLATE).render(generator=GENERATOR, sections=sections)
    return re.sub(r"\n{3,}", "\n\n", page).rstrip("\n") + "\n"


def generate(results_dir: Path = RESULTS_DIR) -> str:
    return render_page(load_results(results_dir))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=GENERATOR, description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="folder of the JSON results")
    parser.add_argument("--output", type=Path, default=OUTPUT_PATH, help="the page to write (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when the page is out of date")
    args = parser.parse_args(argv)
    try:
        results = load_results(args.results)
        page = render_page(results)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.exists() else ""
        if current != page:
            print(f"{args.output} is out of date; run: {GENERATOR}", file=sys.stderr)
            return 1
        print(f"{args.output} is up to date")
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(page, encoding="utf-8")
    print(f"wrote {args.output} from {len(results)} result file(s) in {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
