r"""Rendering the report: tables for display, and the HTML and Markdown pages from Jinja2 templates.

Both templates are autoescaped, each for its own format, so a run name, arm or description holding markup shows as
text: HTML entities in the HTML page, Markdown backslash escapes in the Markdown page (``trainer's`` stays
``trainer's``, ``<`` becomes ``\<``, ``*`` becomes ``\*``). The CSS is a package file inlined into the page, which
stays one self-contained file.
"""

from __future__ import annotations

import base64
import json
import re
from importlib import resources

import pandas as pd
from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup

from .analysis import format_p, points, shown_difference_interval, visible_beyond_range

TEMPLATES = "mnist_ablation.report"


# Characters that Markdown (CommonMark and GitHub's tables) may read as markup anywhere in a line; `'` and `"` are
# plain text there and stay as they are.
_MARKDOWN_PUNCTUATION = re.compile(r"([\\`*\[\]<>#|~])")
# `_` opens or closes emphasis only at a word's edge: no_batch_norm stays readable, _x_ is escaped.
_EDGE_UNDERSCORE = re.compile(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")
_ENTITY = re.compile(r"&(?=#?\w+;)")  # &lt; &#39; would render as < '
_LIST_MARKER = re.compile(r"^(\s*)([-+]|\d+(?=[.)]))(?=[.)]?(\s|$))", re.MULTILINE)  # "- x", "1. x": a list


def markdown_escape(text: str) -> str:
    """``text`` as Markdown that renders as exactly this text (backslash escapes; no HTML entities)."""
    text = _MARKDOWN_PUNCTUATION.sub(r"\\\1", text)
    text = _EDGE_UNDERSCORE.sub(r"\\_", text)
    text = _ENTITY.sub(r"\\&", text)
    return _LIST_MARKER.sub(lambda m: m.group(1) + (f"\\{m.group(2)}" if not m.group(2).isdigit()
                                                    else m.group(2) + "\\"), text)


def _md_text(value):
    """The Markdown template's autoescape: every value it inserts, unless already Markdown (a filter's, a macro's)."""
    return value if hasattr(value, "__html__") else Markup(markdown_escape(str(value)))


def _md_cell(value) -> Markup:
    """A Markdown table cell: escaped for Markdown, one line."""
    return Markup(markdown_escape(str(value)).replace("\n", " "))


def _md_code(value) -> Markup:
    """Text inside a fenced code block, where Markdown shows entities literally: no escaping, no fences."""
    return Markup(str(value).replace("`", "'"))


def environment(markdown: bool = False) -> Environment:
    """The templates' environment; ``markdown``: values are escaped for Markdown instead of HTML."""
    env = Environment(loader=PackageLoader(TEMPLATES, "templates"),
                      autoescape=select_autoescape(enabled_extensions=("html", "md", "j2"), default=True),
                      trim_blocks=False, lstrip_blocks=False, keep_trailing_newline=True,
                      # Autoescape HTML-escapes what finalize returns unless it is already markup: returning every
                      # value Markdown-escaped (as Markup) makes the escaping Markdown's.
                      finalize=_md_text if markdown else None)
    env.filters["md_cell"] = _md_cell
    env.filters["md_code"] = _md_code
    return env


def css() -> str:
    return resources.files(TEMPLATES).joinpath("templates/report.css").read_text(encoding="utf-8")


def render_html(context: dict) -> str:
    return environment().get_template("report.html.j2").render(css=Markup(css()), **context)


def render_markdown(context: dict) -> str:
    return environment(markdown=True).get_template("report.md.j2").render(**context)


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# -- tables as the page shows them ----------------------------------------------------------------------


def table(frame: pd.DataFrame, classes: list[str] | None = None, text: bool = False) -> dict:
    """A frame as the templates' table: columns, rows of strings, optional row classes."""
    rows = [["—" if (isinstance(v, float) and pd.isna(v)) else v for v in row]
            for row in frame.itertuples(index=False)]
    return {"columns": [str(c) for c in frame.columns], "rows": rows, "classes": classes, "text": text}


def _interval(mean, low, high, signed=False) -> str:
    if pd.isna(mean):
        return "—"
    text = points(mean, signed=signed)
    if pd.isna(low):
        return text + " (no CI)"
    return f"{text} [{points(low, signed=signed)}, {points(high, signed=signed)}]"


# What an arm that is the baseline's own training run can see: its difference is exactly zero by construction.
SAME_RUNS = "— (the baseline's runs)"


def summary_display(summary: pd.DataFrame, baseline: str, confidence: float) -> dict:
    """The summary table as the page shows it: percentages and points, intervals in brackets, verdicts."""
    level = f"{round(100 * confidence)}%"
    rows = []
    for (_, line), row in zip(summary.iterrows(), summary.itertuples()):
        is_baseline = row.arm == baseline
        seeds = f"{row.n_seeds}" + (f" ({row.n_failed} failed)" if row.n_failed else "")
        if not is_baseline and row.n_pairs != row.n_seeds and row.n_seeds:
            seeds += f", {row.n_pairs} paired"
        rows.append({
            "arm": row.arm,
            "seeds": seeds,
            f"test accuracy % [{level} CI]": _interval(row.test_accuracy_mean, row.test_accuracy_ci_low,
                                                       row.test_accuracy_ci_high),
            f"Δ vs baseline, points [{level} CI]": "reference" if is_baseline else _interval(
                row.delta_vs_baseline, *shown_difference_interval(line)[:2], signed=True),
            "Holm p": "" if is_baseline else format_p(row.p_value_holm),
            "smallest visible effect (points)": "" if is_baseline or pd.isna(row.mde) else (
                SAME_RUNS if row.identical_to_baseline else
                "beyond the range" if visible_beyond_range(line) else points(row.mde)),
            f"TOST p (±{points(row.equivalence_margin)})": "" if is_baseline else format_p(
                row.equivalence_p_value_holm),
            f"Δ [{level} CI], this test set only": "" if is_baseline else _interval(
                row.delta_vs_baseline, *shown_difference_interval(
                    line, "delta_ci_low_this_test_set", "delta_ci_high_this_test_set")[:2], signed=True),
            "verdict": row.verdict,
        })
    classes = [row.verdict.replace(" ", "-") for row in summary.itertuples()]
    return table(pd.DataFrame(rows), classes)


def curves_display(curves: pd.DataFrame) -> dict:
    threshold = f"{100 * curves['threshold'].iloc[0]:g}%" if len(curves) else ""

    def number(value, digits=1, scale=1.0):
        return "—" if pd.isna(value) else f"{scale * value:.{digits}f}"

    return table(pd.DataFrame({
        "arm": curves["arm"],
        "seeds": curves["n_seeds"],
        f"seeds reaching {threshold} val. acc.": curves["n_reached_threshold"],
        f"epochs to {threshold} (mean)": [number(v) for v in curves["epochs_to_threshold_mean"]],
        "best epoch (mean)": [number(v) for v in curves["best_epoch_mean"]],
        "best val. accuracy % (mean)": [number(v, 2, 100) for v in curves["best_val_accuracy_mean"]],
        "final val. accuracy % (mean)": [number(v, 2, 100) for v in curves["final_val_accuracy_mean"]],
        "final train − val gap, points (mean)": [number(v, 2, 100) for v in curves["final_gap_mean"]],
    }))


def effects_display(effects: pd.DataFrame, confidence: float) -> dict:
    level = f"{round(100 * confidence)}%"
    return table(pd.DataFrame({
        "term": [t.replace(":", " × ") for t in effects["term"]],
        "kind": effects["kind"],
        f"effect, points [{level} CI]": [_interval(e, lo, hi, signed=True) for e, lo, hi in
                                         zip(effects["effect"], effects["ci_low"], effects["ci_high"])],
        "p": [format_p(p) for p in effects["p_value"]],
        "Holm p": [format_p(p) for p in effects["p_value_holm"]],
        "Holm family": effects["holm_family"],
        "seeds": effects["n_seeds"],
    }))


def rounded(frame: pd.DataFrame, digits: int = 4) -> dict:
    shown = frame.copy()
    for column in shown.columns:
        if pd.api.types.is_float_dtype(shown[column]):
            shown[column] = [("—" if pd.isna(v) else f"{v:.{digits}g}") for v in shown[column]]
    return table(shown)


def configuration_tables(configs: dict[str, dict], baseline: str, planned: pd.DataFrame | None,
                         changes) -> dict | None:
    """(per-arm differences from the baseline, the baseline's every field) as display tables."""
    base = configs.get(baseline)
    if not configs or base is None:
        return None
    seeds = (planned.groupby("arm", sort=False)["seed"].apply(lambda s: ", ".join(map(str, sorted(s))))
             if planned is not None else pd.Series(dtype=str))
    arms = pd.DataFrame({
        "arm": list(configs),
        "seeds": [seeds.get(a, "") for a in configs],
        "differs from the baseline in": [
            ", ".join(f"{k}={json.dumps(after)}" for k, (_, after) in changes(a).items()) or "—" for a in configs
        ],
    })
    baseline_table = pd.DataFrame({"field": list(base), "baseline value": [json.dumps(v) for v in base.values()]})
    return {"arms": table(arms, text=True), "baseline": table(baseline_table, text=True)}


def environment_display(environment: dict | None) -> dict | None:
    if not environment:
        return None
    git = environment.get("git", {})
    machine = environment.get("machine", {})
    packages = environment.get("packages", {})
    devices = machine.get("tensorflow_devices") or machine.get("jax_devices") or []
    return {
        "commit": git.get("commit"), "dirty": git.get("dirty"), "platform": machine.get("platform"),
        "python": machine.get("python"), "cpu_count": machine.get("cpu_count"), "devices": ", ".join(devices),
        "packages": table(pd.DataFrame(list(packages.items()), columns=["package", "version"]), text=True),
        "data": table(pd.DataFrame(list(environment.get("data", {}).get("sha256", {}).items()),
                                   columns=["file", "sha256"]), text=True),
        "package_line": ", ".join(f"{k} {v}" for k, v in packages.items()),
    }
