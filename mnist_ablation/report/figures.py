"""The report's figures, drawn from gathered data and the summary table (matplotlib object API, no pyplot)."""

from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure

from .. import stats
from ..plots import confusion_matrix, new_figure
from .analysis import shown_difference_interval
from .gather import StudyData

BASELINE_COLOR, ARM_COLOR, FAILED_COLOR = "#1f4e79", "#c55a11", "#999999"
SMALL_MULTIPLES_FROM = 6  # arms; with more, learning curves get one panel per arm
MAX_CONFUSION_PANELS = 8  # the baseline and the arms whose errors differ most from it


def png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def arm_colors(arms: list[str], baseline: str) -> dict[str, str]:
    palette = colormaps["tab10"]
    colors, index = {}, 0
    for arm in arms:
        if arm == baseline:
            colors[arm] = BASELINE_COLOR
        else:
            colors[arm] = palette((index + 1) % 10)
            index += 1
    return colors


def error_figure(summary: pd.DataFrame, finished: pd.DataFrame, baseline: str, confidence: float) -> Figure:
    """Test error per arm: mean over seeds with its interval (seeds and images random), each seed as a dot."""
    arms = list(summary["arm"])
    fig = new_figure(figsize=(9, 0.55 * len(arms) + 1.6))
    ax = fig.subplots()
    positions = np.arange(len(arms))[::-1]
    shown = []
    for y, row in zip(positions, summary.itertuples()):
        color = BASELINE_COLOR if row.arm == baseline else ARM_COLOR
        if row.n_seeds == 0:
            ax.text(0.5, y, f"{row.status}: no finished run", transform=ax.get_yaxis_transform(),
                    ha="center", va="center", color=FAILED_COLOR, style="italic")
            continue
        errors = 100 * (1 - finished.loc[finished["arm"] == row.arm, "test_accuracy"].to_numpy(float))
        mean = 100 * (1 - row.test_accuracy_mean)
        ax.scatter(errors, np.full(len(errors), y) + 0.18, s=14, color=color, alpha=0.45, zorder=2,
                   label="single seed" if not shown else None)
        shown += [mean, *errors]
        if not pd.isna(row.test_accuracy_ci_low):
            # The accuracy interval is built on the logit scale, so the error interval stays within [0, 100]%.
            low, high = 100 * (1 - row.test_accuracy_ci_high), 100 * (1 - row.test_accuracy_ci_low)
            ax.errorbar(mean, y, xerr=[[mean - low], [high - mean]], fmt="o", color=color, capsize=4,
                        markersize=7, lw=2, zorder=3)
            shown += [low, high]
        else:
            ax.plot(mean, y, "o", color=color, markersize=7, zorder=3)
            ax.annotate("no CI (1 seed)", (mean, y), xytext=(8, -4), textcoords="offset points", fontsize=8,
                        color=FAILED_COLOR)
    base = summary[summary["arm"] == baseline]
    if len(base) and not pd.isna(base["test_accuracy_mean"].iloc[0]):
        ax.axvline(100 * (1 - base["test_accuracy_mean"].iloc[0]), color=BASELINE_COLOR, ls="--", lw=1, alpha=0.7,
                   label="baseline mean")
    if shown:
        low, high = min(shown), max(shown)
        pad = max(0.05 * (high - low), 0.02)
        ax.set_xlim(max(0.0, low - pad), min(100.0, high + pad))
    ax.set_yticks(positions, arms)
    ax.set_xlabel(f"test error (%), mean over seeds with {round(100 * confidence)}% CI "
                  "(training seeds and test images random)")
    ax.set_title("Test error per arm (lower is better)")
    ax.grid(axis="x", alpha=0.3)
    ax.set_ylim(-0.7, len(arms) - 0.3)
    ax.legend(loc="best", fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def difference_figure(summary: pd.DataFrame, baseline: str, confidence: float) -> Figure | None:
    """Each arm minus the baseline, in points: the recipe-level interval and the this-test-set interval."""
    rows = summary[(summary["arm"] != baseline) & summary["delta_vs_baseline"].notna()]
    if rows.empty:
        return None
    fig = new_figure(figsize=(9, 0.6 * len(rows) + 1.8))
    ax = fig.subplots()
    positions = np.arange(len(rows))[::-1]
    margin = 100 * float(rows["equivalence_margin"].iloc[0])
    ax.axvspan(-margin, margin, color="#2e7d32", alpha=0.08, lw=0, label=f"equivalence margin ±{margin:.2f}")
    ax.axvline(0, color="black", lw=0.8)
    for y, (_, line), row in zip(positions, rows.iterrows(), rows.itertuples()):
        delta = 100 * row.delta_vs_baseline
        low, high, _ = shown_difference_interval(line)  # never beyond the differences accuracy allows
        low_fixed, high_fixed, _ = shown_difference_interval(line, "delta_ci_low_this_test_set",
                                                             "delta_ci_high_this_test_set")
        if not pd.isna(low):
            ax.errorbar(delta, y, xerr=[[delta - 100 * low], [100 * high - delta]],
                        fmt="o", color=ARM_COLOR, capsize=4, lw=2, markersize=7,
                        label="seeds and test images random" if y == positions[0] else None)
        else:
            ax.plot(delta, y, "o", color=ARM_COLOR, markersize=7)
        if not pd.isna(low_fixed):
            ax.errorbar(delta, y - 0.22, xerr=[[delta - 100 * low_fixed], [100 * high_fixed - delta]],
                        fmt="none", color=FAILED_COLOR, capsize=2, lw=1.2,
                        label="this test set only (seeds)" if y == positions[0] else None)
    ax.set_yticks(positions, rows["arm"])
    ax.set_xlabel(f"difference from {baseline} (points of test accuracy), {round(100 * confidence)}% CI")
    ax.set_title("Each arm against the baseline (paired by seed)")
    ax.grid(axis="x", alpha=0.3)
    ax.set_ylim(-0.8, len(rows) - 0.4)
    ax.legend(loc="best", fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def per_seed_figure(per_seed: pd.DataFrame, summary: pd.DataFrame, baseline: str) -> Figure | None:
    """Each arm minus the baseline on every paired seed (dots), its mean (bar) and its worst seed (ring), in points."""
    arms = [arm for arm in summary["arm"] if arm != baseline and arm in set(per_seed["arm"])]
    if not arms:
        return None
    fig = new_figure(figsize=(9, 0.55 * len(arms) + 1.8))
    ax = fig.subplots()
    ax.axvline(0, color="black", lw=0.8)
    positions = np.arange(len(arms))[::-1]
    for y, arm in zip(positions, arms):
        deltas = 100 * per_seed.loc[per_seed["arm"] == arm, "delta"].to_numpy()
        jitter = np.linspace(-0.12, 0.12, len(deltas)) if len(deltas) > 1 else np.zeros(1)
        ax.plot(deltas, y + jitter, "o", color=ARM_COLOR, alpha=0.75, markersize=5,
                label="one paired seed" if y == positions[0] else None)
        ax.plot([deltas.mean()] * 2, [y - 0.3, y + 0.3], color="black", lw=2,
                label="mean over seeds" if y == positions[0] else None)
        worst = int(np.argmin(deltas))
        ax.plot(deltas[worst], y + jitter[worst], "o", markersize=11, markerfacecolor="none",
                markeredgecolor=BASELINE_COLOR, label="worst seed" if y == positions[0] else None)
    ax.set_yticks(positions, arms)
    ax.set_xlabel(f"arm minus {baseline} on the same seed (points of test accuracy)")
    ax.set_title("Per-seed differences from the baseline")
    ax.grid(axis="x", alpha=0.3)
    ax.set_ylim(-0.8, len(arms) - 0.4)
    ax.legend(loc="best", fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def _curve_panel(ax, curves: pd.DataFrame, arm: str, color: str, width: float) -> None:
    curve = curves[curves["arm"] == arm].sort_values("epoch")
    if curve.empty:
        return
    x = curve["epoch"].to_numpy() + 1
    ax.plot(x, curve["mean"], marker="o", markersize=4, color=color, lw=width, label=arm)
    if curve["ci_low"].notna().any():
        if len(x) == 1:  # one epoch: a band has no width to show, so draw the interval as an error bar
            ax.errorbar(x, curve["mean"], yerr=[curve["mean"] - curve["ci_low"], curve["ci_high"] - curve["mean"]],
                        fmt="none", color=color, capsize=4)
        else:
            ax.fill_between(x, curve["ci_low"], curve["ci_high"], color=color, alpha=0.15, lw=0)


def learning_curves_figure(histories: pd.DataFrame, arms: list[str], baseline: str, confidence: float) -> Figure:
    """Mean validation accuracy and loss per epoch with the interval over seeds (clipped to the metric's range).

    Up to ``SMALL_MULTIPLES_FROM`` arms share two panels; more arms get one small panel each (validation
    accuracy), with the baseline drawn in every panel for reference.
    """
    level = f"{round(100 * confidence)}%"
    epochs = int(histories["epoch"].max()) + 1 if len(histories) else 1
    colors = arm_colors(arms, baseline)
    present = [a for a in arms if a in set(histories["arm"])]
    if len(present) < SMALL_MULTIPLES_FROM:
        fig = new_figure(figsize=(13, 4.8))
        axes = fig.subplots(1, 2)
        for ax, metric, label in ((axes[0], "val_accuracy", "validation accuracy"),
                                  (axes[1], "val_loss", "validation loss")):
            curves = stats.mean_curves(histories, metric, confidence)
            for arm in present:
                _curve_panel(ax, curves, arm, colors[arm], 2.2 if arm == baseline else 1.4)
            ax.set_xlabel("epoch")
            ax.set_ylabel(label)
            ax.set_title(f"Mean {label} ({level} interval over seeds)")
        axes[0].legend(fontsize=8, frameon=False, loc="lower right")
    else:
        columns = 4
        rows = math.ceil(len(present) / columns)
        fig = new_figure(figsize=(3.4 * columns, 2.6 * rows + 0.6))
        axes = np.atleast_1d(fig.subplots(rows, columns, sharex=True, sharey=True, squeeze=False)).ravel()
        curves = stats.mean_curves(histories, "val_accuracy", confidence)
        for ax, arm in zip(axes, present):
            if arm != baseline:
                _curve_panel(ax, curves, baseline, "#b0b8c4", 1.0)
            _curve_panel(ax, curves, arm, colors[arm], 1.8)
            ax.set_title(arm, fontsize=9)
        for ax in axes[len(present):]:
            ax.axis("off")
        fig.suptitle(f"Mean validation accuracy per arm ({level} interval over seeds; grey: {baseline})", fontsize=11)
    for ax in fig.axes:
        if not ax.axison:
            continue
        ax.grid(alpha=0.3)
        ax.set_xlim(0.5, epochs + 0.5)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    return fig


def _mean_confusion(data: StudyData, arm: str) -> np.ndarray | None:
    runs = data.finished[data.finished["arm"] == arm]
    matrices = [confusion_matrix(data.labels, data.predicted_by_run[r]) for r in runs["run_id"]]
    return np.mean(matrices, axis=0) if matrices else None


def confusion_difference_figure(data: StudyData, arms: list[str]) -> Figure | None:
    """The baseline's errors (mean count per seed) and, per arm, its error counts minus the baseline's."""
    base = _mean_confusion(data, data.baseline)
    if base is None:
        return None
    off_diagonal = ~np.eye(10, dtype=bool)
    differences = [(a, _mean_confusion(data, a)) for a in arms if a != data.baseline]
    differences = [(a, m - base) for a, m in differences if m is not None]
    differences.sort(key=lambda item: -np.abs(item[1][off_diagonal]).sum())
    differences = differences[:MAX_CONFUSION_PANELS - 1]
    panels = [(data.baseline, base, "baseline errors (mean per seed)")]
    panels += [(a, m, f"{a} minus baseline") for a, m in differences]
    columns = min(4, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig = new_figure(figsize=(4.1 * columns, 3.9 * rows))
    axes = fig.subplots(rows, columns, squeeze=False)
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


def examples_figure(data: StudyData, arms: list[str], test_images: np.ndarray, per_arm: int = 8) -> Figure | None:
    """Per arm, a row of test images it gets wrong while the baseline (same seed) gets them right."""
    rows = [(a, worse_examples(data, a, per_arm)) for a in arms if a != data.baseline]
    rows = [(a, e) for a, e in rows if len(e)]
    if not rows:
        return None
    fig = new_figure(figsize=(1.35 * per_arm + 1.6, 1.65 * len(rows)))
    axes = fig.subplots(len(rows), per_arm, squeeze=False)
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


def factorial_figure(effects: pd.DataFrame, confidence: float) -> Figure:
    """Main effects and interactions with their intervals (seeds and images random), in accuracy points."""
    fig = new_figure(figsize=(8, 0.42 * len(effects) + 1.4))
    ax = fig.subplots()
    y = np.arange(len(effects))[::-1]
    for position, row in zip(y, effects.itertuples()):
        color = BASELINE_COLOR if row.kind == "main effect" else ARM_COLOR
        if pd.isna(row.ci_low):
            ax.plot(100 * row.effect, position, "o", color=color, label=row.kind)
            continue
        ax.errorbar(100 * row.effect, position, xerr=[[100 * (row.effect - row.ci_low)],
                                                      [100 * (row.ci_high - row.effect)]],
                    fmt="o", color=color, capsize=3, lw=1.5, label=row.kind)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=8, frameon=False)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(y, [t.replace(":", " \u00d7 ") for t in effects["term"]])
    ax.set_xlabel(f"effect on test accuracy (points), {round(100 * confidence)}% CI, seeds and test images random")
    ax.set_title("Factorial: main effects (on minus off) and interactions")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig
