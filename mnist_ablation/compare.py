"""A study's runs as tidy pandas DataFrames: one row per (arm, seed) run, and a per-arm summary.

    from mnist_ablation import compare
    runs = compare.study_runs("leave-one-out")      # one row per finished child run
    compare.arm_summary(runs)                       # n, mean, std, difference from the baseline
"""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from .config import FIELD_NAMES, ConfigError, parse_value

ROLE_TAG = "mnist_ablation.role"
STUDY_DEFINITION_ARTIFACT = "study.json"


def experiment_name(study: str) -> str:
    """The MLflow experiment that holds an ablation study."""
    return f"ablation/{study}"


def find_parent_run(study: str, experiment_id: str | None = None):
    """The study's parent run (the oldest one, should several exist), or None."""
    client = MlflowClient()
    if experiment_id is None:
        experiment = client.get_experiment_by_name(experiment_name(study))
        if experiment is None:
            return None
        experiment_id = experiment.experiment_id
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{ROLE_TAG}` = 'study' and tags.study = '{study}'",
        order_by=["attributes.start_time ASC"],
        max_results=10,
    )
    return runs[0] if runs else None


def study_definition(study: str) -> dict | None:
    """The ``study.json`` of the study's latest invocation (arms, seeds, config hashes), if any."""
    parent = find_parent_run(study)
    if parent is None:
        return None
    try:
        path = mlflow.artifacts.download_artifacts(run_id=parent.info.run_id, artifact_path=STUDY_DEFINITION_ARTIFACT)
    except Exception:  # noqa: BLE001 - a parent created but not yet written has no definition
        return None
    with open(path) as handle:
        return json.load(handle)


def _typed_param(name: str, text):
    if text is None or (isinstance(text, float) and np.isnan(text)):
        return None
    try:
        return parse_value(name, str(text))
    except ConfigError:
        return text


def study_runs(study: str, tracking_uri: str | None = None, include_unfinished: bool = False,
               all_sweeps: bool = False) -> pd.DataFrame:
    """One row per child run of ``study``: study, arm, seed, run_id, status, config fields, final metrics.

    By default only FINISHED runs of the study's current definition (the config hashes in its
    ``study.json``) are returned; ``all_sweeps`` keeps runs of earlier definitions (say another
    ``--epochs``), ``include_unfinished`` keeps FAILED, KILLED and RUNNING runs.
    """
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    experiment = MlflowClient().get_experiment_by_name(experiment_name(study))
    columns = ["study", "arm", "seed", "run_id", "run_name", "status", "config_hash"]
    if experiment is None:
        return pd.DataFrame(columns=columns)
    raw = mlflow.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'cell'", max_results=50_000,
    )
    if raw.empty:
        return pd.DataFrame(columns=columns)
    frame = pd.DataFrame({
        "study": study,
        "arm": raw["tags.arm"],
        "seed": raw["tags.seed"].astype(int),
        "run_id": raw["run_id"],
        "run_name": raw.get("tags.mlflow.runName"),
        "status": raw["status"],
        "config_hash": raw["tags.config_hash"],
        "start_time": raw["start_time"],
        "end_time": raw["end_time"],
        "failure_reason": raw.get("tags.failure_reason", pd.Series([None] * len(raw))),
    })
    for name in FIELD_NAMES:
        if f"params.{name}" in raw and name != "seed":
            frame[name] = [_typed_param(name, v) for v in raw[f"params.{name}"]]
    for column in sorted(c for c in raw.columns if c.startswith("metrics.")):
        name = column[len("metrics."):]
        # A per-epoch metric named like a config field (learning_rate) keeps its last value as final_<name>,
        # so the column of that name stays the configured value.
        frame[f"final_{name}" if name in FIELD_NAMES else name] = raw[column].to_numpy()
    if not all_sweeps:
        definition = study_definition(study)
        if definition is not None:
            frame = frame[frame["config_hash"].isin({c["config_hash"] for c in definition["cells"]})]
    if not include_unfinished:
        frame = frame[frame["status"] == "FINISHED"]
    order = _arm_order(study, frame["arm"])
    frame = frame.assign(_order=frame["arm"].map(order)).sort_values(["_order", "seed", "start_time"])
    return frame.drop(columns="_order").reset_index(drop=True)


def _arm_order(study: str, arms: pd.Series) -> dict[str, int]:
    definition = study_definition(study)
    known = list(dict.fromkeys(c["arm"] for c in definition["cells"])) if definition else []
    extra = sorted(set(arms) - set(known))
    return {arm: i for i, arm in enumerate(known + extra)}


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
