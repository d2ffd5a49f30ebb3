"""Ensembles of finished study runs: average their logged test probabilities, choose members on validation.

No retraining and no re-inference: every cell run logged ``predictions/test_predictions.parquet``
(and ``predictions/test_predictions_tta.parquet`` when it ran with ``tta_views``), so an ensemble is
the mean of those probabilities. Members are chosen by their final ``val_accuracy`` alone (ties broken
by lower ``val_loss``, then run id); test metrics are never read to choose.

The ensemble is logged as a run of its own in the study's experiment, a child of the study's parent
run, tagged ``mnist_ablation.role=ensemble``, with the metrics, figure and predictions of any run, so
reports, the explorer and pandas can treat it like one and trace it back to its members:

    from mnist_ablation import ensemble
    logged = ensemble.log_study_ensemble("architecture", top_k=5)
    ensemble.ensemble_runs("architecture")     # one row per ensemble run

The ensemble has no ``val_accuracy``: members' validation predictions are not logged, so it cannot
be computed without re-inference. Its ``members_val_accuracy_mean`` (mean over members) is logged instead.
"""

from __future__ import annotations

import json
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import mlflow
import numpy as np
import pandas as pd
from mlflow.entities import Param
from mlflow.tracking import MlflowClient

from . import compare, tracking
from .config import FIELD_NAMES
from .train import categorical_loss

ROLE = "ensemble"
SELECTION_METRIC = "val_accuracy"  # the only quantity members are chosen by
TIE_BREAK_METRIC = "val_loss"  # lower is better; then run_id, so the choice is deterministic
ENSEMBLE_ARTIFACT = "ensemble.json"
MEMBERS_PLOT = "plots/members_val_accuracy.png"
NUM_CLASSES = 10
PROBABILITY_COLUMNS = [f"prob_{k}" for k in range(NUM_CLASSES)]


class EnsembleError(ValueError):
    """The runs asked for cannot form an ensemble (none finished, too few, mismatched predictions)."""


@dataclass
class EnsembleResult:
    """An ensemble's members, its averaged test probabilities and its metrics."""

    study: str
    arm: str  # "ensemble-top{K}" or "ensemble-{ARM}"
    members: pd.DataFrame  # the chosen rows of compare.study_runs, best validation accuracy first
    labels: np.ndarray  # (10000,)
    probabilities: np.ndarray  # (10000, 10) mean of the members' probabilities
    tta_probabilities: np.ndarray | None = None  # when every member logged TTA predictions
    seed: int | None = None  # when members were restricted to one seed (a repeat of the ensemble)
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def member_run_ids(self) -> list[str]:
        return list(self.members["run_id"])

    @property
    def run_name(self) -> str:
        return self.arm if self.seed is None else f"{self.arm}-seed{self.seed}"


def ensemble_arm_name(top_k: int | None = None, arm: str | None = None) -> str:
    """``ensemble-top{K}``, ``ensemble-{ARM}`` or ``ensemble-{ARM}-top{K}``."""
    if arm is None and top_k is None:
        raise EnsembleError("an ensemble needs --top-k K, --arm ARM or both.")
    parts = ["ensemble"] + ([arm] if arm is not None else []) + ([f"top{top_k}"] if top_k is not None else [])
    return "-".join(parts)


def select_members(runs: pd.DataFrame, top_k: int | None = None, arm: str | None = None,
                   seed: int | None = None) -> pd.DataFrame:
    """The runs to ensemble: those of ``arm`` and ``seed`` (if given), the ``top_k`` best by ``val_accuracy``.

    Only ``val_accuracy`` (then ``val_loss``, then ``run_id`` for ties) is read: test columns never
    influence the choice. Runs trained with ``validation="test"`` are refused, because their
    "validation" accuracy is measured on the test set.
    """
    if top_k is not None and top_k < 1:
        raise EnsembleError(f"top_k={top_k} is invalid: expected an integer >= 1.")
    candidates = runs
    if arm is not None:
        known = sorted(set(runs["arm"])) if "arm" in runs else []
        candidates = candidates[candidates["arm"] == arm]
        if candidates.empty:
            raise EnsembleError(
                f"no finished runs of arm {arm!r}; arms with finished runs: {', '.join(known) or 'none'}."
            )
    if seed is not None:
        candidates = candidates[candidates["seed"] == seed]
        if candidates.empty:
            raise EnsembleError(f"no finished runs with seed {seed} (arm {arm!r}).")
    if candidates.empty:
        raise EnsembleError("no finished runs to ensemble; run the study first (python -m experiments.ablate).")
    if SELECTION_METRIC not in candidates or candidates[SELECTION_METRIC].isna().any():
        missing = candidates.loc[candidates.get(SELECTION_METRIC, pd.Series(np.nan, candidates.index)).isna(), "run_id"]
        raise EnsembleError(f"runs {', '.join(missing)} have no final {SELECTION_METRIC} metric to choose members by.")
    if "validation" in candidates and (candidates["validation"] == "test").any():
        leaking = candidates.loc[candidates["validation"] == "test", "run_id"]
        raise EnsembleError(
            f"runs {', '.join(leaking)} were trained with validation='test', so their val_accuracy is test "
            "accuracy and choosing members by it would tune on the test set; use runs with validation='split'."
        )
    if top_k is not None and top_k > len(candidates):
        raise EnsembleError(
            f"top_k={top_k} but only {len(candidates)} finished run(s) match; pass --top-k {len(candidates)} or less, "
            "or run more seeds."
        )
    tie_break = candidates[TIE_BREAK_METRIC] if TIE_BREAK_METRIC in candidates else pd.Series(0.0, candidates.index)
    ordered = candidates.assign(_tie=tie_break.fillna(np.inf)).sort_values(
        [SELECTION_METRIC, "_tie", "run_id"], ascending=[False, True, True]
    ).drop(columns="_tie")
    chosen = ordered if top_k is None else ordered.head(top_k)
    return chosen.reset_index(drop=True)


def average_predictions(frames: Sequence[pd.DataFrame]) -> tuple[np.ndarray, np.ndarray]:
    """(labels, mean probabilities) of several runs' prediction frames; they must cover the same images."""
    if not frames:
        raise EnsembleError("no prediction frames to average.")
    reference = frames[0].sort_values("index")
    labels = reference["label"].to_numpy(np.int64)
    total = np.zeros((len(reference), NUM_CLASSES), dtype=np.float64)
    for number, frame in enumerate(frames):
        frame = frame.sort_values("index")
        if len(frame) != len(reference) or not np.array_equal(frame["label"].to_numpy(np.int64), labels):
            raise EnsembleError(
                f"member {number} predicted {len(frame)} images with other labels than member 0 ({len(reference)}); "
                "members must be evaluated on the same test set."
            )
        total += frame[PROBABILITY_COLUMNS].to_numpy(np.float64)
    return labels, (total / len(frames)).astype(np.float32)


def accuracy(labels: np.ndarray, probabilities: np.ndarray) -> float:
    return float(np.mean(probabilities.argmax(axis=1) == labels))


def build_ensemble(study: str, top_k: int | None = None, arm: str | None = None, seed: int | None = None,
                   runs: pd.DataFrame | None = None) -> EnsembleResult:
    """Choose members of ``study`` on validation accuracy and average their logged test probabilities."""
    if runs is None:
        runs = compare.study_runs(study)
    members = select_members(runs, top_k=top_k, arm=arm, seed=seed)
    labels, probabilities = average_predictions([tracking.read_predictions(r) for r in members["run_id"]])
    result = EnsembleResult(study, ensemble_arm_name(top_k, arm), members, labels, probabilities, seed=seed)
    result.metrics = {
        "test_accuracy": accuracy(labels, probabilities),
        "test_loss": categorical_loss(labels, probabilities),
        "ensemble_size": float(len(members)),
        "members_val_accuracy_mean": float(members[SELECTION_METRIC].mean()),
    }
    # Reported for comparison only (how much the ensemble adds over its average member), never for choosing.
    if "test_accuracy" in members:
        result.metrics["members_test_accuracy_mean"] = float(members["test_accuracy"].mean())
    if "train_seconds" in members:
        result.metrics["train_seconds"] = float(members["train_seconds"].sum())
    tta_frames = [_read_optional(r, tracking.TTA_PREDICTIONS_ARTIFACT) for r in members["run_id"]]
    if all(frame is not None for frame in tta_frames):
        _, result.tta_probabilities = average_predictions(tta_frames)
        result.metrics["test_accuracy_tta"] = accuracy(labels, result.tta_probabilities)
        result.metrics["test_loss_tta"] = categorical_loss(labels, result.tta_probabilities)
    return result


def _read_optional(run_id: str, artifact: str) -> pd.DataFrame | None:
    """A run's artifact as a frame, or None if the run did not log it (e.g. no TTA)."""
    listed = {f.path for f in MlflowClient().list_artifacts(run_id, str(Path(artifact).parent))}
    return tracking.read_predictions(run_id, artifact) if artifact in listed else None


def _shared_params(member_run_ids: Sequence[str]) -> dict[str, str]:
    """Config params on which every member agrees (all but seed for a one-arm ensemble).

    Read from the members' logged params, not from ``compare.study_runs``, whose ``learning_rate``
    column holds the per-epoch metric of the same name.
    """
    client = MlflowClient()
    logged = [client.get_run(run_id).data.params for run_id in member_run_ids]
    return {
        name: logged[0][name]
        for name in FIELD_NAMES
        if name != "seed" and all(name in params for params in logged)
        and len({params[name] for params in logged}) == 1
    }


def members_figure(members: pd.DataFrame):
    """Bar chart of the members' final validation accuracy (what they were chosen by)."""
    import matplotlib.pyplot as plt

    from . import plots  # noqa: F401 - selects the headless backend

    names = [str(n) if isinstance(n, str) and n else r[:8] for n, r in zip(members.get("run_name", members["run_id"]),
                                                                               members["run_id"])]
    values = members[SELECTION_METRIC].to_numpy(float)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(names) + 2), 5))
    ax.bar(range(len(names)), values, color="tab:blue")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    low, high = float(values.min()), float(values.max())
    margin = max((high - low) * 0.5, 0.002)
    ax.set_ylim(max(0.0, low - margin), min(1.0, high + margin))
    ax.set_ylabel("final validation accuracy")
    ax.set_title(f"Ensemble members ({len(names)}), chosen by validation accuracy")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


@dataclass
class LoggedEnsemble:
    run_id: str
    result: EnsembleResult
    reused: bool  # True when an identical ensemble (same members) was already logged


def find_logged_ensemble(study: str, arm: str, member_run_ids: Sequence[str], seed: int | None = None):
    """The FINISHED ensemble run of ``study`` with this arm name, seed and exactly these members, or None."""
    runs = ensemble_runs(study)
    if runs.empty:
        return None
    wanted = ",".join(member_run_ids)
    same = runs[(runs["arm"] == arm) & (runs["member_run_ids"] == wanted)]
    same = same[same["seed"].isna()] if seed is None else same[same["seed"] == seed]
    return same.iloc[0]["run_id"] if len(same) else None


def log_ensemble(result: EnsembleResult, command: Sequence[str] | None = None) -> str:
    """Log ``result`` as a child run of the study's parent run; returns its run id.

    The run is FINISHED only once every artifact landed; any error ends it FAILED with ``failure_reason``.
    """
    import matplotlib.pyplot as plt

    from .plots import confusion_matrix_figure

    experiment_name = compare.experiment_name(result.study)
    experiment_id = tracking.get_or_create_experiment(experiment_name)
    parent = compare.find_parent_run(result.study, experiment_id)
    member_ids = ",".join(result.member_run_ids)
    tags = {"study": result.study, "arm": result.arm, compare.ROLE_TAG: ROLE, "member_run_ids": member_ids,
            "selection": f"top by final {SELECTION_METRIC}"}
    if result.seed is not None:
        tags["seed"] = str(result.seed)
    if parent is not None:
        tags["mlflow.parentRunId"] = parent.info.run_id
    run = mlflow.start_run(experiment_id=experiment_id, run_name=result.run_name, tags=tags)
    run_id = run.info.run_id
    try:
        client = MlflowClient()
        params = {**_shared_params(result.member_run_ids), "member_run_ids": member_ids,
                  "ensemble_size": str(len(result.members)), "selection_metric": SELECTION_METRIC}
        client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
        mlflow.log_metrics(result.metrics)
        record = {
            "study": result.study,
            "arm": result.arm,
            "seed": result.seed,
            "selection": f"members ranked by final {SELECTION_METRIC} (ties: lower {TIE_BREAK_METRIC}, then run_id); "
                         "test metrics were not used",
            "command": list(command or sys.argv),
            "metrics": result.metrics,
            "members": [
                {key: (None if pd.isna(row.get(key)) else row.get(key))
                 for key in ("run_id", "run_name", "arm", "seed", SELECTION_METRIC, TIE_BREAK_METRIC, "test_accuracy")}
                for row in result.members.to_dict("records")
            ],
        }
        mlflow.log_dict(json.loads(json.dumps(record, default=str)), ENSEMBLE_ARTIFACT)
        for name, figure in (
            ("plots/confusion_matrix.png", confusion_matrix_figure(result.labels, result.probabilities.argmax(1),
                                                                   title=f"Confusion Matrix, {result.run_name}")),
            (MEMBERS_PLOT, members_figure(result.members)),
        ):
            mlflow.log_figure(figure, name)
            plt.close(figure)
        tracking.log_predictions(result.labels, result.probabilities, tracking.PREDICTIONS_ARTIFACT)
        if result.tta_probabilities is not None:
            tracking.log_predictions(result.labels, result.tta_probabilities, tracking.TTA_PREDICTIONS_ARTIFACT)
    except BaseException as error:
        status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
        MlflowClient().set_tag(run_id, "failure_reason",
                               f"{type(error).__name__}: {error}\n{traceback.format_exc(limit=5)}"[:4900])
        mlflow.end_run(status)
        raise
    mlflow.end_run("FINISHED")
    return run_id


def log_study_ensemble(study: str, top_k: int | None = None, arm: str | None = None, seed: int | None = None,
                       tracking_uri: str | None = None, command: Sequence[str] | None = None) -> LoggedEnsemble:
    """Build the ensemble and log it, unless the same ensemble (same members) is already logged."""
    tracking.use_tracking_uri(tracking_uri)
    if MlflowClient().get_experiment_by_name(compare.experiment_name(study)) is None:
        raise EnsembleError(
            f"study {study!r} has no MLflow experiment {compare.experiment_name(study)!r} "
            f"in {mlflow.get_tracking_uri()}; "
            f"run `python -m experiments.ablate --study {study}` first or pass the right --tracking-uri."
        )
    runs = compare.study_runs(study)
    members = select_members(runs, top_k=top_k, arm=arm, seed=seed)
    existing = find_logged_ensemble(study, ensemble_arm_name(top_k, arm), list(members["run_id"]), seed)
    result = build_ensemble(study, top_k=top_k, arm=arm, seed=seed, runs=runs)
    if existing is not None:
        return LoggedEnsemble(existing, result, reused=True)
    return LoggedEnsemble(log_ensemble(result, command), result, reused=False)


def ensemble_runs(study: str, tracking_uri: str | None = None, include_unfinished: bool = False) -> pd.DataFrame:
    """One row per ensemble run of ``study``: run_id, run_name, arm, seed, member_run_ids, ensemble_size, metrics."""
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    columns = ["study", "arm", "seed", "run_id", "run_name", "status", "member_run_ids", "ensemble_size"]
    experiment = MlflowClient().get_experiment_by_name(compare.experiment_name(study))
    if experiment is None:
        return pd.DataFrame(columns=columns)
    raw = mlflow.search_runs([experiment.experiment_id], filter_string=f"tags.`{compare.ROLE_TAG}` = '{ROLE}'",
                             max_results=50_000, order_by=["attributes.start_time ASC"])
    if raw.empty:
        return pd.DataFrame(columns=columns)
    seeds = raw.get("tags.seed", pd.Series([None] * len(raw), index=raw.index))
    frame = pd.DataFrame({
        "study": study,
        "arm": raw["tags.arm"],
        "seed": pd.to_numeric(seeds, errors="coerce").astype("Int64"),
        "run_id": raw["run_id"],
        "run_name": raw.get("tags.mlflow.runName"),
        "status": raw["status"],
        "member_run_ids": raw["tags.member_run_ids"],
    })
    for column in sorted(c for c in raw.columns if c.startswith("metrics.")):
        frame[column[len("metrics."):]] = raw[column].to_numpy()
    if not include_unfinished:
        frame = frame[frame["status"] == "FINISHED"]
    return frame.reset_index(drop=True)
