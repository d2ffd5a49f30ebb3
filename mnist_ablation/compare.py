"""A study's runs as tidy pandas DataFrames: one row per (arm, seed) run, and a per-arm summary.

    from mnist_ablation import compare
    runs = compare.study_runs("leave-one-out")      # one row per finished cell run
    compare.arm_summary(runs)                       # n, mean, std, difference from the baseline (usable runs)
    runs.pivot_table(index="arm", columns="seed", values="test_accuracy")
"""

from __future__ import annotations

import pandas as pd

from . import store
from .sweep import arm_summary

__all__ = ["arm_summary", "study_runs"]


def study_runs(study: str, tracking_uri: str | None = None, include_unfinished: bool = False,
               all_sweeps: bool = False) -> pd.DataFrame:
    """One row per cell run of ``study``: study, arm, seed, run_id, status, config fields, final metrics.

    By default only FINISHED runs of the study's current definition; ``all_sweeps`` keeps runs of earlier
    definitions (say another ``--epochs``), ``include_unfinished`` keeps FAILED, KILLED and RUNNING runs.
    """
    from .tracking import ensure_tracking_uri

    ensure_tracking_uri(tracking_uri)
    return store.cell_runs(study, include_unfinished=include_unfinished, all_sweeps=all_sweeps)
