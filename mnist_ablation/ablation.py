"""Running a study: cells (arm x seed) through the exactly-once queue into nested MLflow runs."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import keras
import pandas as pd
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from tqdm.auto import tqdm

from . import compare, tracking
from .config import TrainConfig
from .data import Mnist, load_mnist
from .workqueue import Cell, CellQueue, open_storage


WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"  # which machine and process ran a cell


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


def default_storage_url(tracking_uri: str) -> str:
    """The queue's SQLite file beside the local MLflow store (``mlruns/optuna.db`` by default)."""
    return f"sqlite:///{tracking.local_state_directory(tracking_uri) / 'optuna.db'}"


class StudyRunner:
    """One study at one set of overrides: its cells, its MLflow experiment and parent run, its queue."""

    def __init__(self, study, configs: Mapping[str, TrainConfig], seeds: Iterable[int], data: Mnist,
                 tracking_uri: str, storage_url: str, heartbeat_interval: int = 10, grace_period: int = 60,
                 command: list[str] | None = None):
        self.study = study
        self.data = data
        self.tracking_uri = tracking_uri
        self.storage_url = storage_url
        self.command = command or sys.argv
        self.configs: dict[str, TrainConfig] = {}
        self.cells: list[Cell] = []
        for arm, base in configs.items():
            for seed in seeds:
                config = base.replace(seed=seed)
                cell = Cell(arm, seed, config.hash(data.checksums))
                self.cells.append(cell)
                self.configs[cell.key] = config
        digest = hashlib.sha256("|".join(f"{c.key}:{c.config_hash}" for c in self.cells).encode()).hexdigest()[:12]
        self.storage = open_storage(storage_url, heartbeat_interval=heartbeat_interval, grace_period=grace_period)
        self.experiment_name = compare.experiment_name(study.name)
        self.experiment_id = tracking.get_or_create_experiment(self.experiment_name, {"study": study.name})
        self.queue = CellQueue(self.storage, f"ablate/{study.name}/{digest}")
        self.checkpoint_root = tracking.local_state_directory(tracking_uri) / "checkpoints"
        self._parent_run_id: str | None = None

    @classmethod
    def open(cls, study, configs, seeds, data_dir=None, tracking_uri=None, storage_url=None, **kwargs) -> "StudyRunner":
        """Check the store, load (and checksum) the data, and set up the study. Fails before any run."""
        uri = tracking.use_tracking_uri(tracking_uri)
        data = load_mnist(data_dir)
        return cls(study, configs, seeds, data, uri, storage_url or default_storage_url(uri), **kwargs)

    # -- MLflow side -------------------------------------------------------------------------------

    @property
    def parent_run_id(self) -> str:
        if self._parent_run_id is None:
            self._parent_run_id = self._get_or_create_parent()
        return self._parent_run_id

    def _get_or_create_parent(self) -> str:
        existing = compare.find_parent_run(self.study.name, self.experiment_id)
        if existing is not None:
            return existing.info.run_id
        run = MlflowClient().create_run(
            self.experiment_id,
            run_name=self.study.name,
            tags={compare.ROLE_TAG: "study", "study": self.study.name, "mlflow.note.content": self.study.description},
        )
        return run.info.run_id

    def _publish_definition(self) -> None:
        """Record the study as run now (arms, seeds, overrides, config hashes) on the parent run."""
        client = MlflowClient()
        definition = {
            "study": self.study.name,
            "description": self.study.description,
            "baseline_arm": self.study.baseline_arm,
            "command": self.command,
            "data": {"source": self.data.source, "sha256": self.data.checksums},
            "cells": [
                {"arm": c.arm, "seed": c.seed, "config_hash": c.config_hash, "config": self.configs[c.key].to_dict()}
                for c in self.cells
            ],
        }
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / compare.STUDY_DEFINITION_ARTIFACT
            path.write_text(json.dumps(definition, indent=2))
            client.log_artifact(self.parent_run_id, str(path))
        client.update_run(self.parent_run_id, status="RUNNING")

    def finished_cells(self) -> set[tuple[str, int, str]]:
        """(arm, seed, config_hash) of every FINISHED child run of this study."""
        runs = MlflowClient().search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{compare.ROLE_TAG}` = 'cell' and attributes.status = 'FINISHED'",
            max_results=50_000,
        )
        return {(r.data.tags["arm"], int(r.data.tags["seed"]), r.data.tags["config_hash"]) for r in runs}

    # -- the worker loop ---------------------------------------------------------------------------

    def run_worker(self) -> WorkerOutcome:
        """Take cells from the queue and run them until none is left. Safe to run in several processes."""
        finished = self.finished_cells()
        outcome = WorkerOutcome(skipped=sum((c.arm, c.seed, c.config_hash) in finished for c in self.cells))
        if outcome.skipped:
            print(f"skipping {outcome.skipped} of {len(self.cells)} cells: already finished with the same config hash")

        def on_create(round_study) -> None:
            self._publish_definition()
            round_study.set_user_attr("parent_run_id", self.parent_run_id)

        round_study = self.queue.open_round(
            self.cells, lambda c: (c.arm, c.seed, c.config_hash) in finished, on_create=on_create
        )
        if round_study is None:
            print(f"all {len(self.cells)} cells of study {self.study.name!r} are finished")
            return outcome
        self._parent_run_id = round_study.user_attrs.get("parent_run_id") or self.parent_run_id
        to_run = len(self.cells) - outcome.skipped
        with tqdm(total=to_run, desc=f"{self.study.name}", unit="run", dynamic_ncols=True, file=sys.stdout) as bar:
            for claim in self.queue.iterate(round_study):
                self._run_claim(claim, bar, outcome)
                bar.update(1)
        return outcome

    def _run_claim(self, claim, bar: tqdm, outcome: WorkerOutcome) -> None:
        cell = claim.cell
        config = self.configs.get(cell.key)
        if config is None or config.hash(self.data.checksums) != cell.config_hash:
            self.queue.finish(claim, TrialState.FAIL, reason="cell not in this worker's study definition")
            raise RuntimeError(
                f"queue cell {cell.key} ({cell.config_hash}) does not match this command's study definition; "
                "all workers of a study must run the same command (same --set, --epochs, --train-subset)."
            )
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
                    tags={"study": self.study.name, "arm": cell.arm, compare.ROLE_TAG: "cell",
                          "optuna_trial_number": str(claim.number), "worker": WORKER_ID},
                    parent_run_id=self._parent_run_id,
                    checkpoint_dir=self.checkpoint_root / cell.config_hash,
                    callbacks=[EpochProgress(bar, label, config.epochs)],
                    verbose=0,
                    on_run_created=lambda run_id: self.queue.record_run_id(claim, run_id),
                )
            except KeyboardInterrupt:
                self.queue.finish(claim, TrialState.FAIL, reason="interrupted")
                raise
            except Exception as error:  # noqa: BLE001 - one bad cell (a TrainingDiverged, say) must not stop the study
                self.queue.finish(claim, TrialState.FAIL, reason=f"{type(error).__name__}: {error}")
                outcome.failed += 1
                outcome.failures.append(f"{cell.key}: {type(error).__name__}: {error}")
                tqdm.write(f"FAILED {cell.key}: {type(error).__name__}: {error}")
                return
        self.queue.finish(claim, TrialState.COMPLETE, value=tracked.result.history["val_accuracy"][-1])
        outcome.ran += 1
        tqdm.write(f"finished {cell.key}: test_accuracy {tracked.result.test_accuracy:.4f} "
                   f"({time.perf_counter() - started:.0f} s, run {tracked.run_id})")

    def import_offline(self, directory: Path) -> tuple[int, int, list[str]]:
        """Log the cells saved by ``offline.run_offline`` in ``directory`` as this study's child runs.

        A folder counts only if its (arm, seed) is a cell of this study with the same config hash;
        cells already FINISHED here are skipped, so importing twice adds nothing. Returns
        (imported, skipped, problems).
        """
        from . import offline

        self._publish_definition()
        finished = self.finished_cells()
        by_key = {cell.key: cell for cell in self.cells}
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
                tags={"study": self.study.name, "arm": cell.arm, compare.ROLE_TAG: "cell",
                      "worker": record["environment"]["machine"]["hostname"]},
                parent_run_id=self.parent_run_id,
            )
            imported += 1
            tqdm.write(f"imported {cell.key}: test_accuracy {result.test_accuracy:.4f} (run {tracked.run_id})")
        return imported, skipped, problems

    # -- results -----------------------------------------------------------------------------------

    def write_summary(self) -> pd.DataFrame:
        """Per-arm table, also logged as ``summary.csv`` on the parent run, which is then FINISHED."""
        runs = compare.study_runs(self.study.name)
        summary = compare.arm_summary(runs, baseline=self.study.baseline_arm)
        failed = self.failed_arms(runs)
        summary = summary.merge(failed, on="arm", how="left")  # left keeps the study's arm order
        only_failed = failed[~failed["arm"].isin(summary["arm"])].assign(n=0)
        summary = pd.concat([summary, only_failed], ignore_index=True) if len(only_failed) else summary
        summary["n_failed"] = summary["n_failed"].fillna(0).astype(int)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "summary.csv"
            summary.to_csv(path, index=False)
            MlflowClient().log_artifact(self.parent_run_id, str(path))
        MlflowClient().set_terminated(self.parent_run_id, "FINISHED")
        return summary

    def failed_arms(self, finished: pd.DataFrame) -> pd.DataFrame:
        """Per arm, the number of seeds whose runs all failed or were killed (none finished)."""
        everything = compare.study_runs(self.study.name, include_unfinished=True)
        done = set(zip(finished["arm"], finished["seed"]))
        failed = everything[[(a, s) not in done for a, s in zip(everything["arm"], everything["seed"])]]
        counts = failed.drop_duplicates(["arm", "seed"]).groupby("arm").size()
        return pd.DataFrame({"arm": counts.index, "n_failed": counts.to_numpy()})

    def write_report(self, output: str | None):
        """The statistical report (mnist_ablation.report), written to ``output`` and the parent run."""
        from . import report

        return report.write_study_report(self.study.name, output_dir=output, parent_run_id=self.parent_run_id)
