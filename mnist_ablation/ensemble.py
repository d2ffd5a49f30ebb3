"""Ensembles of finished study runs: average their logged test probabilities, choose members on validation.

No retraining and no re-inference: every cell run logged ``predictions/test_predictions.parquet``
(and ``predictions/test_predictions_tta.parquet`` when it ran with ``tta_views``), so an ensemble is
the mean of those probabilities. Members are chosen by their final ``val_accuracy`` alone (ties broken
by lower ``val_loss``, then run id); test metrics are never read to choose.

The ensemble is logged as a run of its own in the study's experiment, a child of the study's parent
run, tagged ``mnist_ablation.role=ensemble``, with the metrics, figure and predictions of any run, so
reports, the explorer and pandas can treat it like one and trace it back to its members. It carries no
config params (the members' shared config is in ``ensemble.json``), so grouping the cells by a param in
the MLflow UI never mixes an ensemble in:

    from mnist_ablation import ensemble
    logged = ensemble.log_study_ensemble("architecture", top_k=5)
    ensemble.ensemble_runs("architecture")     # one row per ensemble run

The ensemble has no ``val_accuracy``: members' validation predictions are not logged, so it cannot
be computed without re-inference. Its ``members_val_accuracy_mean`` (mean over members) is logged instead.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from . import naming, store, tracking
from .config import FIELD_NAMES
from .errors import StudyError
from .redaction import redact_argv
from .results import categorical_loss
from .sweep import INDEX_COLUMN, LABEL_COLUMN, PROBABILITY_COLUMNS, cell_key

SELECTION_METRIC = "val_accuracy"  # the only quantity members are chosen by
TIE_BREAK_METRIC = "val_loss"  # lower is better; then run_id, so the choice is deterministic
MEMBERS_PLOT = "plots/members_val_accuracy.png"


class EnsembleError(StudyError):
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
        return self.arm if self.seed is None else cell_key(self.arm, self.seed)


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
    reference = frames[0].sort_values(INDEX_COLUMN)
    labels = reference[LABEL_COLUMN].to_numpy(np.int64)
    total = np.zeros((len(reference), len(PROBABILITY_COLUMNS)), dtype=np.float64)
    for number, frame in enumerate(frames):
        frame = frame.sort_values(INDEX_COLUMN)
        if len(frame) != len(reference) or not np.array_equal(frame[LABEL_COLUMN].to_numpy(np.int64), labels):
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
        runs = store.cell_runs(study)
    members = select_members(runs, top_k=top_k, arm=arm, seed=seed)
    labels, probabilities = average_predictions([store.read_predictions(r) for r in members["run_id"]])
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
    tta_frames = [store.read_predictions(r, naming.TTA_PREDICTIONS_ARTIFACT)
                  if store.has_artifact(r, naming.TTA_PREDICTIONS_ARTIFACT) else None for r in members["run_id"]]
    if all(frame is not None for frame in tta_frames):
        _, result.tta_probabilities = average_predictions(tta_frames)
        result.metrics["test_accuracy_tta"] = accuracy(labels, result.tta_probabilities)
        result.metrics["test_loss_tta"] = categorical_loss(labels, result.tta_probabilities)
    return result


def shared_config(member_run_ids: Sequence[str]) -> dict[str, str]:
    """Config params on which every member agrees (all but seed for a one-arm ensemble), for ensemble.json.

    Read from the members' logged params, not from ``store.cell_runs``, whose ``learning_rate``
    column holds the per-epoch metric of the same name.
    """
    logged = [store.run_record(run_id).params for run_id in member_run_ids]
    return {
        name: logged[0][name]
        for name in FIELD_NAMES
        if name != "seed" and all(name in params for params in logged)
        and len({params[name] for params in logged}) == 1
    }


def members_figure(members: pd.DataFrame):
    """Bar chart of the members' final validation accuracy (what they were chosen by)."""
    from .plots import new_figure

    names = [str(n) if isinstance(n, str) and n else r[:8] for n, r in zip(members.get("run_name", members["run_id"]),
                                                                               members["run_id"])]
    values = members[SELECTION_METRIC].to_numpy(float)
    fig = new_figure(figsize=(max(6.0, 0.6 * len(names) + 2), 5))
    ax = fig.subplots()
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
    from .plots import confusion_matrix_figure

    experiment_id = tracking.get_or_create_experiment(naming.ablation_experiment(result.study))
    parent = store.find_parent_run(result.study, experiment_id)
    member_ids = ",".join(result.member_run_ids)
    tags = {naming.STUDY_TAG: result.study, naming.ARM_TAG: result.arm, naming.ROLE_TAG: naming.ENSEMBLE_ROLE,
            naming.MEMBER_RUN_IDS_TAG: member_ids, "selection": f"top by final {SELECTION_METRIC}"}
    if result.seed is not None:
        tags[naming.SEED_TAG] = str(result.seed)
    if parent is not None:
        tags[naming.PARENT_RUN_TAG] = parent.info.run_id
    with tracking.active_run(experiment_id, result.run_name, tags) as run_id:
        tracking.log_params(run_id, {naming.MEMBER_RUN_IDS_TAG: member_ids, "ensemble_size": len(result.members),
                                     "selection_metric": SELECTION_METRIC})
        tracking.log_metrics(run_id, result.metrics)
        record = {
            "study": result.study,
            "arm": result.arm,
            "seed": result.seed,
            "selection": f"members ranked by final {SELECTION_METRIC} (ties: lower {TIE_BREAK_METRIC}, then run_id); "
                         "test metrics were not used",
            "command": redact_argv(command or sys.argv),
            "metrics": result.metrics,
            "shared_config": shared_config(result.member_run_ids),
            "members": [
                {key: (None if pd.isna(row.get(key)) else row.get(key))
                 for key in ("run_id", "run_name", "arm", "seed", SELECTION_METRIC, TIE_BREAK_METRIC, "test_accuracy")}
                for row in result.members.to_dict("records")
            ],
        }
        tracking.log_json(run_id, json.loads(json.dumps(record, default=str)), naming.ENSEMBLE_ARTIFACT)
        tracking.log_figure(run_id, confusion_matrix_figure(result.labels, result.probabilities.argmax(1),
                                                            title=f"Confusion Matrix, {result.run_name}"),
                            "plots/confusion_matrix.png")
        tracking.log_figure(run_id, members_figure(result.members), MEMBERS_PLOT)
        tracking.log_predictions(result.labels, result.probabilities, naming.PREDICTIONS_ARTIFACT)
        if result.tta_probabilities is not None:
            tracking.log_predictions(result.labels, result.tta_probabilities, naming.TTA_PREDICTIONS_ARTIFACT)
    return run_id


def log_study_ensemble(study: str, top_k: int | None = None, arm: str | None = None, seed: int | None = None,
                       tracking_uri: str | None = None, command: Sequence[str] | None = None) -> LoggedEnsemble:
    """Build the ensemble and log it, unless the same ensemble (same members) is already logged."""
    tracking.use_tracking_uri(tracking_uri)
    if store.experiment_id(naming.ablation_experiment(study)) is None:
        raise EnsembleError(
            f"study {study!r} has no MLflow experiment {naming.ablation_experiment(study)!r} "
            f"in {store.redacted_tracking_uri()}; "
            f"run `python -m experiments.ablate --study {study}` first or pass the right --tracking-uri."
        )
    runs = store.cell_runs(study)
    members = select_members(runs, top_k=top_k, arm=arm, seed=seed)
    existing = find_logged_ensemble(study, ensemble_arm_name(top_k, arm), list(members["run_id"]), seed)
    result = build_ensemble(study, top_k=top_k, arm=arm, seed=seed, runs=runs)
    if existing is not None:
        return LoggedEnsemble(existing, result, reused=True)
    return LoggedEnsemble(log_ensemble(result, command), result, reused=False)


def ensemble_runs(study: str, tracking_uri: str | None = None, include_unfinished: bool = False) -> pd.DataFrame:
    """One row per ensemble run of ``study``: run_id, run_name, arm, seed, member_run_ids, ensemble_size, metrics."""
    if tracking_uri:
        tracking.use_tracking_uri(tracking_uri)
    return store.ensemble_runs(study, include_unfinished=include_unfinished)
