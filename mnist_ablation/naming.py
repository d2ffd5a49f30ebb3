"""The naming scheme: how this project lays its work out in MLflow and Optuna (import-light: no MLflow).

* experiments: ``ablation/<study>`` for ablation studies, ``tune/<name>`` for tuning studies, and
  ``mnist_ablation`` for single runs of ``experiments.train``;
* runs carry the role tag ``mnist_ablation.role``: ``study`` (a study's parent run), ``cell`` (one
  (arm, seed) of a study), ``ensemble``, ``trial`` and ``best_retrain`` (tuning); cells are tagged
  ``study``, ``arm``, ``seed`` and ``config_hash``, and a cell whose arm trains exactly what another arm
  trains carries ``mnist_ablation.reuses_run`` (the run it reuses, trained once for both);
* artifact paths every run or parent run writes (``study.json``, predictions, ``report/``...);
* the cell queue's Optuna studies are named ``ablate/<study>/<digest>/round-<k>`` and their trials
  record their MLflow run in the user attribute ``mlflow_run_id`` (tuning trials do too).

``store`` queries the tracking store by these names and ``tracking`` writes by them; the commands read the
defaults here without loading MLflow.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

# -- names ------------------------------------------------------------------------------------------------

ROLE_TAG = "mnist_ablation.role"
STUDY_ROLE, CELL_ROLE, ENSEMBLE_ROLE = "study", "cell", "ensemble"  # ablation studies
TRIAL_ROLE, BEST_RETRAIN_ROLE = "trial", "best_retrain"  # tuning studies
STUDY_TAG, ARM_TAG, SEED_TAG, CONFIG_HASH_TAG = "study", "arm", "seed", "config_hash"
FAILURE_REASON_TAG = "failure_reason"
WORKER_TAG = "worker"
PACK_TAG = "pack"  # on each member run of a packed pack: "<member>/<size>:<pack id>" (pack_labels)
MEMBER_RUN_IDS_TAG = "member_run_ids"
REUSES_RUN_TAG = "mnist_ablation.reuses_run"  # a cell run that is another cell's training run (identical arms)
SWEEP_TAG = "mnist_ablation.sweep"  # a study's parent run: the digest of its sweep (arms, configs, seeds, rule)
PARENT_RUN_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"
DESCRIPTION_TAG = "mlflow.note.content"

ABLATION_EXPERIMENT_PREFIX = "ablation/"
TUNING_EXPERIMENT_PREFIX = "tune/"
DEFAULT_EXPERIMENT = "mnist_ablation"  # single runs of experiments.train
DEFAULT_MLFLOW_UI_URL = "http://127.0.0.1:5000"  # where `mlflow ui` listens: the explorer's links to runs

STUDY_DEFINITION_ARTIFACT = "study.json"  # on a study's parent run: arms, seeds, cells and their configs
RECORDED_DEFINITION_KEY = "definition"  # study.json: a user's study as its file defined it (None if built-in)
SUMMARY_ARTIFACT = "summary.csv"  # on a study's parent run
REPORT_ARTIFACT_DIR = "report"  # on a study's parent run
PREDICTIONS_ARTIFACT = "predictions/test_predictions.parquet"
TTA_PREDICTIONS_ARTIFACT = "predictions/test_predictions_tta.parquet"
CONFIG_ARTIFACT = "config.json"
ENVIRONMENT_ARTIFACT = "environment.json"
ENSEMBLE_ARTIFACT = "ensemble.json"
MODEL_NAME = "model"  # runs:/<run_id>/model

QUEUE_PREFIX = "ablate/"
RUN_ID_ATTR = "mlflow_run_id"  # user attribute of a queue or tuning trial: its MLflow run


def ablation_experiment(study: str) -> str:
    """The MLflow experiment that holds an ablation study."""
    return f"{ABLATION_EXPERIMENT_PREFIX}{study}"


def tuning_experiment(study_name: str) -> str:
    """The MLflow experiment that holds a tuning study."""
    return f"{TUNING_EXPERIMENT_PREFIX}{study_name}"


def queue_name(study: str, digest: str) -> str:
    """The prefix of a study's queue rounds at one set of cells (``digest`` of their keys and hashes)."""
    return f"{QUEUE_PREFIX}{study}/{digest}"


def round_name(queue: str, number: int) -> str:
    return f"{queue}/round-{number}"


def round_number(queue: str, name: str) -> int | None:
    """k of ``<queue>/round-<k>``, or None when ``name`` is not a round of ``queue``."""
    prefix = f"{queue}/round-"
    suffix = name[len(prefix):]
    return int(suffix) if name.startswith(prefix) and suffix.isdigit() else None


def is_queue_round(optuna_study_name: str) -> bool:
    return optuna_study_name.startswith(QUEUE_PREFIX)


def pack_labels(run_names: Sequence[str]) -> list[str]:
    """The ``PACK_TAG`` of each member of one pack, in order: ``"<member>/<size>:<pack id>"``.

    The pack id is drawn anew for every pack (a rerun of the same cells is another pack).
    """
    pack_id = hashlib.sha256("".join(run_names).encode() + os.urandom(8)).hexdigest()[:8]
    return [f"{index + 1}/{len(run_names)}:{pack_id}" for index in range(len(run_names))]
