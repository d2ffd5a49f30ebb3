"""Exactly-once work queue for a study's (arm, seed) cells, on Optuna's RDB storage.

Optuna's RDB storage is already the database that tuning workers share (SQLite on one machine,
PostgreSQL across machines), and it has the two primitives exactly-once needs:

* a unique study name, so that of several workers starting together exactly one creates a queue
  *round* and enqueues its cells as WAITING trials (the others load it and wait for its
  ``enqueued`` flag); ``enqueue_trial(skip_if_exists=True)`` is not race-safe (optuna#2925), this is;
* an atomic WAITING -> RUNNING transition (``set_trial_state_values`` returns False to the loser), so
  a cell is taken by one worker only.

A worker that dies stops its heartbeat; ``fail_stale_trials`` marks its trial FAIL and
``RetryHeartbeatStaleTrialCallback`` enqueues a copy, which another (or the rerun) worker takes. Cells that
failed by exception (say a diverged run) are not retried within a round; running the command again
opens a new round for every cell that has no finished run yet.
"""

from __future__ import annotations

import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.exc import DBAPIError, OperationalError

from .errors import QueueError

optuna.logging.set_verbosity(optuna.logging.WARNING)
# fail_stale_trials and the heartbeat callbacks are stable in practice since Optuna 2.9; the warning is noise.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

ENQUEUED_ATTR = "enqueued"


@dataclass(frozen=True)
class Cell:
    """One unit of work: an arm of a study with one seed."""

    arm: str
    seed: int
    config_hash: str

    @property
    def key(self) -> str:
        return f"{self.arm}-seed{self.seed}"


@dataclass
class Claim:
    """A cell this worker has taken (its trial is RUNNING and heartbeating)."""

    trial_id: int
    number: int
    cell: Cell
    previous_run_id: str | None  # MLflow run of an earlier attempt of this cell (a retry), if any


def open_storage(url: str, heartbeat_interval: int = 10, grace_period: int = 60,
                 max_retry: int = 3) -> RDBStorage:
    """Optuna RDB storage with heartbeats and retries of trials whose worker died."""
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    attempts = 6
    for attempt in range(attempts):
        try:
            return RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=max_retry),
            )
        except DBAPIError as error:
            # Workers starting together race to create Optuna's tables ("already exists", duplicate
            # keys, "database is locked"); the loser's next attempt finds them made.
            if attempt == attempts - 1:
                raise QueueError(f"cannot open the queue storage {url!r}: {error}") from None
            time.sleep(0.5 * (attempt + 1))
        except Exception as error:  # SQLAlchemy raises many types for bad URLs and dead servers
            raise QueueError(
                f"cannot open the queue storage {url!r} ({type(error).__name__}: {error}). Expected a SQLAlchemy "
                "URL such as sqlite:///mlruns/optuna.db or postgresql://user:password@host:5432/db that is reachable."
            ) from None
    raise AssertionError("unreachable")


def _retrying(action: Callable, attempts: int = 20):
    """Run ``action``, retrying SQLite's transient 'database is locked' errors."""
    for attempt in range(attempts):
        try:
            return action()
        except OperationalError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 + 0.1 * attempt)


class CellQueue:
    """The rounds of one sweep (a study's cells at one config) in an Optuna storage."""

    def __init__(self, storage: RDBStorage, name: str, poll_seconds: float = 2.0):
        self.storage = storage
        self.name = name
        self.poll_seconds = poll_seconds

    def _round_names(self) -> list[str]:
        prefix = f"{self.name}/round-"
        names = [s.study_name for s in _retrying(lambda: self.storage.get_all_studies()) if s.study_name.startswith(prefix)]
        return sorted(names, key=lambda n: int(n[len(prefix):]))

    def open_round(self, cells: Sequence[Cell], is_done: Callable[[Cell], bool],
                   on_create: Callable[[optuna.Study], None] | None = None) -> optuna.Study | None:
        """Join the current round if it has work; else open a new one for the cells not yet done.

        Returns None when every cell is done. ``on_create`` runs in the one worker that created the
        round, before the cells are published (e.g. to record the MLflow parent run id).
        """
        rounds = self._round_names()
        if rounds:
            latest = self._load(rounds[-1])
            self._wait_enqueued(latest)
            states = {t.state for t in latest.get_trials(deepcopy=False)}
            if states & {TrialState.WAITING, TrialState.RUNNING}:
                return latest
        remaining = [cell for cell in cells if not is_done(cell)]
        if not remaining:
            return None
        name = f"{self.name}/round-{len(rounds)}"
        try:
            study = _retrying(lambda: optuna.create_study(storage=self.storage, study_name=name, load_if_exists=False))
        except optuna.exceptions.DuplicatedStudyError:
            study = self._load(name)  # another worker won the race: it enqueues, we wait
            self._wait_enqueued(study)
            return study
        if on_create is not None:
            on_create(study)
        for cell in remaining:
            _retrying(lambda cell=cell: study.enqueue_trial(
                {}, user_attrs={"arm": cell.arm, "seed": cell.seed, "config_hash": cell.config_hash, "key": cell.key}
            ))
        _retrying(lambda: study.set_user_attr(ENQUEUED_ATTR, True))
        return study

    def _load(self, name: str) -> optuna.Study:
        return _retrying(lambda: optuna.load_study(study_name=name, storage=self.storage))

    def _wait_enqueued(self, study: optuna.Study, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while not _retrying(lambda: study.user_attrs).get(ENQUEUED_ATTR):
            if time.monotonic() > deadline:
                raise QueueError(
                    f"queue round {study.study_name!r} was created but its cells were never published "
                    f"(its creator died?). Delete that Optuna study and rerun."
                )
            time.sleep(self.poll_seconds / 4)

    def claim(self, study: optuna.Study) -> Claim | None:
        """Take one WAITING cell of ``study``, or None if there is none to take right now."""
        _retrying(lambda: fail_stale_trials(study))
        waiting = _retrying(lambda: self.storage.get_all_trials(study._study_id, deepcopy=False,
                                                                states=(TrialState.WAITING,)))
        for trial in waiting:
            try:
                won = _retrying(lambda: self.storage.set_trial_state_values(trial._trial_id, TrialState.RUNNING))
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
            if won:
                # Beat at once: a trial that never beat is never seen as stale, so a worker dying right
                # here would otherwise leave its cell RUNNING for ever.
                _retrying(lambda: self.storage.record_heartbeat(trial._trial_id))
                return self._claim_from(trial)
        return None

    def _claim_from(self, trial: FrozenTrial) -> Claim:
        attrs = trial.user_attrs
        cell = Cell(arm=attrs["arm"], seed=int(attrs["seed"]), config_hash=attrs["config_hash"])
        return Claim(trial._trial_id, trial.number, cell, attrs.get("mlflow_run_id"))

    def has_running(self, study: optuna.Study) -> bool:
        running = _retrying(lambda: self.storage.get_all_trials(study._study_id, deepcopy=False,
                                                                states=(TrialState.RUNNING, TrialState.WAITING)))
        return bool(running)

    def record_run_id(self, claim: Claim, run_id: str) -> None:
        _retrying(lambda: self.storage.set_trial_user_attr(claim.trial_id, "mlflow_run_id", run_id))

    def finish(self, claim: Claim, state: TrialState, value: float | None = None, reason: str | None = None) -> None:
        if reason:
            _retrying(lambda: self.storage.set_trial_user_attr(claim.trial_id, "failure_reason", reason[:1000]))
        values = [value] if state == TrialState.COMPLETE and value is not None else None
        _retrying(lambda: self.storage.set_trial_state_values(claim.trial_id, state, values))

    @contextmanager
    def heartbeat(self, claim: Claim) -> Iterator[None]:
        """Record the claim's heartbeat in the background while the cell runs."""
        stop = threading.Event()
        interval = self.storage.get_heartbeat_interval() or 10

        def beat() -> None:
            while not stop.is_set():
                try:
                    self.storage.record_heartbeat(claim.trial_id)
                except Exception:  # noqa: BLE001 - a missed beat is retried; never kill the run for it
                    pass
                stop.wait(interval)

        thread = threading.Thread(target=beat, name=f"heartbeat-{claim.number}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=5)

    def iterate(self, study: optuna.Study) -> Iterator[Claim]:
        """Yield cells to run until none is WAITING or RUNNING (waiting for dead workers' retries)."""
        while True:
            claim = self.claim(study)
            if claim is not None:
                yield claim
                continue
            if not self.has_running(study):
                return
            time.sleep(self.poll_seconds)
