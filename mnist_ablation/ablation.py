"""Running a study: a plan's cells (``sweep``) through the exactly-once queue into nested MLflow runs.

A *sweep* is one study at one set of settings (``sweep.Plan``). It has one MLflow parent run (tag
``mnist_ablation.sweep``), reused when the same command runs again, and one cell queue in the Optuna
storage. Workers loop: claim cells → train them → log each. A cell whose arm trains exactly what another
arm trains reuses that arm's run (tag ``mnist_ablation.reuses_run``) instead of training it again.

With a precision rule the sweep runs in rounds: after each, ``Plan.next_round`` reads the results and names
the next cells, until every arm has stopped. The runner reports through an ``Observer`` (lines and
progress); the command layer draws them. Cells trained offline are logged by ``offline_import``; the summary
is ``compare.study_summary`` logged by ``tracking.log_study_summary``, the report ``report.write_study_report``.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import pandas as pd

from . import naming, store, tracking
from .config import TrainConfig, pack_group_key
from .data import Mnist, load_mnist
from .redaction import redact, redact_argv
from .storage import default_storage_url, open_storage
from .studies import Study
from .sweep import Cell, Plan, PrecisionRound, PrecisionRule, usable_runs, usable_runs_by_cell
from .workqueue import CellQueue, Claim

WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"  # which machine and process ran a cell
PARENT_RUN_ATTR = "parent_run_id"  # queue round user attribute
logger = logging.getLogger(__name__)


@dataclass
class WorkerOutcome:
    ran: int = 0
    failed: int = 0
    skipped: int = 0
    reused: int = 0
    failures: list[str] = field(default_factory=list)


class Observer:
    """What a sweep reports while it runs. By default, lines go to ``logging``; a command overrides these to
    print them and draw progress (``experiments.ablate``)."""

    def line(self, text: str) -> None:
        logger.info(text)

    def round_started(self, label: str, total: int, settled: int) -> None:
        """A queue round of ``total`` cells (``settled`` of them already done) starts in this worker."""

    def cell_started(self, label: str) -> None:
        """This worker took a cell (``label``: its key and how many cells this worker has run)."""

    def epoch_ended(self, label: str, epoch: int, epochs: int, logs: Mapping[str, float]) -> None:
        """An epoch of the running cell ended (Keras ``logs``: loss, val_accuracy, ...)."""

    def cell_settled(self) -> None:
        """The cell this worker took finished, failed or reused another cell's run."""

    def round_ended(self) -> None:
        """This worker has nothing left to take in the round."""


class ReusableRuns:
    """The usable run of each cell that another cell may reuse (``sweep.usable_runs_by_cell``): the study's cell
    runs are read on the first look-up and again only for a cell not among them (its run finished since, in
    another worker), not once per reusing cell."""

    def __init__(self, study: str):
        self.study = study
        self._runs: dict[tuple[str, int, str], pd.Series] | None = None

    def of(self, cell: Cell) -> pd.Series | None:
        if self._runs is None or cell.identity not in self._runs:
            self._runs = usable_runs_by_cell(store.cell_runs(self.study, all_sweeps=True))
        return self._runs.get(cell.identity)


class StudyRunner:
    """One sweep of a study: its plan, its MLflow experiment and parent run, its queue; a worker's loop."""

    def __init__(self, plan: Plan, data: Mnist, tracking_uri: str, storage_url: str, heartbeat_interval: int = 10,
                 grace_period: int = 60, command: Sequence[str] | None = None, observer: Observer | None = None,
                 pack: int = 1):
        self.plan, self.study, self.data = plan, plan.study, data
        self.pack = pack  # cells claimed and trained together (packed.py); 1 = one at a time, the trainer
        self.tracking_uri, self.storage_url = tracking_uri, storage_url
        self.command = redact_argv(command or sys.argv)
        self.observer = observer or Observer()
        self.storage = open_storage(storage_url, heartbeat_interval=heartbeat_interval, grace_period=grace_period)
        self.experiment_name = naming.ablation_experiment(self.study.name)
        self.experiment_id = tracking.get_or_create_experiment(self.experiment_name, {"study": self.study.name})
        self.queue = CellQueue(self.storage, naming.queue_name(self.study.name, plan.digest))
        self.checkpoint_root = tracking.local_state_directory(tracking_uri) / "checkpoints"
        self._parent_run_id: str | None = None
        self._reusable = ReusableRuns(self.study.name)  # read anew each round

    @classmethod
    def open(cls, study: Study, configs: Mapping[str, TrainConfig], seeds: Iterable[int], data_dir=None,
             tracking_uri=None, storage_url=None, precision: PrecisionRule | None = None, **kwargs) -> StudyRunner:
        """Check the store, load (and checksum) the data, and plan the sweep. Fails before any run."""
        uri = tracking.use_tracking_uri(tracking_uri)
        data = load_mnist(data_dir)
        plan = Plan(study, configs, seeds, data.checksums, precision)
        storage_url = storage_url or default_storage_url(tracking.local_state_directory(uri))
        return cls(plan, data, uri, storage_url, **kwargs)

    def planned_cells(self) -> list[Cell]:
        """The first seeds' cells, every cell a round of this sweep has enqueued since, and the cells they reuse.

        Under a precision rule, also every finished run of one of this sweep's arm configs at a seed below the
        maximum (say from an earlier sweep with more seeds): the rule counts it rather than training it again.
        """
        cells = [*self.plan.initial_cells, *self.queue.enqueued_cells()]
        if self.plan.precision is not None:
            finished = store.finished_cells(self.study.name)
            cells += self.plan.counted_by_the_rule(Cell(*identity) for identity in finished)
        return self.plan.with_sources(cells)

    # -- the parent run --------------------------------------------------------------------------------

    @property
    def parent_run_id(self) -> str:
        if self._parent_run_id is None:
            existing = store.find_parent_run(self.study.name, self.experiment_id, sweep=self.plan.digest)
            self._parent_run_id = existing.info.run_id if existing is not None else self._create_parent()
        return self._parent_run_id

    def _create_parent(self) -> str:
        run_id = tracking.create_run(self.experiment_id, self.study.name, {
            naming.ROLE_TAG: naming.STUDY_ROLE, naming.STUDY_TAG: self.study.name,
            naming.SWEEP_TAG: self.plan.digest, naming.DESCRIPTION_TAG: self.study.description})
        tracking.log_params(run_id, self.plan.settings(self.data.source))
        return run_id

    def publish_definition(self, cells: Sequence[Cell]) -> None:
        """Record the sweep as run now (arms, seeds, overrides, config hashes) on the parent run."""
        definition = self.plan.definition(cells, self.command, self.data.source)
        tracking.log_json(self.parent_run_id, definition, naming.STUDY_DEFINITION_ARTIFACT)
        tracking.set_status(self.parent_run_id, "RUNNING")

    # -- the worker loop: claim → train → log ---------------------------------------------------------

    def run_worker(self) -> WorkerOutcome:
        """Take cells from the queue and run them until none is left. Safe to run in several processes."""
        finished = store.finished_cells(self.study.name)
        initial = self.plan.initial_cells
        outcome = WorkerOutcome(skipped=sum(c.identity in finished for c in initial))
        if outcome.skipped:
            self.observer.line(f"skipping {outcome.skipped} of {len(initial)} cells: already finished with the "
                               "same config hash")
        candidates = self.planned_cells()  # a rerun first retries what earlier rounds left unfinished
        for number in range(1_000):
            round_study = self._open_round(candidates)
            if round_study is not None:
                self._run_round(round_study, outcome)
            elif number == 0 and self.plan.precision is None:
                self.observer.line(f"all {len(candidates)} cells of study {self.study.name!r} are finished")
            if self.plan.precision is None:
                break
            previous, candidates = candidates, self.precision_round().additions
            if not candidates or {c.key for c in candidates} <= {c.key for c in previous}:
                break  # every arm has stopped (or, defensively, the rule proposes nothing new)
        return outcome

    def _open_round(self, cells: Sequence[Cell]):
        finished = store.finished_cells(self.study.name)
        cells = self.plan.with_sources(cells)

        def on_create(round_study) -> None:
            self.publish_definition([*self.planned_cells(), *cells])
            round_study.set_user_attr(PARENT_RUN_ATTR, self.parent_run_id)

        round_study = self.queue.open_round(cells, lambda c: c.identity in finished, on_create=on_create,
                                            source_of=self.plan.source_of)
        if round_study is not None:
            self._parent_run_id = round_study.user_attrs.get(PARENT_RUN_ATTR) or self.parent_run_id
        return round_study

    def _run_round(self, round_study, outcome: WorkerOutcome) -> None:
        progress = self.queue.progress(round_study)
        self.observer.round_started(self.round_label(round_study), len(progress.cells), progress.settled)
        self._reusable = ReusableRuns(self.study.name)
        try:
            for claims in self.queue.iterate(round_study, size=self.pack):
                self.run_claims(claims, outcome)
        finally:
            self.observer.round_ended()

    def round_label(self, round_study) -> str:
        """The study's name and the queue round's (``round-1``): what progress shows for a round."""
        return f"{self.study.name} {round_study.study_name.rsplit('/', 1)[-1]}"

    def run_claims(self, claims: Sequence[Claim], outcome: WorkerOutcome) -> None:
        """Run claimed cells: each reusing cell logs its source's run, the others train (``train``), then each
        is logged to the queue and reported."""
        for claim in claims:
            self._check(claim)
        reusing = [claim for claim in claims if claim.source is not None]
        training = [claim for claim in claims if claim.source is None]
        started = time.perf_counter()
        with self.queue.heartbeat(*claims):
            results = {claim.number: self._reuse(claim) for claim in reusing}
            results.update(zip([claim.number for claim in training], self.train(training, outcome)))
        for claim in claims:
            result = results[claim.number]
            if isinstance(result, BaseException):
                reason = redact(f"{type(result).__name__}: {result}")  # a stopped server's error quotes its URL
                self.queue.fail(claim, reason)
                outcome.failed += 1
                outcome.failures.append(f"{claim.cell.key}: {reason}")
                self.observer.line(f"FAILED {claim.cell.key}: {reason}")
            else:
                run_id, test_accuracy, val_accuracy = result
                self.queue.complete(claim, val_accuracy)
                reused = f", reuses {claim.source.key}" if claim.source is not None else ""
                outcome.reused += claim.source is not None
                outcome.ran += claim.source is None
                self.observer.line(f"finished {claim.cell.key}: test_accuracy {test_accuracy:.4f} "
                                   f"({time.perf_counter() - started:.0f} s, run {run_id}{reused})")
            self.observer.cell_settled()

    def _check(self, claim: Claim) -> None:
        if not self.plan.owns(claim.cell):
            self.queue.fail(claim, "cell not in this worker's study definition")
            raise RuntimeError(
                f"queue cell {claim.cell.key} ({claim.cell.config_hash}) does not match this command's study "
                "definition; all workers of a study must run the same command (same --set, --epochs, --train-subset)."
            )
        self.queue.record_params(claim, self.plan.params_of(claim.cell), self.plan.param_choices())
        if claim.previous_run_id:
            tracking.mark_run_dead(claim.previous_run_id, "worker died during this run (heartbeat went stale); "
                                                          "the cell was retried")

    def train(self, claims: Sequence[Claim], outcome: WorkerOutcome) -> list:
        """Train the claimed cells, each into its own MLflow child run: per claim, (run id, test accuracy,
        validation accuracy) or the exception that failed it. Claims whose configs can pack
        (``config.pack_group_key``) train together as one pack when ``pack`` > 1; the others one at a time."""
        groups: dict[str, list[Claim]] = {}
        for claim in claims:
            config = self.plan.config_of(claim.cell.arm, claim.cell.seed)
            groups.setdefault(pack_group_key(config, self.pack) or claim.cell.key, []).append(claim)
        results: dict[int, object] = {}
        try:
            for group in groups.values():
                trained = self._train_pack(group, outcome) if len(group) > 1 else [self._train_one(group[0], outcome)]
                results.update(zip([claim.number for claim in group], trained, strict=True))
        except KeyboardInterrupt:
            for unfinished in claims:
                if unfinished.number not in results:
                    self.queue.fail(unfinished, "interrupted")
            raise
        return [results[claim.number] for claim in claims]

    def _claim_callbacks(self, claim: Claim, label: str) -> list:
        from .train import EpochEnd

        epochs = self.plan.config_of(claim.cell.arm, claim.cell.seed).epochs
        return [EpochEnd(lambda epoch, logs: self.observer.epoch_ended(label, epoch, epochs, logs))]

    def _claim_tags(self, claim: Claim) -> dict[str, str]:
        return self.cell_tags(claim.cell, {"optuna_trial_number": str(claim.number), naming.WORKER_TAG: WORKER_ID})

    def _train_one(self, claim: Claim, outcome: WorkerOutcome):
        cell, config = claim.cell, self.plan.config_of(claim.cell.arm, claim.cell.seed)
        label = f"{cell.key} (run {outcome.ran + outcome.failed + 1})"
        self.observer.cell_started(label)
        try:
            tracked = tracking.run_training(
                config, self.data, experiment_name=self.experiment_name, run_name=cell.key,
                tags=self._claim_tags(claim), parent_run_id=self._parent_run_id,
                checkpoint_dir=self.checkpoint_root / cell.config_hash, callbacks=self._claim_callbacks(claim, label),
                verbose=0, on_run_created=lambda run_id: self.queue.record_run_id(claim, run_id),
            )
        except Exception as error:  # noqa: BLE001 - one bad cell (a TrainingDiverged, say) must not stop the study
            return error
        return tracked.run_id, tracked.result.test_accuracy, tracked.result.history["val_accuracy"][-1]

    def _train_pack(self, claims: Sequence[Claim], outcome: WorkerOutcome) -> list:
        label = f"pack of {len(claims)}: {', '.join(claim.cell.key for claim in claims)}"
        self.observer.cell_started(label)
        members = [tracking.PackMember(
            config=self.plan.config_of(claim.cell.arm, claim.cell.seed), run_name=claim.cell.key,
            tags=self._claim_tags(claim), checkpoint_dir=self.checkpoint_root / claim.cell.config_hash,
            callbacks=self._claim_callbacks(claim, claim.cell.key),
            on_run_created=lambda run_id, claim=claim: self.queue.record_run_id(claim, run_id),
        ) for claim in claims]
        try:
            outcomes = tracking.run_training_pack(members, self.data, experiment_name=self.experiment_name,
                                                  parent_run_id=self._parent_run_id)
        except Exception as error:  # noqa: BLE001 - the pack failed as a whole: each of its cells failed
            return [error] * len(claims)
        return [outcome if isinstance(outcome, BaseException) else
                (outcome.run_id, outcome.result.test_accuracy, outcome.result.history["val_accuracy"][-1])
                for outcome in outcomes]

    def _reuse(self, claim: Claim):
        """Log the claimed cell as a run that reuses its source cell's run: (run id, test and val accuracy), or
        the exception that failed it."""
        try:
            source = self._reusable.of(claim.source)
            if source is None:
                raise RuntimeError(f"the cell whose run it reuses, {claim.source.key}, has no usable finished run "
                                   "(it failed); rerun the command to retry both")
            run_id = self.log_reuse(claim.cell, source, {"optuna_trial_number": str(claim.number)})
        except KeyboardInterrupt:
            self.queue.fail(claim, "interrupted")
            raise
        except Exception as error:  # noqa: BLE001 - reported and counted like a failed training
            return error
        self.queue.record_run_id(claim, run_id)
        return run_id, float(source["test_accuracy"]), float(source.get("val_accuracy", float("nan")))

    def log_reuse(self, cell: Cell, source: pd.Series, extra: Mapping[str, str] | None = None) -> str:
        """Log ``cell`` as a child run that reuses ``source`` (its source cell's usable run); returns its run id."""
        return tracking.log_reused_run(
            source["run_id"], self.plan.config_of(cell.arm, cell.seed), cell.config_hash,
            experiment_name=self.experiment_name, run_name=cell.key, parent_run_id=self.parent_run_id,
            tags=self.cell_tags(cell, {naming.WORKER_TAG: WORKER_ID, **(extra or {})}))

    def cell_tags(self, cell: Cell, extra: Mapping[str, str]) -> dict[str, str]:
        """The tags of ``cell``'s child run (study, arm, role) and ``extra``."""
        return {naming.STUDY_TAG: self.study.name, naming.ARM_TAG: cell.arm, naming.ROLE_TAG: naming.CELL_ROLE, **extra}

    # -- precision-driven seeding -------------------------------------------------------------------------

    def precision_round(self) -> PrecisionRound:
        """The precision rule's decisions on the results so far, and the next round's cells."""
        planned = self.planned_cells()
        runs = store.cell_runs(self.study.name, all_sweeps=True)
        keys = {c.identity for c in planned}
        runs = runs[[k in keys for k in zip(runs["arm"], runs["seed"], runs["config_hash"])]]
        correct = store.prediction_correctness(usable_runs(runs).usable)
        if self.plan.baseline not in set(correct["arm"]):
            self.observer.line(f"precision rule: no finished {self.plan.baseline!r} run to compare with; no seeds "
                               "added")
            return PrecisionRound({}, [])
        decided = self.plan.next_round(planned, correct)
        if decided.additions:
            self.observer.line(f"precision round: {decided.description}")
        return decided
