"""Hyperparameter search with Optuna: the search space, the objective, shared studies, and the report.

Optuna-side tuning (the space and the samplers live in ``search_space``). A study lives in an Optuna RDB storage (SQLite
beside the MLflow store by default, PostgreSQL to share it across machines), so any number of
workers can run ``python -m experiments.tune`` against it at once:

* exactly one worker creates the study (``create_study(load_if_exists=False)``; the others get
  DuplicatedStudyError and load it). That worker records the base config, enqueues the baseline
  trial and creates the one MLflow parent run, whose id it stores as a study user attribute. Nothing
  else is enqueued, because ``enqueue_trial(skip_if_exists=True)`` is not race-safe (optuna#2925);
* every trial is one ``tracking.run_training`` call, a child of that parent run (we set the parent
  ourselves rather than use ``MLflowCallback(nested=True)``, which needs the parent active in the
  same process and has misbehaved with parallel jobs, optuna#5148, #4088);
* a worker that dies stops heart-beating; the next worker to start a trial fails its stale trial,
  marks the trial's MLflow run KILLED and enqueues a retry with the same parameters. Heartbeats do
  not cover exceptions (optuna#6085), so a worker stopped by Ctrl-C (or SIGTERM, which the
  commands turn into KeyboardInterrupt) enqueues its retry itself.

Trials optimise the validation accuracy of the last epoch on the held-out split
(``validation="split"``); the test set is evaluated once per run by the trainer, but no decision
reads it.
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from . import naming, store, tracking
from .config import TrainConfig, from_dict
from .data import Mnist
from .errors import UserError
from .naming import BEST_RETRAIN_ROLE, ROLE_TAG, RUN_ID_ATTR, STUDY_ROLE, TRIAL_ROLE
from .search_space import baseline_params, check_base_config, config_from_params, suggest_config
from .storage import fail_stale_trials, quietly, retry_callback
from .storage import open_storage as open_rdb_storage
from .train import TrainingDiverged

logger = logging.getLogger(__name__)  # one line per trial and step; the commands print these (experiments.cli)

PARENT_RUN_ATTR = "mlflow_parent_run_id"  # study user attr: the one MLflow parent run of the study
BASE_CONFIG_ATTR = "base_config"  # study user attr: the fixed config the search space is applied to
BASELINE_ATTR = "baseline"  # trial user attr: True on the enqueued seed-recipe trial
OBJECTIVE_METRIC = "val_accuracy"
PARENT_WAIT_SECONDS = 120.0



class TuningError(UserError, ValueError):
    """A study cannot be opened or continued as asked (a ValueError, so commands print it as a user error)."""


# -- storage ------------------------------------------------------------------------------------------


class RetryDeadTrial:
    """Heartbeat-stale callback: end the dead trial's MLflow run KILLED, then enqueue a retry of it."""

    def __init__(self, max_retry: int | None):
        self.retry = retry_callback(max_retry)

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        run_id = trial.user_attrs.get(RUN_ID_ATTR)
        if run_id:
            tracking.mark_run_dead(run_id, f"Optuna trial {trial.number} lost its worker (heartbeat went stale); "
                                           "a retry with the same parameters was enqueued")
        self.retry(study, trial)


def open_storage(url: str, heartbeat_interval: int = 60, grace_period: int = 180,
                 max_retry: int | None = 3) -> optuna.storages.RDBStorage:
    """The tuning study's storage: a dead worker's trial is failed, its run marked KILLED, and retried."""
    return open_rdb_storage(url, heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                            stale_trial_callback=RetryDeadTrial(max_retry))


# -- the objective ---------------------------------------------------------------------------------

class PruningCallback(keras.callbacks.Callback):
    """Reports each epoch's validation accuracy to the trial and stops the trial if the pruner says so."""

    def __init__(self, trial: optuna.Trial, monitor: str = OBJECTIVE_METRIC):
        super().__init__()
        self.trial = trial
        self.monitor = monitor

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None:
            raise KeyError(f"metric {self.monitor!r} is missing from the epoch logs {sorted(logs or {})}; "
                           "tuning needs validation data.")
        self.trial.report(float(value), epoch)
        if self.trial.should_prune():
            threshold = self.threshold(epoch)
            self.trial.set_user_attr("pruned", {"epoch": epoch + 1, self.monitor: float(value),
                                                "threshold": threshold,
                                                "pruner": type(self.trial.study.pruner).__name__})
            against = "" if threshold is None else f" (the median of completed trials there is {threshold:.4f})"
            raise optuna.TrialPruned(f"pruned by {type(self.trial.study.pruner).__name__} after epoch {epoch + 1}: "
                                     f"{self.monitor} {float(value):.4f}{against}")

    def threshold(self, epoch: int) -> float | None:
        """What the pruner compared with: the median of the completed trials' values at ``epoch`` (median pruner)."""
        if not isinstance(self.trial.study.pruner, optuna.pruners.MedianPruner):
            return None
        values = [t.intermediate_values[epoch] for t in self.trial.study.get_trials(
            deepcopy=False, states=(TrialState.COMPLETE,)) if epoch in t.intermediate_values]
        return float(np.nanmedian(values)) if values else None


class Objective:
    """One trial = one tracked training run of ``suggest_config(trial, base)``, nested under the parent."""

    def __init__(self, base: TrainConfig, data: Mnist, study_name: str, parent_run_id: str, verbose: int = 0):
        self.base = base
        self.data = data
        self.study_name = study_name
        self.parent_run_id = parent_run_id
        self.verbose = verbose
        self.running_trial_number: int | None = None  # for retrying it when this worker is interrupted

    def __call__(self, trial: optuna.Trial) -> float:
        config = suggest_config(trial, self.base)
        tags = {ROLE_TAG: TRIAL_ROLE, naming.STUDY_TAG: self.study_name, "trial_number": str(trial.number)}
        retried = _frozen(trial).system_attrs.get("failed_trial")  # set by the heartbeat retry
        if retried is not None:
            tags["retry_of_trial"] = str(retried)
        if trial.user_attrs.get(BASELINE_ATTR):
            tags["baseline"] = "true"
        self.running_trial_number = trial.number
        try:
            history = self.run_trial(trial, config, tags)
        finally:
            keras.backend.clear_session()  # free the trial's graph before the next one
        self.running_trial_number = None
        value = history[OBJECTIVE_METRIC][-1]
        if not math.isfinite(value):
            raise TrainingDiverged(f"trial {trial.number} ended with {OBJECTIVE_METRIC}={value}")
        return value

    def run_trial(self, trial: optuna.Trial, config: TrainConfig, tags: dict[str, str]) -> dict[str, list[float]]:
        """Train ``config`` as the trial's MLflow run, reporting to the pruner; returns the per-epoch history."""
        tracked = tracking.run_training(
            config, self.data, experiment_name=naming.tuning_experiment(self.study_name),
            run_name=f"trial-{trial.number}", tags=tags, parent_run_id=self.parent_run_id,
            callbacks=[PruningCallback(trial)], verbose=self.verbose,
            on_run_created=lambda run_id: trial.set_user_attr(RUN_ID_ATTR, run_id),
            stop_exceptions=(optuna.TrialPruned,),
        )
        return tracked.result.history


def _frozen(trial: optuna.Trial) -> FrozenTrial:
    # Optuna 5 dropped Trial.system_attrs; the stored trial has them.
    return next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)


def record_trial_state(study: optuna.Study, trial: FrozenTrial) -> None:
    """After each trial: its final Optuna state on its MLflow run, and one line on the console."""
    run_id = trial.user_attrs.get(RUN_ID_ATTR)
    if run_id:
        tags = {"optuna_trial_state": trial.state.name}
        pruned = trial.user_attrs.get("pruned")
        if trial.state == TrialState.PRUNED and pruned:
            # The run ended KILLED with the pruner's reason (tracking's stop_exceptions), never as a traceback.
            tags.update({"pruned_at_epoch": pruned["epoch"], f"pruned_{OBJECTIVE_METRIC}": pruned[OBJECTIVE_METRIC],
                         "pruner": pruned["pruner"], "pruner_threshold": pruned["threshold"]})
        tracking.set_tags(run_id, tags)
    value = "" if trial.value is None else f" {OBJECTIVE_METRIC} {trial.value:.4f}"
    epochs = len(trial.intermediate_values)
    try:
        best = f" (best {study.best_value:.4f} in trial {study.best_trial.number})"
    except ValueError:
        best = ""
    logger.info(f"trial {trial.number} {trial.state.name.lower()} after {epochs} epoch(s){value}{best}")


# -- opening a study -------------------------------------------------------------------------------

@dataclass
class TuningStudy:
    """An open study, its fixed base config and its MLflow parent run."""

    study: optuna.Study
    base: TrainConfig
    parent_run_id: str
    created: bool  # this process created the study (and enqueued the baseline)
    retry: Callable[[optuna.Study, FrozenTrial], None]  # enqueues a retry of a lost trial

    @property
    def name(self) -> str:
        return self.study.study_name


def open_study(study_name: str, storage: optuna.storages.BaseStorage, base: TrainConfig,
               sampler: optuna.samplers.BaseSampler | None = None, pruner: optuna.pruners.BasePruner | None = None,
               storage_label: str = "") -> TuningStudy:
    """Create the study (one worker wins) or join it; the creator enqueues the baseline and makes the parent run.

    Joining with a different base config fails: its trials would not be comparable.
    """
    check_base_config(base)
    try:
        study = optuna.create_study(storage=storage, study_name=study_name, direction="maximize",
                                    sampler=sampler, pruner=pruner, load_if_exists=False)
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=study_name, storage=storage, sampler=sampler, pruner=pruner)
        created = False
    if created:
        study.set_user_attr(BASE_CONFIG_ATTR, base.to_dict())
        quietly(lambda: study.set_metric_names([OBJECTIVE_METRIC]))
        study.set_user_attr("objective", f"{OBJECTIVE_METRIC} of the last epoch (validation split)")
        study.enqueue_trial(baseline_params(base), user_attrs={BASELINE_ATTR: True})
        parent_run_id = _create_parent_run(study_name, base, storage_label)
        study.set_user_attr(PARENT_RUN_ATTR, parent_run_id)
    else:
        parent_run_id = _wait_for_parent(study, base, storage_label)
        _check_same_base(study, study_name, base)
        tracking.set_status(parent_run_id, "RUNNING")
    retry = storage.get_heartbeat_stale_trial_callback() or RetryDeadTrial(max_retry=3)
    return TuningStudy(study, base, parent_run_id, created, retry)


def _check_same_base(study: optuna.Study, study_name: str, base: TrainConfig) -> None:
    recorded = study.user_attrs.get(BASE_CONFIG_ATTR)
    if recorded is None:
        return  # a study made by other code: nothing to compare with
    recorded_config = from_dict(recorded)
    if recorded_config.hash() != base.hash():
        differences = {name: (value, getattr(base, name)) for name, value in recorded_config.to_dict().items()
                       if value != base.to_dict()[name]}
        listed = ", ".join(f"{name}: study {old!r} vs now {new!r}" for name, (old, new) in differences.items())
        raise TuningError(
            f"study {study_name!r} was created with another base config ({listed}); its trials would not be "
            "comparable. Pass the same --epochs/--train-subset/--set as when it was created, or a new --study-name."
        )


def _create_parent_run(study_name: str, base: TrainConfig, storage_label: str) -> str:
    experiment_id = tracking.get_or_create_experiment(naming.tuning_experiment(study_name), {"study": study_name})
    run_id = tracking.create_run(experiment_id, study_name, {ROLE_TAG: STUDY_ROLE, naming.STUDY_TAG: study_name,
                                                             "optuna.storage": storage_label})
    tracking.log_json(run_id, base.to_dict(), "base_config.json")
    tracking.log_json(run_id, baseline_params(base), "baseline_params.json")
    return run_id


def _wait_for_parent(study: optuna.Study, base: TrainConfig, storage_label: str) -> str:
    """The parent run id the creating worker records right after creating the study."""
    study_name = study.study_name
    deadline = time.monotonic() + PARENT_WAIT_SECONDS
    while True:
        run_id = study.user_attrs.get(PARENT_RUN_ATTR)
        if run_id is None and time.monotonic() > deadline:
            # The creator died before recording it: make it now (rare; a racing twin would be harmless).
            if BASE_CONFIG_ATTR not in study.user_attrs:
                study.set_user_attr(BASE_CONFIG_ATTR, base.to_dict())
            run_id = _create_parent_run(study_name, base, storage_label)
            study.set_user_attr(PARENT_RUN_ATTR, run_id)
        if run_id is not None:
            break
        time.sleep(1.0)  # study.user_attrs reads the storage afresh each time
    if not store.run_exists(run_id):
        raise TuningError(
            f"study {study_name!r} records MLflow parent run {run_id}, which the tracking store "
            f"{store.redacted_tracking_uri()} does not have: it was created with another --tracking-uri. "
            "Pass that URI, or a new --study-name."
        )
    return run_id


# -- running trials --------------------------------------------------------------------------------

def optimize(tuning: TuningStudy, data: Mnist, n_trials: int | None, timeout: float | None = None,
             verbose: int = 0, objective: Objective | None = None) -> None:
    """Run ``n_trials`` trials in this worker (other workers may run theirs at the same time).

    A diverged trial is recorded FAILED and the worker goes on; an interrupt (Ctrl-C) enqueues a retry
    of the trial it stopped, so no trial is lost, and then propagates.
    """
    objective = objective or Objective(tuning.base, data, tuning.name, tuning.parent_run_id, verbose=verbose)
    try:
        tuning.study.optimize(objective, n_trials=n_trials, timeout=timeout, catch=(TrainingDiverged,),
                              callbacks=[record_trial_state], gc_after_trial=True)
    except KeyboardInterrupt:
        if objective.running_trial_number is not None:
            _retry_interrupted(tuning, objective.running_trial_number)
        raise


def _retry_interrupted(tuning: TuningStudy, number: int) -> None:
    trial = next(t for t in tuning.study.get_trials(deepcopy=False) if t.number == number)
    if trial.state == TrialState.FAIL:
        tuning.retry(tuning.study, trial)
        logger.info(f"trial {number} was interrupted; a retry with the same parameters is enqueued")


def other_trials_in_flight(study: optuna.Study) -> int:
    """Trials RUNNING or WAITING right now (after failing those whose worker died)."""
    fail_stale_trials(study)
    return len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)))


# -- the report ------------------------------------------------------------------------------------

def trials_frame(study: optuna.Study, tracking_uri: str | None = None) -> pd.DataFrame:
    """``study.trials_dataframe()`` joined with each trial's MLflow run.

    One row per trial; the run's ``run_id``, ``mlflow_status`` and final metrics (``test_accuracy``,
    ``val_accuracy`` of the last epoch, ``train_seconds``, ...) are added, empty for trials without a run.
    ``epochs_trained`` counts the epochs the trial reported (fewer than ``epochs`` when pruned).
    """
    if tracking_uri is not None:
        tracking.use_tracking_uri(tracking_uri)
    frame = study.trials_dataframe()
    if frame.empty:
        return frame
    frame["epochs_trained"] = [len(t.intermediate_values) for t in study.get_trials(deepcopy=False)]
    run_column = f"user_attrs_{RUN_ID_ATTR}"
    if run_column not in frame:
        frame[run_column] = None
    runs = store.tuning_runs(study.study_name)
    if runs.empty:
        frame["run_id"] = None
        frame["mlflow_status"] = None
        return frame
    metric_columns = [c for c in runs.columns if c.startswith("metrics.")]
    runs = runs[["run_id", "status", *metric_columns]].rename(
        columns={"status": "mlflow_status", **{c: c[len("metrics."):] for c in metric_columns}})
    return frame.merge(runs, how="left", left_on=run_column, right_on="run_id")


def best_config(tuning: TuningStudy) -> TrainConfig:
    """The config of the best trial so far."""
    return config_from_params(tuning.study.best_params, tuning.base)


@dataclass
class TuningSummary:
    best_trial_number: int
    best_value: float
    best_params: dict[str, Any]
    best_config: TrainConfig
    retrain_run_id: str
    retrain_test_accuracy: float
    importances: dict[str, float]  # parameter -> importance (PED-ANOVA), largest first
    trials: pd.DataFrame


def finalize(tuning: TuningStudy, data: Mnist, retrain_epochs: int | None = None,
             retrain_subset: int | None = None, verbose: int | str = 2) -> TuningSummary:
    """Report on the study in its parent run, and retrain the best config once, tested once.

    The retrain uses the full training split (``train_subset=None`` unless ``retrain_subset``) and
    ``retrain_epochs`` (default: the trials' epochs); it is skipped when a finished retrain of the same
    config exists. The parent run gets best_params.json, trials.csv, the optimisation-history and
    parameter-importance figures, and is ended FINISHED.
    """
    study = tuning.study
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise TuningError(f"study {tuning.name!r} has no complete trial yet; run some trials (--n-trials N) first.")
    best = study.best_trial
    parent = tuning.parent_run_id
    tracking.log_json(parent, {"trial_number": best.number, OBJECTIVE_METRIC: best.value, "params": best.params},
                      "best_params.json")
    for artifact, figure in _study_figures(study).items():
        tracking.log_figure(parent, figure, artifact)
    importances = param_importances(study)
    tracking.log_json(parent, importances, "param_importances.json")

    config = config_from_params(best.params, tuning.base).replace(
        train_subset=retrain_subset, epochs=retrain_epochs or tuning.base.epochs)
    retrain_run_id, test_accuracy = _retrain(tuning, data, config, best.number, verbose)

    frame = trials_frame(study)
    tracking.log_text(parent, frame.to_csv(index=False), "trials.csv")
    states = frame["state"].value_counts().to_dict()
    tracking.log_metrics(parent, {"best_val_accuracy": best.value, "best_trial_number": best.number,
                                  "best_retrain_test_accuracy": test_accuracy,
                                  **{f"trials_{state.lower()}": count for state, count in states.items()}})
    tracking.set_tags(parent, {"best_retrain_run_id": retrain_run_id})
    tracking.set_status(parent, "FINISHED")
    return TuningSummary(best.number, best.value, best.params, config, retrain_run_id, test_accuracy, importances,
                         frame)


def _retrain(tuning: TuningStudy, data: Mnist, config: TrainConfig, trial_number: int,
             verbose: int | str) -> tuple[str, float]:
    """(run id, test accuracy) of the best config trained once more; reuses a finished identical retrain."""
    config_hash = config.hash(data.checksums)
    existing = store.tuning_runs(tuning.name, role=BEST_RETRAIN_ROLE, finished_only=True)
    if not existing.empty:
        existing = existing[existing[f"tags.{naming.CONFIG_HASH_TAG}"] == config_hash]
    if not existing.empty:
        row = existing.iloc[0]
        logger.info(f"best config (trial {trial_number}) was already retrained: run {row['run_id']}")
        return row["run_id"], float(row["metrics.test_accuracy"])
    logger.info(f"retraining the best config (trial {trial_number}) for {config.epochs} epochs on "
                f"{'the full training split' if config.train_subset is None else f'{config.train_subset} images'}")
    try:
        tracked = tracking.run_training(
            config, data, experiment_name=naming.tuning_experiment(tuning.name),
            run_name=f"best-retrain-trial-{trial_number}",
            tags={ROLE_TAG: BEST_RETRAIN_ROLE, naming.STUDY_TAG: tuning.name, "trial_number": str(trial_number)},
            parent_run_id=tuning.parent_run_id, verbose=verbose,
            checkpoint_dir=tracking.local_state_directory(tracking.current_tracking_uri()) / "checkpoints"
            / config_hash,
        )
    finally:
        keras.backend.clear_session()
    return tracked.run_id, tracked.result.test_accuracy


def _study_figures(study: optuna.Study) -> dict[str, Any]:
    """Optimisation history and parameter importances as Matplotlib figures (importances need 2+ trials)."""
    from optuna.visualization import matplotlib as optuna_plots

    figures = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna.visualization.matplotlib is experimental
        figures["plots/optimization_history.png"] = optuna_plots.plot_optimization_history(study).figure
        try:
            evaluator = optuna.importance.PedAnovaImportanceEvaluator()  # needs no scikit-learn
            axes = optuna_plots.plot_param_importances(study, evaluator=evaluator)
            figures["plots/param_importances.png"] = axes.figure
        except (RuntimeError, ValueError) as error:
            logger.info(f"no parameter-importance figure yet ({error})")
    for figure in figures.values():
        figure.set_size_inches(8, 5)
        figure.tight_layout()
    return figures


def param_importances(study: optuna.Study) -> dict[str, float]:
    """Parameter importances (PED-ANOVA) of the complete trials; empty when there are too few."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.PedAnovaImportanceEvaluator())
    except (RuntimeError, ValueError):
        return {}


def describe_summary(summary: TuningSummary) -> str:
    """Human-readable lines for the console."""
    params = json.dumps(summary.best_params, indent=2, sort_keys=True, default=str)
    top = ", ".join(f"{name} {value:.2f}" for name, value in list(summary.importances.items())[:5]) or "n/a"
    return (f"best trial {summary.best_trial_number}: {OBJECTIVE_METRIC} {summary.best_value:.4f}\n"
            f"best params: {params}\n"
            f"most important parameters: {top}\n"
            f"best config retrained (run {summary.retrain_run_id}): test accuracy {summary.retrain_test_accuracy:.4f}")
