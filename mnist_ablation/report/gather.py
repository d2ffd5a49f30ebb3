"""Gathering a study for its report: everything read from the tracking store, once, into ``StudyData``."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from .. import naming, stats, store, tracking
from ..errors import StudyError
from ..redaction import redact
from ..studies import STUDIES, baseline_arm_of
from ..sweep import usable_runs

HISTORY_METRICS = ("accuracy", "val_accuracy", "loss", "val_loss")


@dataclass
class StudyData:
    """A study's runs, definition, per-epoch histories and per-image test results, as read from the store."""

    study: str
    tracking_uri: str  # redacted: safe to print and to write into the report
    parent_run_id: str | None
    definition: dict | None
    baseline: str
    runs: pd.DataFrame  # every cell run of the current definition, any status
    finished: pd.DataFrame  # one usable FINISHED run per (arm, seed): ``sweep.usable_runs``
    planned: pd.DataFrame | None  # (arm, seed) cells of study.json
    unusable: pd.DataFrame = field(default_factory=pd.DataFrame)  # FINISHED runs without a finite test accuracy
    histories: pd.DataFrame = field(default_factory=pd.DataFrame)  # run_id, arm, seed, epoch, metrics
    correct: pd.DataFrame | None = None  # tidy arm, seed, image, correct (stats.compare_to_baseline's input)
    labels: np.ndarray | None = None  # test labels
    predicted_by_run: dict[str, np.ndarray] = field(default_factory=dict)
    environment: dict | None = None  # environment.json of a baseline run: commit, machine, packages, data

    @cached_property
    def correctness(self) -> stats.CorrectnessArray | None:
        """``correct`` validated and arranged as arrays, once for every statistic (None without predictions)."""
        return stats.correctness_array(self.correct) if self.correct is not None and len(self.correct) else None

    @property
    def arms(self) -> list[str]:
        """Arms in the study's order: planned cells first, then any others with runs."""
        planned = list(self.planned["arm"]) if self.planned is not None else []
        return list(dict.fromkeys([*planned, *self.runs.get("arm", [])]))

    @property
    def factors(self) -> dict[str, dict[str, bool]] | None:
        """Per arm, which components are on, for a factorial study (from study.json or the study registry)."""
        if self.definition and self.definition.get("factors"):
            return self.definition["factors"]
        return STUDIES[self.study].factors if self.study in STUDIES else None

    def configs(self) -> dict[str, dict]:
        """Each arm's config (seed aside) as recorded in study.json."""
        configs: dict[str, dict] = {}
        for cell in (self.definition or {}).get("cells", []):
            configs.setdefault(cell["arm"], cell["config"])
        return configs


def gather_study(study: str, tracking_uri: str | None = None, predictions: bool = True,
                 histories: bool = True) -> StudyData:
    """Read a study's runs (all statuses), definition, metric histories and test predictions from the store."""
    uri = tracking.ensure_tracking_uri(tracking_uri)
    parent = store.find_parent_run(study)
    if parent is None:
        raise StudyError(
            f"no study {study!r} in the tracking store {redact(uri)} (no parent run in experiment "
            f"{naming.ablation_experiment(study)!r}). Run `python -m experiments.ablate --study {study}` first, "
            "or pass the store it used with --tracking-uri."
        )
    definition = store.study_definition(study)
    runs = store.cell_runs(study, include_unfinished=True)
    planned = None
    if definition and definition.get("cells"):
        planned = pd.DataFrame([{"arm": c["arm"], "seed": int(c["seed"])} for c in definition["cells"]])
    counted = usable_runs(runs)  # the one rule for which run of a cell counts
    finished = counted.usable
    data = StudyData(study, redact(uri), parent.info.run_id, definition, baseline_arm_of(study, definition), runs,
                     finished, planned, unusable=counted.unusable)
    data.environment = _environment(data)
    if histories and len(finished):
        data.histories = store.metric_histories(finished, HISTORY_METRICS)
    if predictions and len(finished):
        try:
            logged = store.read_test_predictions(finished)
        except ValueError as error:
            raise StudyError(str(error)) from error
        data.labels, data.predicted_by_run, data.correct = logged.labels, logged.predicted_by_run, logged.correct
    return data


def failure_reasons(data: StudyData, arm: str) -> list[str]:
    """One line per run of ``arm`` that did not finish (or finished without a test accuracy), with its reason."""
    runs = data.runs[(data.runs["arm"] == arm) & (data.runs["status"] != "FINISHED")]
    reasons = []
    for row in runs.itertuples():
        reason = row.failure_reason if isinstance(row.failure_reason, str) else "no failure_reason recorded"
        reasons.append(f"seed {row.seed} {row.status}: {redact(reason.strip().splitlines()[0][:200])}")
    for row in data.unusable[data.unusable["arm"] == arm].itertuples() if len(data.unusable) else []:
        reasons.append(f"seed {row.seed} FINISHED without a finite test accuracy ({row.test_accuracy}); "
                       "counted as a failed cell")
    return reasons


def _environment(data: StudyData) -> dict | None:
    """The environment.json of a baseline run (else any finished run): commit, machine, packages, data."""
    ordered = pd.concat([data.finished[data.finished["arm"] == data.baseline], data.finished])
    for run_id in ordered["run_id"].drop_duplicates()[:3]:
        record = store.read_json_artifact(run_id, naming.ENVIRONMENT_ARTIFACT)
        if record is not None:
            return record
    return None


def load_test_images(data: StudyData, data_dir) -> tuple[np.ndarray | None, str | None]:
    """MNIST test images for the examples figure, or (None, why not). Never downloads."""
    from ..data import DATA_DIR_ENV, DataError, load_mnist

    candidates = [data_dir, os.environ.get(DATA_DIR_ENV), ((data.definition or {}).get("data") or {}).get("source")]
    chosen = next((c for c in candidates if c and Path(c).exists()), None)
    if chosen is None:
        return None, (f"MNIST test images were not found (no --data-dir, ${DATA_DIR_ENV} unset, and the study's "
                      "data source is not on this machine), so the figure of examples the arms get wrong is "
                      "left out. Pass --data-dir to include it.")
    try:
        mnist = load_mnist(chosen)
    except DataError as error:
        return None, f"MNIST test images could not be loaded from {chosen} ({error}); the examples figure is left out."
    if data.labels is not None and not np.array_equal(mnist.y_test, data.labels):
        return None, f"the test labels in {chosen} do not match the runs' predictions; the examples figure is left out."
    return mnist.x_test, None
