"""A study's runs as tidy pandas DataFrames: one row per (arm, seed) run, and a per-arm summary.

    from mnist_ablation import compare
    runs = compare.study_runs("leave-one-out")      # one row per finished cell run
    compare.arm_summary(runs)                       # n, mean, std, difference from the baseline (usable runs)
    compare.study_summary("leave-one-out")          # summary.csv's table: the same, and each arm's failed cells
    runs.pivot_table(index="arm", columns="seed", values="test_accuracy")
"""

from __future__ import annotations

import pandas as pd

from . import store, sweep
from .studies import baseline_arm_of
from .sweep import arm_summary

__all__ = ["arm_summary", "study_runs", "study_summary"]


def study_runs(study: str, tracking_uri: str | None = None, include_unfinished: bool = False,
               all_sweeps: bool = False) -> pd.DataFrame:
    """One row per cell run of ``study``: study, arm, seed, run_id, status, config fields, final metrics.

    By default only FINISHED runs of the study's current definition; ``all_sweeps`` keeps runs of earlier
    definitions (say another ``--epochs``), ``include_unfinished`` keeps FAILED, KILLED and RUNNING runs.
    """
    from .tracking import ensure_tracking_uri

    ensure_tracking_uri(tracking_uri)
    return store.cell_runs(study, include_unfinished=include_unfinished, all_sweeps=all_sweeps)


def study_summary(study: str, baseline: str | None = None, tracking_uri: str | None = None) -> pd.DataFrame:
    """``summary.csv``'s table of ``study`` (``sweep.study_summary`` over every cell run of its current definition):
    per arm, its usable runs' n, mean, std and difference from ``baseline`` (default: the study's baseline arm,
    ``studies.baseline_arm_of``), and its failed cells."""
    runs = study_runs(study, tracking_uri, include_unfinished=True)
    baseline = baseline if baseline is not None else baseline_arm_of(study, store.study_definition(study))
    return sweep.study_summary(runs, baseline)
