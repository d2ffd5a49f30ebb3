"""Health check of a tracking store and its cell queue: stuck runs, missing cells, failures and why."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from . import compare, tracking
from .workqueue import _retrying, open_storage


@dataclass
class StaleRun:
    run_id: str
    experiment: str
    run_name: str
    reason: str


@dataclass
class Diagnosis:
    stale: list[StaleRun] = field(default_factory=list)
    alive: list[str] = field(default_factory=list)  # run names still RUNNING with a live heartbeat / recent activity
    failed: list[tuple[str, str, str, str]] = field(default_factory=list)  # experiment, run name, status, reason
    missing_cells: dict[str, list[str]] = field(default_factory=dict)  # study -> cell keys with no finished run
    stale_trials: int = 0

    @property
    def healthy(self) -> bool:
        return not (self.stale or self.missing_cells or self.stale_trials)


def _queue_trials_by_run(storage_url: str | None, grace_period: int):
    """MLflow run id -> (storage, study, trial) for every queue trial that recorded its run."""
    if storage_url is None:
        return None, {}
    import optuna

    storage = open_storage(storage_url, grace_period=grace_period)
    found = {}
    for summary in _retrying(lambda: storage.get_all_studies()):
        if not summary.study_name.startswith("ablate/"):
            continue
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        for trial in study.get_trials(deepcopy=False):
            run_id = trial.user_attrs.get("mlflow_run_id")
            if run_id:
                found.setdefault(run_id, []).append((study, trial))
    return storage, found


def _last_activity_seconds(client: MlflowClient, run) -> float:
    """Seconds since the run's latest metric (or its start, if it logged none)."""
    latest = run.info.start_time or 0
    for key in run.data.metrics:
        for metric in client.get_metric_history(run.info.run_id, key)[-1:]:
            latest = max(latest, metric.timestamp)
    return time.time() - latest / 1000


def diagnose(storage_url: str | None = None, stale_after: float = 1800.0, grace_period: int = 60) -> Diagnosis:
    """Inspect every experiment of the active tracking URI (and the queue storage, if given)."""
    client = MlflowClient()
    diagnosis = Diagnosis()
    storage, trials_by_run = _queue_trials_by_run(storage_url, grace_period)
    for experiment in client.search_experiments():
        for run in client.search_runs([experiment.experiment_id], max_results=50_000):
            name = run.info.run_name or run.info.run_id
            status = run.info.status
            if status in ("FAILED", "KILLED"):
                diagnosis.failed.append((experiment.name, name, status, run.data.tags.get("failure_reason", "(no reason recorded)")))
            if status != "RUNNING" or run.data.tags.get(compare.ROLE_TAG) == "study":
                continue  # a study's parent run is RUNNING while its workers are
            linked = trials_by_run.get(run.info.run_id, [])
            if linked:
                trial_states = {trial.state for _, trial in linked}
                stale_ids = {tid for study, _ in linked for tid in storage._get_stale_trial_ids(study._study_id)}
                if TrialState.RUNNING not in trial_states or any(t._trial_id in stale_ids for _, t in linked):
                    diagnosis.stale.append(StaleRun(run.info.run_id, experiment.name, name,
                                                    "its queue trial's heartbeat stopped (worker died)"))
                    continue
                diagnosis.alive.append(name)
                continue
            idle = _last_activity_seconds(client, run)
            if idle > stale_after:
                diagnosis.stale.append(StaleRun(run.info.run_id, experiment.name, name,
                                                f"no metric logged for {idle / 60:.0f} min"))
            else:
                diagnosis.alive.append(name)
        if experiment.name.startswith("ablation/"):
            study = experiment.name[len("ablation/"):]
            definition = compare.study_definition(study)
            if definition:
                done = set(compare.study_runs(study)["config_hash"])
                missing = [f"{c['arm']}-seed{c['seed']}" for c in definition["cells"] if c["config_hash"] not in done]
                if missing:
                    diagnosis.missing_cells[study] = missing
    if storage is not None:
        diagnosis.stale_trials = sum(
            len(storage._get_stale_trial_ids(s._study_id)) for s in
            _retrying(lambda: storage.get_all_studies()) if s.study_name.startswith("ablate/")
        )
    return diagnosis


def mark_stale(diagnosis: Diagnosis, storage_url: str | None, grace_period: int = 60) -> int:
    """End stale runs as KILLED and fail the queue's stale trials (so a rerun retries them)."""
    for stale in diagnosis.stale:
        tracking.mark_run_dead(stale.run_id, f"marked by experiments.doctor: {stale.reason}")
    if storage_url is not None:
        import optuna
        from optuna.storages import fail_stale_trials

        storage = open_storage(storage_url, grace_period=grace_period)
        for summary in storage.get_all_studies():
            if summary.study_name.startswith("ablate/"):
                fail_stale_trials(optuna.load_study(study_name=summary.study_name, storage=storage))
    return len(diagnosis.stale)
