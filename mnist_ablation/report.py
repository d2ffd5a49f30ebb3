"""The report of an ablation study: which differences from the baseline are real, as tables, figures and a page.

    from mnist_ablation import ablation_summary, factorial_analysis, learning_curves
    ablation_summary("leave-one-out")        # one row per arm: mean, CI, paired delta, t / Wilcoxon / McNemar, Holm
    write_study_report("leave-one-out")      # reports/leave-one-out/{ablation_summary.csv, report.html, report.md, ...}

This module gathers a study's runs from MLflow (final metrics, per-epoch histories, per-example test
predictions, the parent's study.json, a child's environment.json), hands them to the pure functions of
``mnist_ablation.stats``, draws the figures, writes a self-contained HTML page and a Markdown version,
and logs everything to the study's parent run under ``report/``.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import json
import math
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from . import stats, store, tracking
from .plots import confusion_matrix
from .errors import StudyError
from .redaction import redact
from .store import REPORT_ARTIFACT_DIR
from .studies import STUDIES

DEFAULT_REPORT_ROOT = Path("reports")
DEFAULT_THRESHOLD = 0.99
HISTORY_METRICS = ("accuracy", "val_accuracy", "loss", "val_loss")
SIGNIFICANCE_LEVEL = 0.05
BASELINE_COLOR, ARM_COLOR, FAILED_COLOR = "#1f4e79", "#c55a11", "#999999"


@dataclass
class StudyData:
    """Everything the report needs from MLflow, gathered once."""

    study: str
    tracking_uri: str
    parent_run_id: str | None
    definition: dict | None
    baseline: str
    runs: pd.DataFrame  # every child run of the current definition, any status
    finished: pd.DataFrame  # one FINISHED run per (arm, seed)
    planned: pd.DataFrame | None  # (arm, seed) cells of study.json
    histories: pd.DataFrame = field(default_factory=pd.DataFrame)  # run_id, arm, seed, epoch, metrics
    labels: np.ndarray | None = None  # test labels, from the predictions
    predicted_by_run: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def correct_by_run(self) -> dict[str, np.ndarray]:
        return {run_id: predicted == self.labels for run_id, predicted in self.predicted_by_run.items()}


def _baseline_arm(study: str, definition: dict | None) -> str:
    if definition and definition.get("baseline_arm"):
        return definition["baseline_arm"]
    return STUDIES[study].baseline_arm if study in STUDIES else "baseline"


def gather_study(study: str, tracking_uri: str | None = None, predictions: bool = True,
                 histories: bool = True) -> StudyData:
    """Read a study's runs (all statuses), definition, metric histories and test predictions from MLflow."""
    uri = tracking.ensure_tracking_uri(tracking_uri)
    parent = store.find_parent_run(study)
    if parent is None:
        raise StudyError(
            f"no study {study!r} in the tracking store {redact(uri)} (no parent run in experiment "
            f"{store.ablation_experiment(study)!r}). Run `python -m experiments.ablate --study {study}` first, "
            "or pass the store it used with --tracking-uri."
        )
    definition = store.study_definition(study)
    runs = store.cell_runs(study, include_unfinished=True)
    planned = None
    if definition and definition.get("cells"):
        planned = pd.DataFrame([{"arm": c["arm"], "seed": int(c["seed"])} for c in definition["cells"]])
    finished = stats.latest_finished(runs).reset_index(drop=True) if len(runs) else runs
    data = StudyData(study, uri, parent.info.run_id, definition, _baseline_arm(study, definition), runs,
                     finished, planned)
    if histories and len(finished):
        data.histories = _metric_histories(finished)
    if predictions:
        for row in finished.itertuples():
            frame = store.read_predictions(row.run_id)
            labels = frame["label"].to_numpy()
            if data.labels is None:
                data.labels = labels
            elif not np.array_equal(data.labels, labels):
                raise ValueError(f"run {row.run_id} ({row.arm}, seed {row.seed}) predicted a different test set "
                                 "from the other runs; McNemar needs the same test examples in every run.")
            data.predicted_by_run[row.run_id] = frame["predicted"].to_numpy()
    return data


def _metric_histories(finished: pd.DataFrame) -> pd.DataFrame:
    return store.metric_histories(finished, HISTORY_METRICS)


# -- the DataFrame API ---------------------------------------------------------------------------------


def summary_table(data: StudyData, confidence: float = stats.DEFAULT_CONFIDENCE) -> pd.DataFrame:
    """``stats.ablation_table`` of gathered study data."""
    if data.runs.empty:
        return pd.DataFrame(columns=stats.SUMMARY_COLUMNS + stats.EXTRA_SUMMARY_COLUMNS)
    correct = data.correct_by_run if data.predicted_by_run else None
    return stats.ablation_table(data.runs, correct, baseline=data.baseline, confidence=confidence,
                                planned=data.planned)


def ablation_summary(study: str, tracking_uri: str | None = None,
                     confidence: float = stats.DEFAULT_CONFIDENCE) -> pd.DataFrame:
    """One row per arm of ``study`` against its baseline (the columns of ablation_summary.csv)."""
    return summary_table(gather_study(study, tracking_uri), confidence)


def factorial_analysis(study: str = "factorial", tracking_uri: str | None = None,
                       confidence: float = stats.DEFAULT_CONFIDENCE) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(effects, ANOVA) of the four components' main effects and two-way interactions (``stats.factorial_effects``)."""
    data = gather_study(study, tracking_uri, predictions=False, histories=False)
    return stats.factorial_effects(data.finished, confidence)


def learning_curves(study: str, tracking_uri: str | None = None, threshold: float = DEFAULT_THRESHOLD,
                    per_run: bool = False) -> pd.DataFrame:
    """Per arm (or per run): epochs to reach ``threshold`` validation accuracy, best epoch, final train-val gap."""
    data = gather_study(study, tracking_uri, predictions=False)
    table = stats.learning_curve_table(data.histories, threshold)
    return table if per_run else stats.learning_curve_summary(table, threshold)


# -- words ---------------------------------------------------------------------------------------------


def _config_changes(data: StudyData, arm: str) -> dict[str, tuple]:
    """Config fields where ``arm`` differs from the baseline: field -> (baseline value, arm value)."""
    if not data.definition:
        return {}
    configs = {}
    for cell in data.definition.get("cells", []):
        configs.setdefault(cell["arm"], cell["config"])
    base, other = configs.get(data.baseline), configs.get(arm)
    if base is None or other is None:
        return {}
    return {k: (base.get(k), v) for k, v in other.items() if k != "seed" and base.get(k) != v}


def describe_change(data: StudyData, arm: str) -> str:
    """'removing batch norm', 'setting lr_schedule=constant', ... ; the arm's name if nothing is known."""
    phrases = []
    for name, (before, after) in _config_changes(data, arm).items():
        if before is True and after is False:
            phrases.append(f"removing {name.replace('_', ' ')}")
        elif before is False and after is True:
            phrases.append(f"adding {name.replace('_', ' ')}")
        else:
            phrases.append(f"setting {name}={after} (baseline {before})")
    if not phrases:
        return f"arm {arm}"
    if len(phrases) > 3:
        phrases = phrases[:3] + [f"{len(phrases) - 3} more changes"]
    return (", ".join(phrases[:-1]) + " and " + phrases[-1]) if len(phrases) > 1 else phrases[0]


def format_p(p: float) -> str:
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "n/a"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def p_phrase(p: float) -> str:
    """'p = 0.021', 'p < 0.001' or 'p n/a'."""
    text = format_p(p)
    return f"p {text}" if text.startswith("<") or text == "n/a" else f"p = {text}"


def _points(value: float) -> str:
    return f"{100 * value:.2f}"


def arm_sentence(data: StudyData, row: pd.Series, n_tests: int, confidence: float) -> str:
    """A plain-language sentence for one arm of the summary table."""
    level = f"{round(100 * confidence)}%"
    arm = row["arm"]
    if row["n_seeds"] == 0:
        reasons = _failure_reasons(data, arm)
        why = f" ({reasons[0]})" if reasons else ""
        state = {"failed": "failed", "running": "is still running", "not run": "has not been run"}.get(
            row["status"], row["status"])
        return (f"Arm {arm} {state}{why}: with no finished run it cannot be compared with the baseline. "
                "Rerun the study command to retry it.")
    if arm == data.baseline:
        text = f"The baseline reaches {_points(row['test_accuracy_mean'])}% test accuracy"
        if row["n_seeds"] >= 2:
            return (text + f", {level} CI [{_points(row['test_accuracy_ci_low'])}, "
                    f"{_points(row['test_accuracy_ci_high'])}] over {row['n_seeds']} seeds.")
        return text + " on its single seed; with one seed no confidence interval can be computed."
    change = describe_change(data, arm)
    subject = f"{change[0].upper()}{change[1:]} (arm {arm})"
    delta = row["delta_vs_baseline"]
    if pd.isna(delta):
        return f"{subject}: no finished baseline run with the same seed, so no paired comparison can be made."
    verb = "costs" if delta < 0 else "gains"
    mcnemar = (f" McNemar's exact test on the per-example predictions (pooled over seeds) gives "
               f"{p_phrase(row['mcnemar_p_value'])}." if not pd.isna(row["mcnemar_p_value"]) else "")
    failed = f" {row['n_failed']} of its seeds failed and are left out." if row["n_failed"] else ""
    n_pairs = int(row["n_pairs"]) if not pd.isna(row["n_pairs"]) else 0
    if delta == 0 and n_pairs >= 1 and pd.isna(row["p_value"]):
        return (f"{subject} gives exactly the baseline's test accuracy on all {n_pairs} paired seed(s); "
                f"a t-test is undefined without spread.{mcnemar}{failed}")
    if n_pairs < 2:
        return (f"{subject} {verb} {_points(abs(delta))} points of test accuracy on the single paired seed; with "
                f"fewer than two seeds the confidence interval and the t-test cannot be computed (run with --seeds 3 "
                f"or more).{mcnemar}{failed}")
    if pd.isna(row["p_value"]):
        return (f"{subject} {verb} {_points(abs(delta))} points of test accuracy on every one of {n_pairs} seeds "
                f"alike; with no spread between seeds the interval and t-test are undefined.{mcnemar}{failed}")
    low, high = row["delta_ci_low"], row["delta_ci_high"]
    if delta < 0:
        low, high = -high, -low
    significant = row["p_value_holm"] < SIGNIFICANCE_LEVEL
    verdict = ("a difference unlikely to be seed noise" if significant
               else f"not distinguishable from the baseline with {n_pairs} seeds")
    return (f"{subject} {verb} {_points(abs(delta))} points, {level} CI [{_points(low)}, {_points(high)}], "
            f"{p_phrase(row['p_value_holm'])} after Holm over {n_tests} arm(s) (paired t-test; Wilcoxon "
            f"{p_phrase(row['wilcoxon_p_value'])}, d_z = {row['effect_size']:.2f}): {verdict}.{mcnemar}{failed}")


def _failure_reasons(data: StudyData, arm: str) -> list[str]:
    runs = data.runs[(data.runs["arm"] == arm) & (data.runs["status"] != "FINISHED")]
    reasons = []
    for row in runs.itertuples():
        reason = (row.failure_reason or "no failure_reason recorded") if isinstance(row.failure_reason, str) \
            else "no failure_reason recorded"
        reasons.append(f"seed {row.seed} {row.status}: {reason.strip().splitlines()[0][:200]}")
    return reasons


# -- figures -------------------------------------------------------------------------------------------


def _arm_colors(arms: list[str], baseline: str) -> dict[str, str]:
    palette = plt.get_cmap("tab10")
    colors, index = {}, 0
    for arm in arms:
        if arm == baseline:
            colors[arm] = BASELINE_COLOR
        else:
            colors[arm] = palette((index + 1) % 10)
            index += 1
    return colors


def error_figure(summary: pd.DataFrame, finished: pd.DataFrame, baseline: str, confidence: float) -> plt.Figure:
    """Test error per arm: mean over seeds with its interval, each seed as a dot, the baseline as a line."""
    arms = list(summary["arm"])
    fig, ax = plt.subplots(figsize=(9, 0.55 * len(arms) + 1.6))
    positions = np.arange(len(arms))[::-1]
    for y, row in zip(positions, summary.itertuples()):
        color = BASELINE_COLOR if row.arm == baseline else ARM_COLOR
        if row.n_seeds == 0:
            ax.text(0.5, y, f"{row.status}: no finished run", transform=ax.get_yaxis_transform(),
                    ha="center", va="center", color=FAILED_COLOR, style="italic")
            continue
        seeds = finished[finished["arm"] == row.arm]
        ax.scatter(100 * (1 - seeds["test_accuracy"]), np.full(len(seeds), y) + 0.18, s=14, color=color, alpha=0.45,
                   zorder=2, label="single seed" if y == positions[0] else None)
        if not pd.isna(row.test_error_ci_low):
            ax.errorbar(100 * row.test_error_mean, y,
                        xerr=[[100 * (row.test_error_mean - row.test_error_ci_low)],
                              [100 * (row.test_error_ci_high - row.test_error_mean)]],
                        fmt="o", color=color, capsize=4, markersize=7, lw=2, zorder=3)
        else:
            ax.plot(100 * row.test_error_mean, y, "o", color=color, markersize=7, zorder=3)
            ax.annotate("no CI (1 seed)", (100 * row.test_error_mean, y), xytext=(8, -4),
                        textcoords="offset points", fontsize=8, color=FAILED_COLOR)
    base = summary[summary["arm"] == baseline]
    if len(base) and not pd.isna(base["test_error_mean"].iloc[0]):
        ax.axvline(100 * base["test_error_mean"].iloc[0], color=BASELINE_COLOR, ls="--", lw=1, alpha=0.7,
                   label="baseline mean")
    # A t interval from two or three seeds can reach past 0% or 100%; the axis stays on what is possible.
    low, high = ax.get_xlim()
    ax.set_xlim(max(low, -1.0), min(high, 101.0))
    ax.set_yticks(positions, arms)
    ax.set_xlabel(f"test error (%), mean over seeds with {round(100 * confidence)}% CI")
    ax.set_title("Test error per arm (lower is better)")
    ax.grid(axis="x", alpha=0.3)
    ax.set_ylim(-0.7, len(arms) - 0.3)
    ax.legend(loc="best", fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def learning_curves_figure(histories: pd.DataFrame, arms: list[str], baseline: str,
                           confidence: float) -> plt.Figure:
    """Mean validation accuracy and loss per epoch and arm, with the t interval over seeds as a band."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    colors = _arm_colors(arms, baseline)
    for ax, metric, label in ((axes[0], "val_accuracy", "validation accuracy"), (axes[1], "val_loss",
                                                                                  "validation loss")):
        curves = stats.mean_curves(histories, metric, confidence)
        for arm in arms:
            curve = curves[curves["arm"] == arm].sort_values("epoch")
            if curve.empty:
                continue
            epochs = curve["epoch"].to_numpy() + 1
            ax.plot(epochs, curve["mean"], marker="o", markersize=3, color=colors[arm], label=arm,
                    lw=2.2 if arm == baseline else 1.4)
            if curve["ci_low"].notna().any():
                ax.fill_between(epochs, curve["ci_low"], curve["ci_high"], color=colors[arm], alpha=0.15, lw=0)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.set_title(f"Mean {label} (band: {round(100 * confidence)}% CI over seeds)")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        if metric == "val_accuracy":
            low, high = ax.get_ylim()
            ax.set_ylim(max(low, -0.01), min(high, 1.01))
    axes[0].legend(fontsize=8, frameon=False, loc="lower right")
    fig.tight_layout()
    return fig


def _mean_confusion(data: StudyData, arm: str, seeds=None) -> np.ndarray | None:
    runs = data.finished[data.finished["arm"] == arm]
    if seeds is not None:
        runs = runs[runs["seed"].isin(seeds)]
    matrices = [confusion_matrix(data.labels, data.predicted_by_run[r]) for r in runs["run_id"]]
    return np.mean(matrices, axis=0) if matrices else None


def confusion_difference_figure(data: StudyData, arms: list[str]) -> plt.Figure | None:
    """The baseline's errors (mean count per seed) and, per arm, its error counts minus the baseline's."""
    base = _mean_confusion(data, data.baseline)
    others = [a for a in arms if a != data.baseline and _mean_confusion(data, a) is not None]
    if base is None:
        return None
    panels = [(data.baseline, base, "baseline errors (mean per seed)")]
    panels += [(a, _mean_confusion(data, a) - base, f"{a} minus baseline") for a in others]
    columns = min(4, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.1 * columns, 3.9 * rows), squeeze=False)
    off_diagonal = ~np.eye(10, dtype=bool)
    limit = max([np.abs(m[off_diagonal]).max() for _, m, _ in panels[1:]] + [1.0])
    for ax, (arm, matrix, title) in zip(axes.flat, panels):
        shown = np.where(off_diagonal, matrix, np.nan)
        if arm == data.baseline:
            image = ax.imshow(shown, cmap="Blues", vmin=0)
        else:
            image = ax.imshow(shown, cmap="RdBu_r", vmin=-limit, vmax=limit)
        for i, j in zip(*np.nonzero(off_diagonal & (np.abs(np.nan_to_num(shown)) >= 0.5))):
            ax.text(j, i, f"{shown[i, j]:+.0f}" if arm != data.baseline else f"{shown[i, j]:.0f}", ha="center",
                    va="center", fontsize=6, color="black")
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(10))
        ax.set_yticks(range(10))
        ax.tick_params(labelsize=7)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("true", fontsize=8)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle("Confusions off the diagonal: red = more errors than the baseline, blue = fewer", fontsize=11)
    fig.tight_layout()
    return fig


def worse_examples(data: StudyData, arm: str, limit: int = 8) -> pd.DataFrame:
    """Test examples ``arm`` gets wrong and the baseline right, most consistent over paired seeds first."""
    arm_runs = data.finished[data.finished["arm"] == arm].set_index("seed")["run_id"]
    base_runs = data.finished[data.finished["arm"] == data.baseline].set_index("seed")["run_id"]
    seeds = sorted(set(arm_runs.index) & set(base_runs.index))
    if not seeds:
        return pd.DataFrame(columns=["index", "label", "predicted", "n_seeds_worse", "n_seeds"])
    worse = np.zeros(len(data.labels), dtype=int)
    predicted_when_worse = np.full(len(data.labels), -1)
    for seed in seeds:
        arm_predicted = data.predicted_by_run[arm_runs[seed]]
        mask = (arm_predicted != data.labels) & (data.predicted_by_run[base_runs[seed]] == data.labels)
        worse += mask
        predicted_when_worse = np.where(mask & (predicted_when_worse < 0), arm_predicted, predicted_when_worse)
    order = np.argsort(-worse, kind="stable")
    chosen = [i for i in order[:limit] if worse[i] > 0]
    return pd.DataFrame({"index": chosen, "label": data.labels[chosen], "predicted": predicted_when_worse[chosen],
                         "n_seeds_worse": worse[chosen], "n_seeds": len(seeds)})


def examples_figure(data: StudyData, arms: list[str], test_images: np.ndarray, per_arm: int = 8) -> plt.Figure | None:
    """Per arm, a row of test images it gets wrong while the baseline (same seed) gets them right."""
    rows = [(a, worse_examples(data, a, per_arm)) for a in arms if a != data.baseline]
    rows = [(a, e) for a, e in rows if len(e)]
    if not rows:
        return None
    fig, axes = plt.subplots(len(rows), per_arm, figsize=(1.35 * per_arm + 1.6, 1.65 * len(rows)), squeeze=False)
    for (arm, examples), row_axes in zip(rows, axes):
        for ax in row_axes:
            ax.axis("off")
        for ax, example in zip(row_axes, examples.itertuples()):
            ax.imshow(test_images[example.index].squeeze(), cmap="gray_r", vmin=0, vmax=1)
            ax.set_title(f"{example.label}\u2192{example.predicted}  ({example.n_seeds_worse}/{example.n_seeds})",
                         fontsize=8, color=ARM_COLOR)
        row_axes[0].text(-0.15, 0.5, arm, transform=row_axes[0].transAxes, ha="right", va="center", fontsize=9)
    fig.suptitle("Wrong for the arm, right for the baseline: true\u2192predicted (seeds where this happens)",
                 fontsize=10)
    fig.tight_layout(rect=(0.1, 0, 1, 1))
    return fig


def factorial_figure(effects: pd.DataFrame, confidence: float) -> plt.Figure:
    """Main effects and interactions with their intervals, in accuracy points."""
    fig, ax = plt.subplots(figsize=(8, 0.42 * len(effects) + 1.4))
    y = np.arange(len(effects))[::-1]
    for position, row in zip(y, effects.itertuples()):
        color = BASELINE_COLOR if row.kind == "main effect" else ARM_COLOR
        ax.errorbar(100 * row.effect, position, xerr=[[100 * (row.effect - row.ci_low)],
                                                      [100 * (row.ci_high - row.effect)]],
                    fmt="o", color=color, capsize=3, lw=1.5, label=row.kind)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=8, frameon=False)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(y, [t.replace(":", " \u00d7 ") for t in effects["term"]])
    ax.set_xlabel(f"effect on test accuracy (points), {round(100 * confidence)}% CI")
    ax.set_title("Factorial: main effects (on minus off) and two-way interactions")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


# -- the page -------------------------------------------------------------------------------------------

CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#1d2430;background:#f4f6f9;
margin:0;line-height:1.5}
main{max-width:1180px;margin:0 auto;padding:28px 36px 60px;background:#fff;box-shadow:0 0 18px rgba(0,0,0,.06)}
h1{font-size:28px;margin:0 0 4px;color:#1f4e79}h2{font-size:20px;margin:34px 0 10px;padding-bottom:4px;
border-bottom:2px solid #e3e8ef;color:#1f4e79}h3{font-size:16px;margin:20px 0 6px}
.sub{color:#5a6575;font-size:14px;margin-bottom:18px}.sub code{font-size:12px}
.findings{list-style:none;padding:0;margin:0}.findings li{margin:8px 0;padding:10px 14px;border-left:4px solid #c9d3df;
background:#f8fafc;border-radius:3px}.findings li.sig{border-left-color:#c55a11;background:#fdf5ef}
.findings li.base{border-left-color:#1f4e79;background:#eef4fa}.findings li.bad{border-left-color:#b00020;background:#fdecee}
.note{background:#fff8e1;border:1px solid #f0d27a;border-radius:4px;padding:10px 14px;margin:12px 0;font-size:14px}
table{border-collapse:collapse;font-size:13px;margin:8px 0 14px;width:100%}
th{background:#1f4e79;color:#fff;font-weight:600;padding:6px 8px;text-align:right;vertical-align:bottom}
td{padding:5px 8px;border-bottom:1px solid #e3e8ef;text-align:right;font-variant-numeric:tabular-nums}
th:first-child,td:first-child{text-align:left}tr:nth-child(even) td{background:#f8fafc}
table.text th,table.text td{text-align:left}tr.sig td{background:#fdf5ef}tr.failed td{color:#b00020}
figure{margin:14px 0 22px;text-align:center}figure img{max-width:100%;border:1px solid #e3e8ef;border-radius:4px}
figcaption{font-size:13px;color:#5a6575;margin-top:6px}
pre{background:#1d2430;color:#e8edf3;padding:12px 14px;border-radius:4px;overflow-x:auto;font-size:13px}
code{font-family:"SFMono-Regular",Menlo,Consolas,monospace}
details{margin:8px 0}summary{cursor:pointer;color:#1f4e79;font-weight:600}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:0 28px}
"""


def _figure_png(figure: plt.Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def _display_summary(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary table as the page shows it: percentages and points, CIs in brackets, p-values rounded."""

    def interval(mean, low, high, scale=100, signed=False):
        if pd.isna(mean):
            return "—"
        text = f"{scale * mean:+.2f}" if signed else f"{scale * mean:.2f}"
        if pd.isna(low):
            return text + " (no CI)"
        return text + (f" [{scale * low:+.2f}, {scale * high:+.2f}]" if signed else
                       f" [{scale * low:.2f}, {scale * high:.2f}]")

    rows = []
    for row in summary.itertuples():
        rows.append({
            "arm": row.arm,
            "seeds": f"{row.n_seeds}" + (f" ({row.n_failed} failed)" if row.n_failed else ""),
            "test accuracy % [CI]": interval(row.test_accuracy_mean, row.test_accuracy_ci_low, row.test_accuracy_ci_high),
            "Δ vs baseline, points [CI]": "reference" if str(row.status).startswith("baseline") else interval(
                row.delta_vs_baseline, row.delta_ci_low, row.delta_ci_high, signed=True),
            "t-test p": format_p(row.p_value),
            "Holm p": format_p(row.p_value_holm),
            "Wilcoxon p": format_p(row.wilcoxon_p_value),
            "d_z": "—" if pd.isna(row.effect_size) else f"{row.effect_size:.2f}",
            "McNemar p": format_p(row.mcnemar_p_value),
            "status": row.status,
        })
    return pd.DataFrame(rows)


def _display_curves(curves: pd.DataFrame) -> pd.DataFrame:
    threshold = f"{100 * curves['threshold'].iloc[0]:g}%" if len(curves) else ""

    def number(value, digits=1, scale=1.0):
        return "—" if pd.isna(value) else f"{scale * value:.{digits}f}"

    return pd.DataFrame({
        "arm": curves["arm"],
        "seeds": curves["n_seeds"],
        f"seeds reaching {threshold} val. acc.": curves["n_reached_threshold"],
        f"epochs to {threshold} (mean)": [number(v) for v in curves["epochs_to_threshold_mean"]],
        "best epoch (mean)": [number(v) for v in curves["best_epoch_mean"]],
        "best val. accuracy % (mean)": [number(v, 2, 100) for v in curves["best_val_accuracy_mean"]],
        "final val. accuracy % (mean)": [number(v, 2, 100) for v in curves["final_val_accuracy_mean"]],
        "final train − val gap, points (mean)": [number(v, 2, 100) for v in curves["final_gap_mean"]],
    })


def _html_table(frame: pd.DataFrame, row_classes: list[str] | None = None, text: bool = False) -> str:
    """An HTML table; ``text`` left-aligns every column (for tables of words rather than numbers)."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = []
    for i, row in enumerate(frame.itertuples(index=False)):
        css = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        body.append(f"<tr{css}>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>")
    css = " class='text'" if text else ""
    return f"<table{css}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _markdown_table(frame: pd.DataFrame) -> str:
    def cell(value) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in frame.columns) + " |",
             "|" + "|".join("---" for _ in frame.columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def _round_frame(frame: pd.DataFrame, digits: int = 4) -> pd.DataFrame:
    shown = frame.copy()
    for column in shown.columns:
        if pd.api.types.is_float_dtype(shown[column]):
            shown[column] = [("—" if pd.isna(v) else f"{v:.{digits}g}") for v in shown[column]]
    return shown


def reproduce_commands(data: StudyData) -> list[str]:
    """The study command as it was run (from study.json) and this report's command."""
    commands = []
    argv = (data.definition or {}).get("command") or []
    if argv:
        program = argv[0]
        if program.endswith(("ablate.py", "experiments.ablate")):
            argv = ["python", "-m", "experiments.ablate", *argv[1:]]
        else:
            argv = ["python", *argv]
        argv = [a for a in argv if a != "--worker-only"]
        if "--study" not in argv and not any(a.startswith("--study=") for a in argv):
            argv += ["--study", data.study]
        if "--tracking-uri" not in argv and not any(a.startswith("--tracking-uri=") for a in argv):
            argv += ["--tracking-uri", data.tracking_uri]
        commands.append(shlex.join(argv))
    commands.append(shlex.join(["python", "-m", "experiments.report", "--study", data.study,
                                "--tracking-uri", data.tracking_uri]))
    return commands


def _environment(data: StudyData) -> dict | None:
    ordered = pd.concat([data.finished[data.finished["arm"] == data.baseline], data.finished])
    for run_id in ordered["run_id"].drop_duplicates()[:3]:
        record = store.read_json_artifact(run_id, store.ENVIRONMENT_ARTIFACT)
        if record is not None:
            return record
    return None


def _configuration_tables(data: StudyData) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    """(baseline config as field/value, per-arm differences from it)."""
    if not data.definition:
        return None, None
    configs = {}
    for cell in data.definition.get("cells", []):
        configs.setdefault(cell["arm"], cell["config"])
    base = configs.get(data.baseline)
    baseline_table = (pd.DataFrame({"field": list(base), "baseline value": [json.dumps(v) for v in base.values()]})
                      if base else None)
    seeds = data.planned.groupby("arm", sort=False)["seed"].apply(lambda s: ", ".join(map(str, sorted(s))))
    arms_table = pd.DataFrame({
        "arm": list(configs),
        "seeds": [seeds.get(a, "") for a in configs],
        "differs from the baseline in": [
            ", ".join(f"{k}={json.dumps(after)}" for k, (_, after) in _config_changes(data, a).items()) or "—"
            for a in configs
        ],
    })
    return baseline_table, arms_table


def _load_test_images(data: StudyData, data_dir) -> tuple[np.ndarray | None, str | None]:
    """MNIST test images for the examples figure, or (None, why not). Never downloads."""
    from .data import DATA_DIR_ENV, DataError, load_mnist

    candidates = [data_dir, os.environ.get(DATA_DIR_ENV), ((data.definition or {}).get("data") or {}).get("source")]
    chosen = next((c for c in candidates if c and Path(c).exists()), None)
    if chosen is None:
        return None, (f"MNIST test images were not found (no --data-dir, ${DATA_DIR_ENV} unset, and the study's "
                      "data source is not on this machine), so the figure of examples the arms get wrong is "
                      "left out. Pass --data-dir to include it.")
    try:
        mnist = load_mnist(chosen)
    except DataError as error:
        return None, f"MNIST test images could not be loaded from {chosen} ({error}); the examples figure is left out."
    if data.labels is not None and not np.array_equal(mnist.y_test, data.labels):
        return None, f"the test labels in {chosen} do not match the runs' predictions; the examples figure is left out."
    return mnist.x_test, None


@dataclass
class Report:
    """What ``write_study_report`` produced."""

    output_dir: Path
    summary: pd.DataFrame
    files: list[Path]
    notes: list[str]

    @property
    def html_path(self) -> Path:
        return self.output_dir / "report.html"


def write_study_report(study_name: str, output_dir: str | os.PathLike | None = None,
                       parent_run_id: str | None = None, *, tracking_uri: str | None = None,
                       data_dir: str | os.PathLike | None = None, threshold: float = DEFAULT_THRESHOLD,
                       confidence: float = stats.DEFAULT_CONFIDENCE, log_to_mlflow: bool = True,
                       equivalence_margin: float = 0.001) -> Report:
    """Compute the study's statistics, write CSVs, figures, report.html and report.md, log them under ``report/``.

    ``output_dir`` None means ``reports/<study>``; ``parent_run_id`` None means the study's parent run.
    """
    data = gather_study(study_name, tracking_uri)
    if parent_run_id is not None:
        data.parent_run_id = parent_run_id
    output = Path(output_dir) if output_dir is not None else DEFAULT_REPORT_ROOT / study_name
    (output / "figures").mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    notes: list[str] = []

    def save_csv(frame: pd.DataFrame, name: str) -> None:
        path = output / name
        frame.to_csv(path, index=False)
        files.append(path)

    summary = summary_table(data, confidence)
    save_csv(summary, "ablation_summary.csv")
    arms = list(summary["arm"])
    if (summary["n_seeds"] < 2).any() and (summary["n_seeds"] > 0).any():
        few = ", ".join(summary.loc[(summary["n_seeds"] < 2) & (summary["n_seeds"] > 0), "arm"])
        notes.append(f"Fewer than two finished seeds for {few}: confidence intervals and seed-level tests cannot "
                     "be computed for them (shown as “no CI” / n/a, NaN in the CSV). Run more seeds "
                     "(--seeds 3 or more) for intervals.")
    smallest = int(summary.loc[summary["n_seeds"] >= 2, "n_seeds"].min()) if (summary["n_seeds"] >= 2).any() else 0
    if 2 <= smallest <= 4:
        from scipy.stats import t as student_t

        multiplier = student_t.ppf(0.5 + confidence / 2, smallest - 1)
        notes.append(f"With {smallest} seeds a {round(100 * confidence)}% t interval is the mean ± {multiplier:.2f} "
                     "standard errors, so intervals are wide and seed-level tests weak; 5 or more seeds give "
                     "intervals worth reading.")
    if not (summary["arm"] == data.baseline).any() or summary.loc[summary["arm"] == data.baseline, "n_seeds"].sum() == 0:
        notes.append(f"The baseline arm {data.baseline!r} has no finished run: no arm can be compared with it.")
    n_tests = int(summary["p_value"].notna().sum())

    curves_per_run = curves = None
    if not data.histories.empty:
        curves_per_run = stats.learning_curve_table(data.histories, threshold)
        curves = stats.learning_curve_summary(curves_per_run, threshold)
        curves = curves.set_index("arm").reindex([a for a in arms if a in set(curves["arm"])]).reset_index()
        save_csv(curves, "learning_curves.csv")
        save_csv(curves_per_run, "learning_curves_per_run.csv")

    effects = anova = None
    if study_name == "factorial":
        try:
            effects, anova = stats.factorial_effects(data.finished, confidence)
            save_csv(effects, "factorial_effects.csv")
            save_csv(anova, "factorial_anova.csv")
        except ValueError as error:
            notes.append(f"Factorial analysis skipped: {error}")

    figures: list[tuple[str, bytes, str]] = []  # file name, PNG, caption

    def add_figure(name: str, figure, caption: str) -> None:
        if figure is None:
            return
        png = _figure_png(figure)
        path = output / "figures" / name
        path.write_bytes(png)
        files.append(path)
        figures.append((name, png, caption))

    level = f"{round(100 * confidence)}%"
    if len(data.finished):
        add_figure("test_error.png", error_figure(summary, data.finished, data.baseline, confidence),
                   f"Test error per arm: mean over seeds with its {level} t interval; dots are single seeds; "
                   "the dashed line is the baseline's mean.")
    if not data.histories.empty:
        add_figure("learning_curves.png", learning_curves_figure(data.histories, arms, data.baseline, confidence),
                   f"Mean validation accuracy and loss per epoch over seeds, with the {level} interval as a band.")
    if data.predicted_by_run:
        add_figure("confusion_differences.png", confusion_difference_figure(data, arms),
                   "Left: the baseline's off-diagonal confusions (mean count per seed). Then, per arm, its mean "
                   "confusion counts minus the baseline's: red cells are mistakes the arm makes more often.")
        images, why_not = _load_test_images(data, data_dir)
        if images is None:
            notes.append(why_not)
        else:
            add_figure("worse_examples.png", examples_figure(data, arms, images),
                       "Test images each arm gets wrong while the baseline, trained with the same seed, gets them "
                       "right; most consistent over seeds first. Titles: true→predicted (seeds where it happens).")
    if effects is not None:
        add_figure("factorial_effects.png", factorial_figure(effects, confidence),
                   f"Main effects (on minus off, averaged over the other components) and two-way interactions, "
                   f"with {level} intervals from the OLS fit.")

    sentences = [arm_sentence(data, row, n_tests, confidence) for _, row in summary.iterrows()]
    context = {
        "data": data, "summary": summary, "sentences": sentences, "notes": notes, "figures": figures,
        "curves": curves, "effects": effects, "anova": anova, "confidence": confidence, "threshold": threshold,
        "environment": _environment(data), "commands": reproduce_commands(data),
        "generated": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    html_path = output / "report.html"
    html_path.write_text(_render_html(context), encoding="utf-8")
    markdown_path = output / "report.md"
    markdown_path.write_text(_render_markdown(context), encoding="utf-8")
    files += [html_path, markdown_path]
    if log_to_mlflow and data.parent_run_id:
        tracking.log_files(data.parent_run_id, [
            (path, REPORT_ARTIFACT_DIR if str(path.relative_to(output).parent) == "."
             else f"{REPORT_ARTIFACT_DIR}/{path.relative_to(output).parent}") for path in files])
    return Report(output, summary, files, notes)


def _row_class(row: pd.Series, baseline: str) -> str:
    if row["n_seeds"] == 0 or row["n_failed"]:
        return "failed"
    if row["arm"] != baseline and not pd.isna(row["p_value_holm"]) and row["p_value_holm"] < SIGNIFICANCE_LEVEL:
        return "sig"
    return ""


def _method_paragraphs(confidence: float, threshold: float) -> list[str]:
    level = f"{round(100 * confidence)}%"
    return [
        f"Each arm's mean test accuracy over seeds comes with a {level} Student-t interval. Each arm is compared "
        "with the baseline run that used the same seed (a paired design): Δ is the mean of the per-seed "
        f"differences, with its {level} t interval, the paired t-test and, as a non-parametric check, the Wilcoxon "
        "signed-rank test (exact; with n seeds its smallest possible p is 2/2ⁿ, so it needs 6 or more seeds to "
        "reach 0.05). Cohen's d_z is the mean difference divided by the standard deviation of the differences.",
        "The t-test p-values are corrected for the number of arms compared with Holm's method (the family is the "
        "arms whose test could be computed). Δ and intervals are in percentage points of test accuracy.",
        "McNemar's exact test compares the per-example test predictions: for every seed, the images the baseline "
        "gets right and the arm wrong, and the reverse, are counted; the counts are summed over seeds and tested "
        "with an exact binomial test. It answers “do these trained models differ on which images they get "
        "right?” and treats images × seeds as independent, ignoring seed-to-seed variance, so it is far more "
        "sensitive than the seed-level t-test. Read the t-test as the main evidence.",
        f"Learning curves: epochs to reach {threshold:.2%} validation accuracy (first epoch at or above it, "
        "averaged over the seeds that reach it), the best epoch by validation accuracy, and the final gap between "
        "training and validation accuracy (negative when augmentation and dropout make the training pass harder).",
        "With fewer than two seeds an interval or seed-level test cannot be computed and none is shown.",
    ]


def _render_html(context: dict) -> str:
    data: StudyData = context["data"]
    summary: pd.DataFrame = context["summary"]
    esc = html.escape
    definition = data.definition or {}
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>Ablation report: {esc(data.study)}</title><style>{CSS}</style></head><body><main>",
        f"<h1>Ablation report: {esc(data.study)}</h1>",
        f"<div class='sub'>{esc(definition.get('description', ''))}<br>Baseline arm <b>{esc(data.baseline)}</b> · "
        f"{int(summary['n_seeds'].sum())} finished runs · parent run <code>{esc(str(data.parent_run_id))}</code> · "
        f"store <code>{esc(data.tracking_uri)}</code> · generated {esc(context['generated'])}</div>",
    ]
    parts += [f"<div class='note'>{esc(n)}</div>" for n in context["notes"]]
    parts.append("<h2>Findings</h2><ul class='findings'>")
    for (_, row), sentence in zip(summary.iterrows(), context["sentences"]):
        css = "base" if row["arm"] == data.baseline else _row_class(row, data.baseline).replace("failed", "bad")
        parts.append(f"<li class='{css}'>{esc(sentence)}</li>")
    parts.append("</ul>")
    parts.append("<h2>Summary</h2>")
    parts.append(_html_table(_display_summary(summary), [_row_class(r, data.baseline) for _, r in summary.iterrows()]))
    parts.append("<p class='sub'>Shaded rows: Holm-corrected paired t-test p &lt; 0.05. The CSV "
                 "(<code>ablation_summary.csv</code>) has the unrounded numbers as fractions.</p>")
    failures = [r for arm in summary["arm"] for r in _failure_reasons(data, arm)]
    if failures:
        parts.append("<h3>Runs that did not finish</h3><ul>" + "".join(f"<li>{esc(f)}</li>" for f in failures)
                     + "</ul>")
    parts.append("<h2>Figures</h2>")
    for name, png, caption in context["figures"]:
        encoded = base64.b64encode(png).decode("ascii")
        parts.append(f"<figure><img alt='{esc(name)}' src='data:image/png;base64,{encoded}'>"
                     f"<figcaption>{esc(caption)}</figcaption></figure>")
    if context["effects"] is not None:
        parts.append("<h2>Factorial analysis</h2><p>OLS of <code>" + esc(stats.FACTORIAL_FORMULA) + "</code>, "
                     "components coded −½ (off) / +½ (on).</p>")
        parts.append(_html_table(_round_frame(context["effects"])))
        parts.append("<h3>ANOVA (type II)</h3>" + _html_table(_round_frame(context["anova"])))
    if context["curves"] is not None:
        parts.append("<h2>Learning curves</h2>")
        parts.append(_html_table(_display_curves(context["curves"])))
    parts.append("<h2>Method</h2>" + "".join(f"<p>{esc(p)}</p>" for p in _method_paragraphs(
        context["confidence"], context["threshold"])))
    baseline_table, arms_table = _configuration_tables(data)
    parts.append("<h2>Configuration</h2>")
    if arms_table is not None:
        parts.append(_html_table(arms_table, text=True))
        parts.append("<details><summary>Baseline configuration (every field)</summary>"
                     + _html_table(baseline_table, text=True) + "</details>")
    else:
        parts.append("<p>The parent run has no study.json, so the configuration is not known here.</p>")
    environment = context["environment"]
    parts.append("<h2>Environment</h2>")
    if environment:
        git = environment.get("git", {})
        machine = environment.get("machine", {})
        parts.append(f"<p>Git commit <code>{esc(str(git.get('commit')))}</code>"
                     f"{' (uncommitted changes)' if git.get('dirty') else ''} · {esc(str(machine.get('platform')))} · "
                     f"Python {esc(str(machine.get('python')))} · {esc(str(machine.get('cpu_count')))} CPUs · "
                     f"devices {esc(', '.join(machine.get('tensorflow_devices', [])))}</p>")
        packages = pd.DataFrame(list(environment.get("packages", {}).items()), columns=["package", "version"])
        sha = pd.DataFrame(list(environment.get("data", {}).get("sha256", {}).items()), columns=["file", "sha256"])
        parts.append("<div class='grid'><div>" + _html_table(packages, text=True) + "</div><div>"
                     + _html_table(sha, text=True) + "</div></div>")
    else:
        parts.append("<p>No environment.json found on the study's runs.</p>")
    parts.append("<h2>Reproduce</h2><pre>" + esc("\n".join(context["commands"])) + "</pre>")
    parts.append("</main></body></html>")
    return "\n".join(parts)


def _render_markdown(context: dict) -> str:
    data: StudyData = context["data"]
    summary: pd.DataFrame = context["summary"]
    definition = data.definition or {}
    lines = [f"# Ablation report: {data.study}", "", definition.get("description", ""), "",
             f"Baseline arm **{data.baseline}**; parent run `{data.parent_run_id}`; store `{data.tracking_uri}`; "
             f"generated {context['generated']}.", ""]
    lines += [f"> **Note.** {n}\n" for n in context["notes"]]
    lines += ["## Findings", ""] + [f"- {s}" for s in context["sentences"]] + [""]
    lines += ["## Summary", "", _markdown_table(_display_summary(summary)), ""]
    failures = [r for arm in summary["arm"] for r in _failure_reasons(data, arm)]
    if failures:
        lines += ["### Runs that did not finish", ""] + [f"- {f}" for f in failures] + [""]
    lines += ["## Figures", ""]
    for name, _, caption in context["figures"]:
        lines += [f"![{name}](figures/{name})", "", f"*{caption}*", ""]
    if context["effects"] is not None:
        lines += ["## Factorial analysis", "", f"OLS of `{stats.FACTORIAL_FORMULA}`, components coded -1/2 / +1/2.",
                  "", _markdown_table(_round_frame(context["effects"])), "", "### ANOVA (type II)", "",
                  _markdown_table(_round_frame(context["anova"])), ""]
    if context["curves"] is not None:
        lines += ["## Learning curves", "", _markdown_table(_display_curves(context["curves"])), ""]
    lines += ["## Method", ""] + [p + "\n" for p in _method_paragraphs(context["confidence"], context["threshold"])]
    _, arms_table = _configuration_tables(data)
    if arms_table is not None:
        lines += ["## Configuration", "", _markdown_table(arms_table), ""]
    environment = context["environment"]
    if environment:
        git = environment.get("git", {})
        packages = ", ".join(f"{k} {v}" for k, v in environment.get("packages", {}).items())
        lines += ["## Environment", "", f"Git commit `{git.get('commit')}`; "
                  f"{environment.get('machine', {}).get('platform')}; {packages}.", ""]
    lines += ["## Reproduce", "", "```", *context["commands"], "```", ""]
    return "\n".join(lines)
