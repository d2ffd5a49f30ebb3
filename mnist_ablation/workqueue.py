"""Exactly-once work queue for a study's (arm, seed) cells, on Optuna's RDB storage.

Optuna's RDB storage is already the database that tuning workers share (SQLite on one machine,
PostgreSQL across machines), and it has the two primitives exactly-once needs:

* a unique study name, so that of several workers starting together exactly one creates a queue
  *round* and enqueues its cells as WAITING trials (the others load it and wait for its
  ``enqueued`` flag); ``enqueue_trial(skip_if_exists=True)`` is not race-safe (optuna#2925), this is;
* an atomic WAITING -> RUNNING transition (``set_trial_state_values`` returns False to the loser), so
  a cell is taken by one worker only.

A worker that dies stops its heartbeat; ``fail_stale_trials`` marks its trial FAIL and the storage's
``RetryHeartbeatStaleTrialCallback`` enqueues a copy, which another (or the rerun) worker takes. Cells that
failed by exception (say a diverged run) are not retried within a round; running the command again
opens a new round for every cell that has no finished run yet.

A cell that reuses another cell's run (two arms that are the same training run, ``sweep.Plan.source_of``)
carries that cell in its trial and is handed out only once its source's trial has settled, so that the
worker taking it finds the run to reuse (or its failure) rather than training the same run again.

Rounds read well in optuna-dashboard: each maximises a named ``val_accuracy`` objective, and a trial
carries its cell's arm, seed and the settings that vary between arms as params.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import optuna
from optuna.distributions import CategoricalDistribution
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from .errors import QueueError
from .naming import RUN_ID_ATTR, round_name, round_number
from .redaction import redact
from .storage import fail_stale_trials, quietly, retrying, study_id
from .sweep import Cell

ENQUEUED_ATTR = "enqueued"
SOURCE_ATTR = "reuses"  # a reusing cell's trial: the key and config hash of the cell whose run it reuses
HEARTBEAT_ATTR = "last_heartbeat"  # unix seconds of the worker's latest beat (the doctor reads it)
OBJECTIVE = "val_accuracy"  # a cell's trial value: its final validation accuracy


@dataclass
class Claim:
    """A cell this worker has taken (its trial is RUNNING and heartbeating)."""

    trial_id: int
    number: int
    cell: Cell
    previous_run_id: str | None  # MLflow run of an earlier attempt of this cell (a retry), if any
    source: Cell | None = None  # the cell whose run this one reuses (trained once for both), if any


@dataclass(frozen=True)
class RoundProgress:
    """Where a round stands, from one read of its trials."""

    cells: list[Cell]  # the cells the round enqueued (a retried cell once)
    settled: int  # done: completed, or failed with no retry waiting
    running: list[Cell]
    failed: int  # latest attempt failed and no retry waits for it


def _cell(trial: FrozenTrial) -> Cell | None:
    """The cell a queue trial carries in its user attributes (None for a trial that carries none)."""
    attrs = trial.user_attrs
    if "arm" not in attrs:
        return None
    return Cell(arm=attrs["arm"], seed=int(attrs["seed"]), config_hash=attrs["config_hash"])


def _source(trial: FrozenTrial) -> Cell | None:
    """The cell whose run the trial's cell reuses, or None for a cell that trains."""
    source = trial.user_attrs.get(SOURCE_ATTR)
    return None if not source else Cell(source["arm"], int(source["seed"]), source["config_hash"])


class CellQueue:
    """The rounds of one sweep (a study's cells at one config) in an Optuna storage."""

    def __init__(self, storage: RDBStorage, name: str, poll_seconds: float = 2.0):
        self.storage = storage
        self.name = name
        self.poll_seconds = poll_seconds

    def _round_names(self) -> list[str]:
        names = [s.study_name for s in retrying(self.storage.get_all_studies)]
        numbered = sorted((round_number(self.name, name), name) for name in names
                          if round_number(self.name, name) is not None)
        return [name for _, name in numbered]

    def latest_round(self) -> optuna.Study | None:
        rounds = self._round_names()
        return self._load(rounds[-1]) if rounds else None

    def open_round(self, cells: Sequence[Cell], is_done: Callable[[Cell], bool],
                   on_create: Callable[[optuna.Study], None] | None = None,
                   source_of: Callable[[Cell], Cell | None] = lambda cell: None) -> optuna.Study | None:
        """Join the current round if it has work; else open a new one for the cells not yet done.

        Returns None when every cell is done. ``on_create`` runs in the one worker that created the
        round, before the cells are published (e.g. to record the MLflow parent run id). ``source_of``
        names the cell whose run a cell reuses (None: the cell trains).
        """
        rounds = self._round_names()
        if rounds:
            latest = self._load(rounds[-1])
            self._wait_enqueued(latest)
            if self.has_work(latest):
                return latest
        remaining = [cell for cell in cells if not is_done(cell)]
        if not remaining:
            return None
        name = round_name(self.name, len(rounds))
        try:
            study = retrying(lambda: optuna.create_study(storage=self.storage, study_name=name, direction="maximize",
                                                         load_if_exists=False))
        except optuna.exceptions.DuplicatedStudyError:
            study = self._load(name)  # another worker won the race: it enqueues, we wait
            self._wait_enqueued(study)
            return study
        retrying(lambda: quietly(lambda: study.set_metric_names([OBJECTIVE])))
        if on_create is not None:
            on_create(study)
        for cell in remaining:
            attrs = {"arm": cell.arm, "seed": cell.seed, "config_hash": cell.config_hash, "key": cell.key}
            source = source_of(cell)
            if source is not None:
                attrs[SOURCE_ATTR] = {"arm": source.arm, "seed": source.seed, "config_hash": source.config_hash}
            retrying(lambda attrs=attrs: study.enqueue_trial({}, user_attrs=attrs))
        retrying(lambda: study.set_user_attr(ENQUEUED_ATTR, True))
        return study

    def _load(self, name: str) -> optuna.Study:
        return retrying(lambda: optuna.load_study(study_name=name, storage=self.storage))

    def _wait_enqueued(self, study: optuna.Study, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while not retrying(lambda: study.user_attrs).get(ENQUEUED_ATTR):
            if time.monotonic() > deadline:
                raise QueueError(
                    f"queue round {study.study_name!r} was created but its cells were never published "
                    f"(its creator died?). Delete that Optuna study and rerun."
                )
            time.sleep(self.poll_seconds / 4)

    def _trials(self, study: optuna.Study, states: tuple[TrialState, ...]) -> list[FrozenTrial]:
        return retrying(lambda: study.get_trials(deepcopy=False, states=states))

    def claim(self, study: optuna.Study) -> Claim | None:
        """Take one WAITING cell of ``study``, or None if there is none to take right now.

        Cells that train come first; a cell that reuses another's run waits until that cell's trial settled.
        """
        fail_stale_trials(study)
        the_study_id = study_id(self.storage, study.study_name)
        trials = self._trials(study, tuple(TrialState))
        unsettled = {cell.key for t in trials if t.state in (TrialState.WAITING, TrialState.RUNNING)
                     for cell in [_cell(t)] if cell is not None}
        waiting = sorted((t for t in trials if t.state == TrialState.WAITING),
                         key=lambda t: (_source(t) is not None, t.number))
        for trial in waiting:
            source = _source(trial)
            if source is not None and source.key in unsettled:
                continue
            trial_id = retrying(lambda t=trial: self.storage.get_trial_id_from_study_id_trial_number(
                the_study_id, t.number))
            try:
                won = retrying(lambda t=trial_id: self.storage.set_trial_state_values(t, TrialState.RUNNING))
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
            if won:
                # Beat at once: a trial that never beat is never seen as stale, so a worker dying right
                # here would otherwise leave its cell RUNNING for ever.
                self._beat(trial_id)
                return Claim(trial_id, trial.number, _cell(trial), trial.user_attrs.get(RUN_ID_ATTR), source)
        return None

    def has_work(self, study: optuna.Study) -> bool:
        """Whether ``study`` has cells WAITING or RUNNING (after failing those whose worker died)."""
        return bool(self._trials(study, (TrialState.RUNNING, TrialState.WAITING)))

    def round_cells(self, study: optuna.Study) -> list[Cell]:
        """The cells a round enqueued (a retried cell once)."""
        return self.progress(study).cells

    def enqueued_cells(self) -> list[Cell]:
        """Every cell any round of this queue enqueued, in order."""
        cells = {}
        for name in self._round_names():
            for cell in self.round_cells(self._load(name)):
                cells.setdefault(cell.key, cell)
        return list(cells.values())

    def progress(self, study: optuna.Study) -> RoundProgress:
        """The round's cells, how many are settled or failed, and which are running: one read of its trials."""
        cells: dict[str, Cell] = {}
        by_state: dict[TrialState, list[Cell]] = {}
        for trial in self._trials(study, tuple(TrialState)):
            cell = _cell(trial)
            if cell is not None:
                cells[cell.key] = cell
                by_state.setdefault(trial.state, []).append(cell)

        def keys(*states: TrialState) -> set[str]:
            return {cell.key for state in states for cell in by_state.get(state, [])}

        open_keys = keys(TrialState.WAITING, TrialState.RUNNING)
        return RoundProgress(
            cells=list(cells.values()),
            settled=len([key for key in cells if key not in open_keys]),
            running=by_state.get(TrialState.RUNNING, []),
            failed=len(keys(TrialState.FAIL) - keys(TrialState.COMPLETE, TrialState.WAITING, TrialState.RUNNING)),
        )

    def record_run_id(self, claim: Claim, run_id: str) -> None:
        retrying(lambda: self.storage.set_trial_user_attr(claim.trial_id, RUN_ID_ATTR, run_id))

    def record_params(self, claim: Claim, values: Mapping[str, object], choices: Mapping[str, Sequence]) -> None:
        """Record the cell's arm, seed and settings as trial params, so optuna-dashboard can group by them."""
        existing = retrying(lambda: self.storage.get_trial(claim.trial_id)).params  # a retry inherits them
        for name, value in values.items():
            if name in existing:
                continue
            distribution = CategoricalDistribution(tuple(choices[name]))
            retrying(lambda n=name, v=value, d=distribution: self.storage.set_trial_param(
                claim.trial_id, n, d.to_internal_repr(v), d))

    def complete(self, claim: Claim, value: float) -> None:
        """The cell's run finished: its trial is COMPLETE with the run's final validation accuracy."""
        retrying(lambda: self.storage.set_trial_state_values(claim.trial_id, TrialState.COMPLETE, [value]))

    def fail(self, claim: Claim, reason: str) -> None:
        """The cell's run failed or was interrupted: its trial is FAIL, with the reason as a user attribute."""
        reason = redact(reason)[:1000]
        retrying(lambda: self.storage.set_trial_user_attr(claim.trial_id, "failure_reason", reason))
        retrying(lambda: self.storage.set_trial_state_values(claim.trial_id, TrialState.FAIL))

    def _beat(self, trial_id: int) -> None:
        retrying(lambda: self.storage.record_heartbeat(trial_id))
        retrying(lambda: self.storage.set_trial_user_attr(trial_id, HEARTBEAT_ATTR, time.time()))

    @contextmanager
    def heartbeat(self, *claims: Claim) -> Iterator[None]:
        """Record the claims' heartbeats in the background while their cells run."""
        stop = threading.Event()
        interval = self.storage.get_heartbeat_interval() or 10

        def beat() -> None:
            while not stop.is_set():
                for claim in claims:
                    with contextlib.suppress(Exception):  # a missed beat is retried; never kill the run for it
                        self._beat(claim.trial_id)
                stop.wait(interval)

        names = "-".join(str(claim.number) for claim in claims)
        thread = threading.Thread(target=beat, name=f"heartbeat-{names}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=5)

    def iterate(self, study: optuna.Study, size: int = 1) -> Iterator[list[Claim]]:
        """Yield up to ``size`` claimed cells at a time (to train together) until none is WAITING or RUNNING,
        waiting for dead workers' retries."""
        while True:
            claims = []
            while len(claims) < size and (claim := self.claim(study)) is not None:
                claims.append(claim)
            if claims:
                yield claims
                continue
            if not self.has_work(study):
                return
            time.sleep(self.poll_seconds)


def is_running(trial: FrozenTrial) -> bool:
    return trial.state == TrialState.RUNNING


def stale_trials(study: optuna.Study, grace_period: float, now: float | None = None) -> list[FrozenTrial]:
    """RUNNING trials of a queue round whose worker has not beaten for ``grace_period`` seconds (read only)."""
    now = time.time() if now is None else now
    running = retrying(lambda: study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
    return [t for t in running if now - float(t.user_attrs.get(HEARTBEAT_ATTR, 0.0)) > grace_period]
