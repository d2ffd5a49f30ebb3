"""A study's runs as tidy pandas DataFrames: one row per (arm, seed) run, and a per-arm summary.

    from mnist_ablation import compare
    runs = compare.study_runs("leave-one-out")      # one row per finished cell run
    compare.arm_summary(runs)                       # n, mean, std, difference from the baseline
    runs.pivot_table(index="arm", columns="seed", values="test_accuracy")
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from . import store


def study_runs(study: str, tracking_uri: str | None = None, include_unfinished: bool = False,
               all_sweeps: bool = False) -> pd.DataFrame:
    """One row per cell run of ``study``: study, arm, seed, run_id, status, config fields, final metrics.

    By default only FINISHED runs of the study's current definition; ``all_sweeps`` keeps runs of earlier
    definitions (say another ``--epochs``), ``include_unfinished`` keeps FAILED, KILLED and RUNNING runs.
    """
    from .tracking import ensure_tracking_uri

    ensure_tracking_uri(tracking_uri)
    return store.cell_runs(study, include_unfinished=include_unfinished, all_sweeps=all_sweeps)


def arm_summary(runs: pd.DataFrame, baseline: str = "baseline", metric: str = "test_accuracy") -> pd.DataFrame:
    """Per arm: n, mean and standard deviation of ``metric``, and the difference from the baseline's mean."""
    if runs.empty:
        return pd.DataFrame(columns=["arm", "n", f"{metric}_mean", f"{metric}_std", "delta_vs_baseline"])
    grouped = runs.groupby("arm", sort=False)[metric]
    summary = pd.DataFrame({
        "n": grouped.count(),
        f"{metric}_mean": grouped.mean(),
        f"{metric}_std": grouped.std(ddof=1),
    }).reset_index()
    base = summary.loc[summary["arm"] == baseline, f"{metric}_mean"]
    summary["delta_vs_baseline"] = summary[f"{metric}_mean"] - (base.iloc[0] if len(base) else np.nan)
    return summary
