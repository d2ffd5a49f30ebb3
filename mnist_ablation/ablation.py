"""Running a study: cells (arm x seed) through the exactly-once queue into nested MLflow runs.

A *sweep* is one study at one set of settings (arms, their configs, seeds, the seeding rule). It has one
MLflow parent run (tag ``mnist_ablation.sweep``), reused when the same command runs again, and one cell
queue in the Optuna storage. Cells run by any number of workers, each exactly once.

With a precision rule (``--target-ci-width W --max-seeds M``) the sweep runs in rounds: after the first
seeds, each round adds the next seed to every arm whose difference interval from the baseline is still
wider than W (and to the baseline, so that every seed is paired), until every arm meets W, reaches M
seeds, or is limited by the test set itself. The decision reads the intervals' widths only, never the
estimates or their p-values.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import keras
import pandas as pd
from tqdm.auto import tqdm

from . import naming, store, tracking
from .config import TrainConfig, effective_settings
from .data import Mnist, load_mnist
from .redaction import redact_argv
from .storage import default_storage_url, open_storage
from .studies import Cell, Study, identical_arms
from .workqueue import CellQueue

WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"  # which machine and process ran a cell
PARENT_RUN_ATTR = "parent_run_id"  # queue round user attribute


@dataclass(frozen=True)
class PrecisionRule:
    """Add seeds until each arm's difference interval is at most ``target_ci_width`` wide (a fraction)."""

    target_ci_width: float
    max_seeds: int
    confidence: float = 0.95

    def __post_init__(self) -> None:
        if not 0 < self.target_ci_width < 1:
            raise ValueError(f"target CI width {self.target_ci_width!r}: expected a fraction in (0, 1), "
                             "e.g. 0.002 for an interval 0.2 points wide.")
        if self.max_seeds < 2:
            raise ValueError(f"max seeds {self.max_seeds!r}: expected an integer >= 2.")


@dataclass
class WorkerOutcome:
    ran: int = 0
    failed: int = 0
    skipped: int = 0
    failures: list[str] = field(default_factory=list)


class EpochProgress(keras.callbacks.Callback):
    """Shows the running cell's epoch and latest metrics on the study's progress bar."""

    def __init__(self, bar: tqdm, label: str, epochs: int):
        super().__init__()
        self.bar, self.label, self.epochs = bar, label, epochs

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        self.bar.set_postfix_str(
            f"{self.label} epoch {epoch + 1}/{self.epochs} loss {logs.get('loss', float('nan')):.3f} "
            f"val_acc {logs.get('val_accuracy', float('nan')):.4f}"
        )


def _metric_key(name: str, arm: str) -> str:
    # MLflow metric names allow letters, digits, _ - . / and spaces; factorial arms join removals with "+".
    return f"{name}/{arm.replace('+', '_and_')}"


class StudyRunner:
    """One sweep of a study: its cells, its MLflow experiment and parent run, its queue."""

    def __init__(self, study: Study, configs: Mapping[str, TrainConfig], seeds: Iterable[int], data: Mnist,
                 tracking_uri: str, storage_url: str, heartbeat_interval: int = 10, grace_period: int = 60,
                 command: Sequence[str] | None = None, precision: PrecisionRule | None = None):
        self.study = study
        self.arm_configs = dict(configs)
        self.seeds = list(seeds)
        self.data = data
        self.tracking_uri = tracking_uri
        self.storage_url = storage_url
        self.command = redact_argv(command or sys.argv)
        self.precision = precision
        self.initial_cells = [self.cell(arm, seed) for arm in self.arm_configs for seed in self.seeds]
        self.digest = self._digest()
        self.storage = open_storage(storage_url, heartbeat_interval=heartbeat_interval, grace_period=grace_period)
        self.experiment_name = naming.ablation_experiment(study.name)
        self.experiment_id = tracking.get_or_create_experiment(self.experiment_name, {"study": study.name})
        self.queue = CellQueue(self.storage, naming.queue_name(study.name, self.digest))
        self.checkpoint_root = tracking.local_state_directory(tracking_uri) / "checkpoints"
        self._parent_run_id: str | None = None

    @classmethod
    def open(cls, study, configs, seeds, data_dir=None, tracking_uri=None, storage_url=None, **kwargs) -> StudyRunner:
        """Check the store, load (and checksum) the data, and set up the study. Fails before any run."""
        uri = tracking.use_tracking_uri(tracking_uri)
        data = load_mnist(data_dir)
        storage_url = storage_url or default_storage_url(tracking.local_state_directory(uri))
        return cls(study, configs, seeds, data, uri, storage_url, **kwargs)

    # -- cells -------------------------------------------------------------------------------------

    def config_of(self, arm: str, seed: int) -> TrainConfig:
        return self.arm_configs[arm].replace(seed=seed)

    def cell(self, arm: str, seed: int) -> Cell:
        return Cell(arm, seed, self.config_of(arm, seed).hash(self.data.checksums))

    def _digest(self) -> str:
        text = "|".join(f"{c.key}:{c.config_hash}" for c in self.initial_cells)
        if self.precision is not None:
            text += f"|precision:{self.precision.target_ci_width}:{self.precision.max_seeds}"
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def planned_cells(self) -> list[Cell]:
        """The first seeds' cells and every cell a round of this sweep has enqueued since.

        Under a precision rule, also every finished run of one of this sweep's arm configs at a seed below the
        maximum (say from an earlier sweep with more seeds): the rule counts it rather than training it again.
        """
        cells = {c.key: c for c in self.initial_cells}
        for cell in self.queue.enqueued_cells():
            cells.setdefault(cell.key, cell)
        if self.precision is not None:
            for arm, seed, config_hash in store.finished_cells(self.study.name):
                if (arm in self.arm_configs and seed < self.precision.max_seeds
                        and self.cell(arm, seed).config_hash == config_hash):
                    cells.setdefault(Cell(arm, seed, config_hash).key, Cell(arm, seed, config_hash))
        return list(cells.values())

    # -- MLflow side -------------------------------------------------------------------------------

    @property
    def parent_run_id(self) -> str:
        if self._parent_run_id is None:
            self._parent_run_id = self._get_or_create_parent()
        return self._parent_run_id

    def _get_or_create_parent(self) -> str:
        existing = store.find_parent_run(self.study.name, self.experiment_id, sweep=self.digest)
        if existing is not None:
            return existing.info.run_id
        run_id = tracking.create_run(self.experiment_id, self.study.name, {
            naming.ROLE_TAG: naming.STUDY_ROLE, naming.STUDY_TAG: self.study.name, naming.SWEEP_TAG: self.digest,
            naming.DESCRIPTION_TAG: self.study.description,
        })
        tracking.log_params(run_id, self.settings())
        return run_id

    def settings(self) -> dict[str, object]:
        """The sweep's settings, the parent run's params (what the MLflow UI shows for the study)."""
        base = self.arm_configs.get(self.study.baseline_arm) or next(iter(self.arm_configs.values()))
        shared = {k: v for k, v in effective_settings(base).items()
                  if all(effective_settings(c).get(k) == v for c in self.arm_configs.values())}
        settings = {
            "study": self.study.name,
            "baseline_arm": self.study.baseline_arm,
            "arms": ",".join(self.arm_configs),
            "seeds": len(self.seeds),
            "epochs": base.epochs,
            "train_subset": base.train_subset,
            "validation": base.validation,
            "data_source": self.data.source,
            "target_ci_width": self.precision.target_ci_width if self.precision else None,
            "max_seeds": self.precision.max_seeds if self.precision else None,
        }
        for name in ("batch_size", "optimizer", "architecture"):
            if name in shared:
                settings[name] = shared[name]
        return settings

    def _publish_definition(self, cells: Sequence[Cell]) -> None:
        """Record the sweep as run now (arms, seeds, overrides, config hashes) on the parent run."""
        cells = list({cell.key: cell for cell in cells}.values())
        definition = {
            "study": self.study.name,
            "description": self.study.description,
            "baseline_arm": self.study.baseline_arm,
            "factors": self.study.factors,
            "command": self.command,
            "sweep": self.digest,
            "precision": None if self.precision is None else {
                "target_ci_width": self.precision.target_ci_width, "max_seeds": self.precision.max_seeds,
                "confidence": self.precision.confidence, "first_stage_seeds": max(len(self.seeds), 2)},
            "identical_arms": identical_arms(self.arm_configs),
            "data": {"source": self.data.source, "sha256": self.data.checksums},
            "cells": [
                {"arm": c.arm, "seed": c.seed, "config_hash": c.config_hash,
                 "config": self.config_of(c.arm, c.seed).to_dict()}
                for c in sorted(cells, key=lambda c: (list(self.arm_configs).index(c.arm), c.seed))
            ],
        }
        tracking.log_json(self.parent_run_id, definition, naming.STUDY_DEFINITION_ARTIFACT)
        tracking.set_status(self.parent_run_id, "RUNNING")

    # -- the worker loop ---------------------------------------------------------------------------

    def run_worker(self) -> WorkerOutcome:
        """Take cells from the queue and run them until none is left. Safe to run in several processes."""
        finished = store.finished_cells(self.study.name)
        outcome = WorkerOutcome(skipped=sum((c.arm, c.seed, c.config_hash) in finished for c in self.initial_cells))
        if outcome.skipped:
            print(f"skipping {outcome.skipped} of {len(self.initial_cells)} cells: already finished with the same "
                  "config hash")
        candidates = self.planned_cells()  # a rerun first retries what earlier rounds left unfinished
        for number in range(1_000):
            round_study = self._open_round(candidates)
            if round_study is not None:
                self._run_round(round_study, outcome)
            elif number == 0 and self.precision is None:
                print(f"all {len(candidates)} cells of study {self.study.name!r} are finished")
            if self.precision is None:
                break
            previous, candidates = candidates, self.precision_additions()
            if not candidates or {c.key for c in candidates} == {c.key for c in previous}:
                break  # every arm has stopped (or, defensively, the rule proposes nothing new)
        return outcome

    def _open_round(self, cells: Sequence[Cell]):
        finished = store.finished_cells(self.study.name)

        def on_create(round_study) -> None:
            self._publish_definition([*self.planned_cells(), *cells])
            round_study.set_user_attr(PARENT_RUN_ATTR, self.parent_run_id)

        round_study = self.queue.open_round(cells, lambda c: (c.arm, c.seed, c.config_hash) in finished,
                                            on_create=on_create)
        if round_study is not None:
            self._parent_run_id = round_study.user_attrs.get(PARENT_RUN_ATTR) or self.parent_run_id
        return round_study

    def _run_round(self, round_study, outcome: WorkerOutcome) -> None:
        progress = self.queue.progress(round_study)
        label = f"{self.study.name} {round_study.study_name.rsplit('/', 1)[-1]}"
        with tqdm(total=len(progress.cells), desc=label, unit="cell", dynamic_ncols=True, file=sys.stdout,
                  smoothing=0) as bar:
            bar.update(progress.settled)
            for claim in self.queue.iterate(round_study):
                self._run_claim(claim, bar, outcome)
                bar.update(1)

    def _param_choices(self) -> dict[str, tuple]:
        """Per trial param, its possible values: arm, seed and the settings that differ between arms."""
        settings = {arm: effective_settings(config) for arm, config in self.arm_configs.items()}
        varying = [k for k in settings[next(iter(settings))]
                   if len({json.dumps(s.get(k), sort_keys=True) for s in settings.values()}) > 1]
        max_seeds = self.precision.max_seeds if self.precision else len(self.seeds)
        choices = {"arm": tuple(self.arm_configs), "seed": tuple(range(max(max_seeds, max(self.seeds) + 1)))}
        for name in varying:
            values = [self._param_value(s.get(name)) for s in settings.values()]
            choices[name] = tuple(dict.fromkeys(values))
        return choices

    @staticmethod
    def _param_value(value):
        return value if isinstance(value, (bool, int, float, str)) or value is None else json.dumps(value)

    def _run_claim(self, claim, bar: tqdm, outcome: WorkerOutcome) -> None:
        cell = claim.cell
        if cell.arm not in self.arm_configs or self.cell(cell.arm, cell.seed).config_hash != cell.config_hash:
            self.queue.fail(claim, "cell not in this worker's study definition")
            raise RuntimeError(
                f"queue cell {cell.key} ({cell.config_hash}) does not match this command's study definition; "
                "all workers of a study must run the same command (same --set, --epochs, --train-subset)."
            )
        config = self.config_of(cell.arm, cell.seed)
        choices = self._param_choices()
        settings = effective_settings(config)
        self.queue.record_params(claim, {"arm": cell.arm, "seed": cell.seed,
                                         **{k: self._param_value(settings.get(k)) for k in choices
                                            if k not in ("arm", "seed")}}, choices)
        if claim.previous_run_id:
            tracking.mark_run_dead(claim.previous_run_id, "worker died during this run (heartbeat went stale); "
                                                          "the cell was retried")
        label = f"{cell.key} (run {outcome.ran + outcome.failed + 1})"
        bar.set_postfix_str(f"{label} starting")
        started = time.perf_counter()
        with self.queue.heartbeat(claim):
            try:
                tracked = tracking.run_training(
                    config, self.data,
                    experiment_name=self.experiment_name,
                    run_name=cell.key,
                    tags=self._cell_tags(cell, {"optuna_trial_number": str(claim.number),
                                                naming.WORKER_TAG: WORKER_ID}),
                    parent_run_id=self._parent_run_id,
                    checkpoint_dir=self.checkpoint_root / cell.config_hash,
                    callbacks=[EpochProgress(bar, label, config.epochs)],
                    verbose=0,
                    on_run_created=lambda run_id: self.queue.record_run_id(claim, run_id),
                )
            except KeyboardInterrupt:
                self.queue.fail(claim, "interrupted")
                raise
            except Exception as error:  # noqa: BLE001 - one bad cell (a TrainingDiverged, say) must not stop the study
                self.queue.fail(claim, f"{type(error).__name__}: {error}")
                outcome.failed += 1
                outcome.failures.append(f"{cell.key}: {type(error).__name__}: {error}")
                tqdm.write(f"FAILED {cell.key}: {type(error).__name__}: {error}")
                return
        self.queue.complete(claim, tracked.result.history["val_accuracy"][-1])
        outcome.ran += 1
        tqdm.write(f"finished {cell.key}: test_accuracy {tracked.result.test_accuracy:.4f} "
                   f"({time.perf_counter() - started:.0f} s, run {tracked.run_id})")

    def _cell_tags(self, cell: Cell, extra: Mapping[str, str]) -> dict[str, str]:
        return {naming.STUDY_TAG: self.study.name, naming.ARM_TAG: cell.arm, naming.ROLE_TAG: naming.CELL_ROLE, **extra}

    # -- precision-driven seeding -----------------------------------------------------------------------

    def precision_additions(self) -> list[Cell]:
        """The next round's new cells under the precision rule (none when every arm has stopped)."""
        planned = self.planned_cells()
        decisions = self.precision_decisions(planned)
        open_arms = [arm for arm, (reason, _) in decisions.items() if reason is None]
        if not open_arms:
            return []
        attempted = {arm: {c.seed for c in planned if c.arm == arm} for arm in self.arm_configs}
        next_seed = max(max(seeds) for seeds in attempted.values() if seeds) + 1
        additions = []
        for arm in open_arms:
            seed = min(s for s in range(next_seed + 1) if s not in attempted[arm])
            additions.append(self.cell(arm, seed))
            if seed not in attempted[self.study.baseline_arm]:
                additions.append(self.cell(self.study.baseline_arm, seed))
        additions = list({c.key: c for c in additions}.values())
        print(f"precision round: arms still open: {', '.join(open_arms)} (interval wider than "
              f"{100 * self.precision.target_ci_width:.2f} points); adding "
              f"{', '.join(c.key for c in additions)}", flush=True)
        return additions

    def precision_decisions(self, planned: Sequence[Cell] | None = None) -> dict[str, tuple[str | None, float]]:
        """Per compared arm: (why it stopped, or None while it needs seeds; its interval width now)."""
        from . import stats

        planned = self.planned_cells() if planned is None else planned
        runs = store.cell_runs(self.study.name, all_sweeps=True)
        keys = {(c.arm, c.seed, c.config_hash) for c in planned}
        runs = runs[[k in keys for k in zip(runs["arm"], runs["seed"], runs["config_hash"])]]
        runs = runs.drop_duplicates(["arm", "seed"], keep="last")
        correct = store.prediction_correctness(runs)
        if self.study.baseline_arm not in set(correct["arm"]):
            print(f"precision rule: no finished {self.study.baseline_arm!r} run to compare with; no seeds added",
                  flush=True)
            return {}
        # Seeds attempted (finished or failed) count towards the maximum, so a failing arm cannot loop. The
        # decision is Stein's: made from each arm's first-stage seeds only (stats.precision_seeds).
        attempted = {arm: len({c.seed for c in planned if c.arm == arm}) for arm in self.arm_configs}
        table = stats.precision_decisions(correct, max(len(self.seeds), 2), self.precision.target_ci_width,
                                          self.precision.max_seeds, baseline=self.study.baseline_arm,
                                          confidence=self.precision.confidence, n_seeds=attempted)
        return {row.arm: (row.stop_reason, row.first_stage_width) for row in table.itertuples()}

    # -- offline cells ------------------------------------------------------------------------------------

    def import_offline(self, directory: Path) -> tuple[int, int, list[str]]:
        """Log the cells saved by ``offline.run_offline`` in ``directory`` as this study's child runs.

        A folder counts only if its (arm, seed) is a cell of this study with the same config hash;
        cells already FINISHED here are skipped, so importing twice adds nothing. Returns
        (imported, skipped, problems).
        """
        from . import offline

        planned = self.planned_cells()
        self._publish_definition(planned)
        finished = store.finished_cells(self.study.name)
        by_key = {cell.key: cell for cell in planned}
        imported, skipped, problems = 0, 0, []
        for folder in offline.saved_cells(directory):
            result, record = offline.load_result(folder)
            cell = by_key.get(record["key"])
            if cell is None or cell.config_hash != record["config_hash"]:
                problems.append(f"{folder.name}: not a cell of this study as defined by this command "
                                f"(config hash {record['config_hash']}); same --study, --seeds, --epochs, "
                                "--train-subset and --set as the offline run?")
                continue
            if (cell.arm, cell.seed, cell.config_hash) in finished:
                skipped += 1
                continue
            tracked = tracking.log_offline_result(
                result, record, experiment_name=self.experiment_name, run_name=cell.key,
                tags=self._cell_tags(cell, {naming.WORKER_TAG: record["environment"]["machine"]["hostname"]}),
                parent_run_id=self.parent_run_id, input_example=self.data.x_test[:1],
            )
            imported += 1
            tqdm.write(f"imported {cell.key}: test_accuracy {result.test_accuracy:.4f} (run {tracked.run_id})")
        return imported, skipped, problems

    # -- several workers on this machine ------------------------------------------------------------------

    def log_directory(self) -> Path:
        """Where worker processes of this sweep on this machine write their own output (beside the store)."""
        directory = tracking.local_state_directory(self.tracking_uri) / "logs" / self.study.name / self.digest
        directory.mkdir(parents=True, exist_ok=True)
        return directory

    def watch(self, processes: Sequence[subprocess.Popen], poll_seconds: float = 2.0) -> None:
        """One progress line for the whole sweep while ``processes`` run: per round, done / total, running, ETA."""
        bar, current, shown = None, None, None
        # On a terminal the line redraws in place; in a log file, a new line only every half minute.
        interval = 0.5 if sys.stdout.isatty() else 30.0
        try:
            while any(process.poll() is None for process in processes):
                round_study = self.queue.latest_round()
                if round_study is not None:
                    progress = self.queue.progress(round_study)
                    if round_study.study_name != current:
                        if bar is not None:
                            bar.close()
                            still_open = sorted({c.arm for c in progress.cells} - {self.study.baseline_arm})
                            print(f"precision round {round_study.study_name.rsplit('/', 1)[-1]}: arms still open: "
                                  f"{', '.join(still_open)}", flush=True)
                        current = round_study.study_name
                        bar = tqdm(total=len(progress.cells), unit="cell", dynamic_ncols=True,
                                   desc=f"{self.study.name} {current.rsplit('/', 1)[-1]}", file=sys.stdout,
                                   mininterval=interval, smoothing=0)  # ETA from the whole round's throughput
                    if bar.total != len(progress.cells):  # the round's creator may still be publishing its cells
                        bar.total = len(progress.cells)
                    bar.update(progress.settled - bar.n)
                    running = progress.running
                    text = f"running {len(running)}: {', '.join(c.key for c in running)}" + (
                        f"; {progress.failed} failed" if progress.failed else "")
                    if text != shown:
                        bar.set_postfix_str(text, refresh=False)
                        shown = text
                time.sleep(poll_seconds)
        finally:
            if bar is not None:
                bar.close()

    # -- results ------------------------------------------------------------------------------------------

    def write_summary(self) -> pd.DataFrame:
        """Per-arm table, logged as ``summary.csv`` and as metrics on the parent run, which is then FINISHED."""
        from .compare import arm_summary

        runs = store.cell_runs(self.study.name)
        summary = arm_summary(runs, baseline=self.study.baseline_arm)
        failed = self.failed_arms(runs)
        summary = summary.merge(failed, on="arm", how="left")  # left keeps the study's arm order
        only_failed = failed[~failed["arm"].isin(summary["arm"])].assign(n=0)
        summary = pd.concat([summary, only_failed], ignore_index=True) if len(only_failed) else summary
        summary["n_failed"] = summary["n_failed"].fillna(0).astype(int)
        tracking.log_text(self.parent_run_id, summary.to_csv(index=False), naming.SUMMARY_ARTIFACT)
        metrics = {}
        for row in summary.itertuples():
            for name in ("n", "test_accuracy_mean", "test_accuracy_std", "delta_vs_baseline", "n_failed"):
                value = getattr(row, name, None)
                if value is not None and pd.notna(value):
                    metrics[_metric_key(name, row.arm)] = float(value)
        tracking.log_metrics(self.parent_run_id, metrics)
        tracking.set_status(self.parent_run_id, "FINISHED")
        return summary

    def failed_arms(self, finished: pd.DataFrame) -> pd.DataFrame:
        """Per arm, the number of seeds whose runs all failed or were killed (none finished)."""
        everything = store.cell_runs(self.study.name, include_unfinished=True)
        done = set(zip(finished["arm"], finished["seed"]))
        failed = everything[[(a, s) not in done for a, s in zip(everything["arm"], everything["seed"])]]
        counts = failed.drop_duplicates(["arm", "seed"]).groupby("arm").size()
        return pd.DataFrame({"arm": counts.index, "n_failed": counts.to_numpy()})

    def write_report(self, output: str | None, **options):
        """The statistical report (mnist_ablation.report), written to ``output`` and the parent run."""
        from .report import write_study_report

        return write_study_report(self.study.name, output_dir=output, parent_run_id=self.parent_run_id, **options)

