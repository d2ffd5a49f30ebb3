"""Health check of a tracking store and its cell queue: stuck runs, missing cells, failures and why."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from . import naming, store, tracking
from .storage import fail_stale_trials, open_storage
from .sweep import cell_key, usable_runs
from .workqueue import is_running, stale_trials


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


def _open(storage_url: str, grace_period: int):
    # The doctor never beats; its heartbeat interval only has to sit below the grace period it judges by.
    return open_storage(storage_url, heartbeat_interval=max(1, grace_period // 4), grace_period=grace_period)


def diagnose(storage_url: str | None = None, stale_after: float = 1800.0, grace_period: int = 60) -> Diagnosis:
    """Inspect every experiment of the active tracking URI (and the queue storage, if given). Changes nothing."""
    diagnosis = Diagnosis()
    storage = _open(storage_url, grace_period) if storage_url else None
    trials_by_run = store.queue_trials_by_run(storage) if storage is not None else {}
    now = time.time()
    for experiment, run in store.all_runs():
        name = run.info.run_name or run.info.run_id
        status = run.info.status
        if status in ("FAILED", "KILLED"):
            reason = run.data.tags.get(naming.FAILURE_REASON_TAG, "(no reason recorded)")
            diagnosis.failed.append((experiment, name, status, reason))
        if status != "RUNNING" or run.data.tags.get(naming.ROLE_TAG) == naming.STUDY_ROLE:
            continue  # a study's parent run is RUNNING while its workers are
        linked = trials_by_run.get(run.info.run_id, [])
        if linked:
            stale_numbers = {t.number for study, _ in linked for t in stale_trials(study, grace_period, now)}
            if not any(is_running(t) for _, t in linked) or any(t.number in stale_numbers for _, t in linked):
                diagnosis.stale.append(StaleRun(run.info.run_id, experiment, name,
                                                "its queue trial's heartbeat stopped (worker died)"))
            else:
                diagnosis.alive.append(name)
            continue
        idle = now - store.last_activity_ms(run) / 1000
        if idle > stale_after:
            diagnosis.stale.append(StaleRun(run.info.run_id, experiment, name,
                                            f"no metric logged for {idle / 60:.0f} min"))
        else:
            diagnosis.alive.append(name)
    for study in store.ablation_studies():
        definition = store.study_definition(study)
        if definition:
            done = set(usable_runs(store.cell_runs(study)).usable.get("config_hash", []))
            missing = [cell_key(c["arm"], c["seed"]) for c in definition["cells"] if c["config_hash"] not in done]
            if missing:
                diagnosis.missing_cells[study] = missing
    if storage is not None:
        diagnosis.stale_trials = sum(len(stale_trials(s, grace_period, now)) for s in store.queue_rounds(storage))
    return diagnosis


def mark_stale(diagnosis: Diagnosis, storage_url: str | None, grace_period: int = 60) -> int:
    """End stale runs as KILLED and fail the queue's stale trials (so a rerun retries them)."""
    for stale in diagnosis.stale:
        tracking.mark_run_dead(stale.run_id, f"marked by experiments.doctor: {stale.reason}")
    if storage_url is not None:
        for study in store.queue_rounds(_open(storage_url, grace_period)):
            fail_stale_trials(study)
    return len(diagnosis.stale)
