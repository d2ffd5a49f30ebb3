"""The documentation says what the code does: generated pages are current, links resolve, commands are real.

Fast: no training. The flag check runs each documented command's ``--help`` in a subprocess (a few seconds).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from benchmarks import report as benchmark_report

REPO_ROOT = Path(__file__).resolve().parent.parent
README = REPO_ROOT / "README.md"
DOC_PAGES = sorted((REPO_ROOT / "docs").glob("*.md"))
PAGES = [README, *DOC_PAGES, REPO_ROOT / "CHANGELOG.md"]

FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6} +(.+?) *#*$", re.MULTILINE)
COMMAND = re.compile(r"python -m ((?:experiments|benchmarks)\.\w+|mnist_ablation\.serve)\b")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
# scheme://user:secret@host with a secret other than the redaction mask; PGPASSWORD=secret; --password secret
PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^\s:/@`'\"]+:(?!\*\*\*@)[^\s@/`'\"]+@|PGPASSWORD=\S|--password[ =]\S",
                      re.IGNORECASE)
# An absolute path in the README: /dir/... that is not part of a URL ('//') or a relative path ('./', '../').
ABSOLUTE_PATH = re.compile(r"(?<![\w./:~-])/(?:[\w.-]+/)+[\w.-]*|sqlite:////\w")
# Where a machine keeps its files; docs may name system paths (/usr/bin/chromium) and URL paths (/api/predict).
MACHINE_PATH = re.compile(r"(?<![\w.~-])/(?:work|tmp|home|Users|root|mnt|scratch|workspace)/")
# Which command the flag tables of each reference page describe.
FLAG_TABLES = {"ablate.md": "experiments.ablate", "tune.md": "experiments.tune", "report.md": "experiments.report",
               "ensembles.md": "experiments.ensemble", "explorer.md": "experiments.serve"}


def _prose(text: str) -> str:
    """``text`` without its fenced code blocks (links and headings in code are not links or headings)."""
    return FENCE.sub("", text)


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found, seen = set(), {}
    for heading in HEADING.findall(_prose(page.read_text(encoding="utf-8"))):
        anchor = github_anchor(heading)
        count = seen.get(anchor, 0)
        seen[anchor] = count + 1
        found.add(anchor if count == 0 else f"{anchor}-{count}")
    return found


def test_benchmarks_page_is_generated_from_the_result_files():
    expected = benchmark_report.generate()
    current = benchmark_report.OUTPUT_PATH.read_text(encoding="utf-8")
    assert current == expected, "docs/benchmarks.md is out of date with benchmarks/results/*.json: run " \
                                "`python -m benchmarks.report` and commit the page"


def test_every_result_file_names_its_machine_and_command_and_transcriptions_their_date():
    results = benchmark_report.load_results()
    assert {r.section for r in results} >= {"speed", "study_throughput", "layer_profile", "pruning",
                                            "serve_latency", "accuracy"}
    for result in results:
        rendered = benchmark_report.render_result(result)
        assert rendered.machine != "not recorded in the file", result.name
        assert rendered.tables and all(t["rows"] for t in rendered.tables), result.name
        source = result.data.get("source")
        if source is not None:  # some benchmarks write no timestamp; a transcription must say when it was measured
            assert source.startswith("transcribed from ") and "measured on" in source, result.name
            assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", rendered.date), result.name


def test_parity_section_says_not_yet_measured_until_its_result_exists(tmp_path):
    for path in (REPO_ROOT / "benchmarks" / "results").glob("*.json"):
        if not path.name.startswith("parity-"):
            (tmp_path / path.name).write_bytes(path.read_bytes())
    page = benchmark_report.generate(tmp_path)
    parity = page.split("\n## Parity\n", 1)[1].split("\n## ", 1)[0]
    assert "Not yet measured." in parity

    # A result in the format benchmarks/parity.py writes: the section shows its arms, comparison and verdict.
    from benchmarks.parity import verdict

    comparison = {"arm": "seed_script", "baseline": "baseline", "n_pairs": 8, "n_images": 10_000, "delta": -0.0002,
                  "delta_ci_low": -0.0008, "delta_ci_high": 0.0004, "confidence": 0.95, "p_value": 0.51,
                  "equivalence_margin": 0.001, "equivalence_p_value": 0.012, "standard_error": 0.0003,
                  "seed_variance": 1e-8, "image_variance": 4e-4, "residual_variance": 1e-3,
                  "standard_error_image_part": 0.0002, "standard_error_seed_part": 0.00022, "ci_width_floor": 0.0008,
                  "delta_ci_low_this_test_set": -0.0006, "delta_ci_high_this_test_set": 0.0002,
                  "p_value_this_test_set": 0.4}
    arm = {"n_seeds": 8, "seeds": list(range(8)), "test_accuracy_mean": 0.9921, "test_accuracy_std": 0.0006,
           "val_accuracy_mean": 0.991, "train_seconds_mean": 300.0, "run_seconds_mean": 320.0, "train_subset": None}
    result = {"benchmark": "parity", "mode": "cpu", "study": "parity",
              "protocol": {"seeds_per_arm": 8, "epochs": 3, "train_images": "all (55,000 with validation=split)",
                           "overrides": [], "what_it_shows": "parity over the first 3 epochs"},
              "commands": {"benchmark": "python -m benchmarks.parity --mode cpu",
                           "ablate": "python -m experiments.ablate --study parity"},
              "machine": {"processor": "x86_64", "cpu_count": 2, "gpus": [], "python": "3.11",
                          "keras_backend": "tensorflow", "packages": {"tensorflow": "2.21.0"}},
              "arms": {"baseline": arm, "seed_script": arm}, "comparison": comparison}
    (tmp_path / "parity-cpu.json").write_text(json.dumps(result))
    parity = benchmark_report.generate(tmp_path).split("\n## Parity\n", 1)[1].split("\n## ", 1)[0]
    assert "Not yet measured." not in parity
    assert "### `parity-cpu.json`" in parity and "`python -m benchmarks.parity --mode cpu`" in parity
    assert verdict(comparison) in parity and "[-0.080, +0.040]" in parity


def test_every_benchmark_describes_its_section_and_writes_the_one_machine_record():
    from benchmarks import common

    modules = sorted(p.stem for p in (REPO_ROOT / "benchmarks").glob("*.py")
                     if p.stem not in ("__init__", "report", "common", "seed_script"))
    assert [key for key in benchmark_report.SECTIONS if key != "other"] == [
        "speed", "study_throughput", "layer_profile", "pruning", "serve_latency", "accuracy", "parity", "packing",
        "packed_study", "step_ceiling", "gpu_lease"]
    assert set(benchmark_report.SECTIONS) - {"other"} == set(modules)  # one REPORT per benchmark module
    # Only common.py knows how to read the machine: no benchmark writes its own load averages or CPU fields.
    for module in modules:
        source = (REPO_ROOT / "benchmarks" / f"{module}.py").read_text(encoding="utf-8")
        assert "getloadavg" not in source and "platform." not in source and "/proc/cpuinfo" not in source, module
    record = common.finish_machine_record(common.machine_record())
    assert set(record) == {"cpu", "cpu_count", "gpus", "keras_backend", "packages", "python", "platform",
                           "load_average"} and set(record["load_average"]) == {"start", "end"}
    text = common.machine_text(record)
    assert f"{record['cpu_count']} CPUs" in text and "load average " in text and " → " in text
    # Results a run wrote carry that record (transcribed ones a sentence); the report reads nothing else.
    for result in benchmark_report.load_results():
        machine = result.data.get("machine")
        assert isinstance(machine, str) or set(machine) <= set(record), result.name


def test_the_benchmark_report_reads_every_description_without_loading_a_framework():
    probe = ("import sys, benchmarks.report; "
             "print(sorted(m for m in ('tensorflow', 'keras', 'mlflow', 'optuna') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_an_unknown_result_file_is_a_clear_error(tmp_path):
    (tmp_path / "mystery.json").write_text("{}")
    with pytest.raises(ValueError, match="mystery.json: not a result of a known benchmark"):
        benchmark_report.load_results(tmp_path)


def test_absolute_paths_in_recorded_commands_are_not_published():
    assert benchmark_report.portable("python -m x --data-dir /srv/data/mnist --tracking-uri sqlite:////srv/m/a.db") \
        == "python -m x --data-dir …/mnist --tracking-uri sqlite:///…/a.db"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_point_at_files_and_headings_that_exist(page):
    broken = []
    for target in LINK.findall(_prose(page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not ours to check offline
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target} (no heading with anchor #{anchor} in {linked.name})")
    assert not broken, f"{page.name}: broken links: {broken}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_no_merge_conflict_markers(page):
    markers = [number for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1)
               if re.match(r"(<{7}|={7}|>{7})( |$)", line)]
    assert not markers, f"{page.name}: merge conflict markers left on lines {markers}"


def test_each_changelog_section_appears_once_per_release():
    text = (REPO_ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    for release in re.split(r"^## ", text, flags=re.MULTILINE)[1:]:
        sections = re.findall(r"^### (.+)$", release, flags=re.MULTILINE)
        repeated = sorted({section for section in sections if sections.count(section) > 1})
        assert not repeated, f"CHANGELOG.md {release.splitlines()[0]}: sections {repeated} appear more than once"


def test_readme_has_no_machine_paths_and_stays_short():
    text = README.read_text(encoding="utf-8")
    assert not ABSOLUTE_PATH.findall(text), "write paths relative to the repository (path/to/mnist), not absolute"
    assert len(text.splitlines()) <= 150, "the README is a front door; move reference material to docs/"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_no_password_on_a_command_line_and_no_machine_paths(page):
    text = page.read_text(encoding="utf-8")
    assert not PASSWORD.findall(text), f"{page.name} shows a password; use ~/.pgpass or PGPASSWORD instead"
    assert not MACHINE_PATH.findall(text), f"{page.name} names a path on one machine"


def documented_flags() -> dict[str, dict[str, set[str]]]:
    """command -> flag -> pages that use it, from every ``python -m ...`` in code and every flag table."""
    found: dict[str, dict[str, set[str]]] = {}

    def record(command: str, text: str, page: str) -> None:
        command = "experiments.serve" if command == "mnist_ablation.serve" else command
        for flag in FLAG.findall(text):
            found.setdefault(command, {}).setdefault(flag, set()).add(page)

    for page in [README, *DOC_PAGES]:
        text = page.read_text(encoding="utf-8")
        code = [block.replace("\\\n", " ") for block in FENCE.findall(text)]
        snippets = [line for block in code for line in block.splitlines()]
        snippets += re.findall(r"`([^`\n]+)`", _prose(text))
        for snippet in snippets:
            matches = list(COMMAND.finditer(snippet))
            if not matches:
                continue
            ends = [following.start() for following in matches[1:]] + [len(snippet)]
            for match, end in zip(matches, ends, strict=True):
                # The command's own arguments: up to the next command, a comment, a pipe or another command.
                rest = snippet[match.end():end]
                rest = re.split(r"\s#|\||&&|;", rest)[0]
                record(match[1], rest, page.name)
        command = FLAG_TABLES.get(page.name)
        if command:
            for row in re.findall(r"^\| *(`--[^|]*)\|", text, re.MULTILINE):
                record(command, row, page.name)
    return found


def parser_flags(command: str) -> set[str] | str:
    """The options ``python -m COMMAND --help`` lists in its usage (or the error it gave)."""
    completed = subprocess.run([sys.executable, "-m", command, "--help"], cwd=REPO_ROOT, capture_output=True,
                               text=True, timeout=120, check=False,
                               env={**_environment(), "TF_CPP_MIN_LOG_LEVEL": "3"})
    if completed.returncode != 0:
        return completed.stderr[-2000:]
    usage = completed.stdout.split("\n\n", 1)[0]
    return set(FLAG.findall(usage)) | {"--help"}


def _environment() -> dict[str, str]:
    import os

    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}


def test_every_documented_flag_exists():
    documented = documented_flags()
    assert {"experiments.ablate", "experiments.tune", "experiments.report", "experiments.ensemble",
            "experiments.serve", "experiments.train", "experiments.doctor"} <= set(documented)
    with ThreadPoolExecutor(max_workers=4) as pool:
        parsers = dict(zip(documented, pool.map(parser_flags, documented), strict=True))
    problems = []
    for command, flags in documented.items():
        known = parsers[command]
        if isinstance(known, str):
            problems.append(f"python -m {command} --help failed: {known}")
            continue
        for flag, pages in sorted(flags.items()):
            if flag not in known:
                problems.append(f"{', '.join(sorted(pages))}: python -m {command} has no {flag}")
    assert not problems, "\n".join(problems)
