"""Cells trained without MLflow or Optuna, saved as folders, and logged into a study later.

For a machine that has a GPU and a Keras backend but not the tracking stack (for example JAX and no
TensorFlow or MLflow): ``python -m experiments.ablate --offline DIR`` trains each (arm, seed) cell with
the same trainer and writes one folder per cell; ``python -m experiments.ablate --import-offline DIR``,
on a machine with the tracking store, logs each folder as the study's child run, with everything a
tracked run has (params, per-epoch and final metrics, figures, predictions, config, the environment of
the machine that trained it, the model). Nothing here imports MLflow, Optuna or TensorFlow.

A cell's folder is written under a temporary name and renamed when complete, so a run that is killed
leaves no folder that looks finished, and rerunning the command skips the cells already written. With
``pack`` > 1 (``--offline DIR --pack K``), cells that share a model structure train together as one pack
(``packed.train_pack``, Keras on JAX), and each member is still saved as its own cell folder, checkpointed
on its own and marked with the pack it trained in (the ``pack`` tag once imported).
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from .config import TrainConfig, from_dict, pack_group_key
from .data import Mnist, load_mnist
from .environment import environment_record
from .studies import Study
from .sweep import Cell, Plan

RECORD_FILE = "result.json"
MODEL_FILE = "model.keras"
ARRAYS = ("test_labels", "test_probabilities", "tta_probabilities")
FORMAT_VERSION = 1
logger = logging.getLogger(__name__)


def save_result(result, directory: Path, cell: Cell, data: Mnist, pack: str | None = None) -> Path:
    """Write ``result`` (a ``train.RunResult`` of ``cell``) to ``directory``, atomically.

    ``pack``: the member's ``naming.PACK_TAG`` value when it trained in a pack (recorded as ``"pack"``).
    """
    directory = Path(directory)
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    from .model import inference_copy

    inference_copy(result.model).save(partial / MODEL_FILE)
    for name in ARRAYS:
        value = getattr(result, name)
        if value is not None:
            np.save(partial / f"{name}.npy", value)
    import keras

    record = {
        "format_version": FORMAT_VERSION,
        "arm": cell.arm,
        "seed": cell.seed,
        "key": cell.key,
        "config": result.config.to_dict(),
        "config_hash": cell.config_hash,
        "history": result.history,
        "test_loss": result.test_loss,
        "test_accuracy": result.test_accuracy,
        "train_seconds": result.train_seconds,
        "train_images_per_second": result.train_images_per_second,
        "num_train_images": result.num_train_images,
        "initial_epoch": result.initial_epoch,
        "extra_metrics": result.extra_metrics,
        "keras_backend": keras.backend.backend(),
        "environment": environment_record(data.checksums, data.source),
    }
    if pack is not None:
        record["pack"] = pack
    (partial / RECORD_FILE).write_text(json.dumps(record, indent=2))
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(partial, directory)
    return directory


def load_result(directory: Path):
    """(``train.RunResult``, record dict) from a folder written by ``save_result``."""
    import keras

    from .train import RunResult

    directory = Path(directory)
    record = json.loads((directory / RECORD_FILE).read_text())
    if record.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{directory}: format_version {record.get('format_version')!r}, expected {FORMAT_VERSION}; "
                         "retrain the cell with this version of mnist_ablation.")
    arrays = {name: np.load(directory / f"{name}.npy") if (directory / f"{name}.npy").is_file() else None
              for name in ARRAYS}
    result = RunResult(
        config=from_dict(record["config"]),
        model=keras.models.load_model(directory / MODEL_FILE, compile=False, safe_mode=True),
        history=record["history"],
        test_loss=record["test_loss"],
        test_accuracy=record["test_accuracy"],
        test_labels=arrays["test_labels"],
        test_probabilities=arrays["test_probabilities"],
        train_seconds=record["train_seconds"],
        train_images_per_second=record["train_images_per_second"],
        num_train_images=record["num_train_images"],
        initial_epoch=record["initial_epoch"],
        tta_probabilities=arrays["tta_probabilities"],
        extra_metrics=record["extra_metrics"],
    )
    return result, record


def saved_cells(root: Path) -> list[Path]:
    """The complete cell folders under ``root`` (partial ones, from a killed run, are left out)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(path for path in root.iterdir()
                  if (path / RECORD_FILE).is_file() and not path.name.endswith(".partial"))


CHECKPOINTS = ".checkpoints"


def train_cell(cell: Cell, config: TrainConfig, data_dir: str | None, out: str, data: Mnist | None = None,
               report: Callable[[str], None] | None = None) -> dict:
    """Train one cell (at ``config``) and save it under ``out/cell.key``; returns a one-line summary.

    Every epoch is checkpointed under ``out/.checkpoints/key``, so a killed cell resumes from its last
    completed epoch when the command is run again. ``report`` gets a line per epoch (default: ``logging``).
    """
    from .train import EpochEnd, train

    report = report or logger.info

    def epoch_line(epoch: int, logs: dict) -> None:
        report(f"{cell.key} epoch {epoch + 1}/{config.epochs}: val_accuracy {logs.get('val_accuracy', 0):.4f} "
               f"({logs.get('epoch_seconds', 0):.1f} s)")

    data = data if data is not None else load_mnist(data_dir)
    started = time.perf_counter()
    checkpoint = Path(out) / CHECKPOINTS / cell.key
    result = train(config, data, callbacks=[EpochEnd(epoch_line)], checkpoint_dir=checkpoint, verbose=0)
    save_result(result, Path(out) / cell.key, cell, data)
    shutil.rmtree(checkpoint, ignore_errors=True)
    return {"key": cell.key, "test_accuracy": result.test_accuracy,
            "val_accuracy": result.history["val_accuracy"][-1], "seconds": time.perf_counter() - started}


def train_pack_cells(cells: Sequence[Cell], configs: Sequence[TrainConfig], data_dir: str | None, out: str,
                     data: Mnist | None = None, report: Callable[[str], None] | None = None) -> list[dict]:
    """Train ``cells`` (at ``configs``) as one pack and save each member under ``out/cell.key``, as ``train_cell``.

    One summary per member, in order: ``train_cell``'s, or ``{"key", "error"}`` for a member that failed (it
    fails alone; the others are saved). Each member is checkpointed every epoch under ``out/.checkpoints/key``,
    so a killed pack resumes every member from its own last epoch when the command is run again, packed or not.
    Needs Keras on JAX (``KERAS_BACKEND=jax`` before Keras is imported).
    """
    from .naming import pack_labels
    from .packed import train_pack

    report = report or logger.info
    data = data if data is not None else load_mnist(data_dir)
    started = time.perf_counter()
    checkpoints = [Path(out) / CHECKPOINTS / cell.key for cell in cells]
    labels = pack_labels([cell.key for cell in cells])
    report(f"pack of {len(cells)}: {', '.join(cell.key for cell in cells)}")
    results = train_pack(configs, data, checkpoint_dirs=checkpoints, report=report)
    summaries = []
    for cell, result, checkpoint, label in zip(cells, results, checkpoints, labels, strict=True):
        if isinstance(result, BaseException):
            summaries.append({"key": cell.key, "error": f"{type(result).__name__}: {result}"})
            continue
        save_result(result, Path(out) / cell.key, cell, data, pack=label)
        shutil.rmtree(checkpoint, ignore_errors=True)
        summaries.append({"key": cell.key, "test_accuracy": result.test_accuracy,
                          "val_accuracy": result.history["val_accuracy"][-1],
                          "seconds": time.perf_counter() - started})
    return summaries


def pack_groups(cells: Sequence[Cell], config_of: Callable[[Cell], TrainConfig], pack: int) -> list[list[Cell]]:
    """``cells`` in groups of at most ``pack`` that can train as one pack (``config.pack_group_key``), in order of
    first appearance; a cell that cannot pack (the ``seed_script`` pipeline), or any cell when ``pack`` is 1,
    is a group of its own."""
    groups: dict[str, list[list[Cell]]] = {}
    for cell in cells:
        chunks = groups.setdefault(pack_group_key(config_of(cell), pack) or cell.key, [[]])
        if len(chunks[-1]) == pack:
            chunks.append([])
        chunks[-1].append(cell)
    return [chunk for chunks in groups.values() for chunk in chunks]


def run_offline(study: Study, configs: Mapping[str, TrainConfig], seeds: Iterable[int], data_dir: str | None,
                out: Path, workers: int = 1, report: Callable[[str], None] | None = None,
                pack: int = 1) -> tuple[int, int, list[str]]:
    """Train every cell of the plan not yet saved under ``out``; ``workers`` at a time in their own processes.

    A cell whose arm trains exactly what another arm trains is not trained: ``--import-offline`` logs it as
    reusing that cell's run. With ``pack`` > 1, up to ``pack`` cells that share a model structure train as one
    pack (``train_pack_cells``; Keras on JAX), each saved as its own cell. Returns (trained, skipped, failures).
    With several workers on one GPU, each JAX process is told to allocate GPU memory as it needs it rather than
    take most of the card up front. ``report`` gets one line per event (default: ``logging``); with workers it
    must be picklable (``print``).
    """
    report = report or logger.info
    data = load_mnist(data_dir)
    plan = Plan(study, configs, seeds, data.checksums)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    done = {path.name for path in saved_cells(out)}
    planned = [cell for cell in plan.with_sources(plan.initial_cells) if plan.source_of(cell) is None]
    cells = [cell for cell in planned if cell.key not in done]
    skipped = len(planned) - len(cells)
    reusing = len(plan.initial_cells) - len(planned)
    report(f"{len(cells)} cell(s) to train, {skipped} already saved in {out}"
           + (f"; {reusing} reuse an identical arm's cell" if reusing else ""))
    failures: list[str] = []
    trained = 0
    groups = pack_groups(cells, lambda cell: plan.config_of(cell.arm, cell.seed), pack)

    def settle(group: Sequence[Cell], outcome) -> None:
        nonlocal trained
        if isinstance(outcome, BaseException):  # the group failed as a whole: each of its cells failed
            outcome = [{"key": cell.key, "error": f"{type(outcome).__name__}: {outcome}"} for cell in group]
        for summary in outcome if isinstance(outcome, list) else [outcome]:
            if "error" in summary:
                failures.append(f"{summary['key']}: {summary['error']}")
                report(f"FAILED {failures[-1]}")
            else:
                trained += 1
                report(_summary_line(summary))

    def task(group: Sequence[Cell], threads: int | None, in_process: bool):
        group_configs = [plan.config_of(cell.arm, cell.seed) for cell in group]
        if threads is not None:  # a speed-only field (not in the config hash)
            group_configs = [config.replace(threads=threads) for config in group_configs]
        shared = data if in_process else None
        if len(group) == 1:  # as the tracked runner: a pack of one trains unpacked
            return train_cell, (group[0], group_configs[0], data_dir, str(out), shared, report)
        return train_pack_cells, (group, group_configs, data_dir, str(out), shared, report)

    if workers <= 1:
        for group in groups:
            function, arguments = task(group, None, in_process=True)
            try:
                settle(group, function(*arguments))
            except Exception as error:  # noqa: BLE001 - one bad cell (or pack) must not stop the others
                settle(group, error)
        return trained, skipped, failures
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    threads = max(1, (os.cpu_count() or 1) // workers)
    context = multiprocessing.get_context("spawn")  # no fork after a backend started threads
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = {}
        for group in groups:
            function, arguments = task(group, threads, in_process=False)
            futures[pool.submit(function, *arguments)] = group
        for future in concurrent.futures.as_completed(futures):
            group = futures[future]
            try:
                settle(group, future.result())
            except Exception as error:  # noqa: BLE001
                settle(group, error)
    return trained, skipped, failures


def _summary_line(summary: dict) -> str:
    return (f"saved {summary['key']}: test_accuracy {summary['test_accuracy']:.4f}, "
            f"val_accuracy {summary['val_accuracy']:.4f} ({summary['seconds']:.0f} s)")
