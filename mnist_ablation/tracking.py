"""Writing to MLflow: where runs go, and logging one training run completely.

With ``store`` (which reads), the only library module that imports ``mlflow``. A run logs every config field as a param,
per-epoch metrics, final metrics, the seed's two figures, per-example test predictions, config.json, an
environment record and the model. A run that fails is ended FAILED (with ``failure_reason``), one that
is interrupted KILLED; only a run whose every artifact landed is FINISHED.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence
from urllib.parse import urlparse

import keras
import mlflow
import numpy as np
import pandas as pd
from mlflow.entities import Metric, Param, RunStatus
from mlflow.tracking import MlflowClient

from .config import TrainConfig
from .data import Mnist
from .environment import environment_record
from .errors import TrackingError
from .model import inference_copy
from .plots import confusion_matrix_figure, training_curves_figure
from .redaction import redact
from .store import (CONFIG_ARTIFACT, CONFIG_HASH_TAG, DEFAULT_EXPERIMENT, DESCRIPTION_TAG, ENVIRONMENT_ARTIFACT,
                    FAILURE_REASON_TAG, MODEL_NAME, PARENT_RUN_TAG, PREDICTIONS_ARTIFACT, SEED_TAG,
                    TTA_PREDICTIONS_ARTIFACT)
from .train import EPOCH_METRICS, RunResult, train

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
DEFAULT_STORE_DIR = Path("mlruns")


def default_tracking_uri() -> str:
    """``sqlite:///<cwd>/mlruns/mlflow.db``: database and artifacts together under ./mlruns."""
    return f"sqlite:///{(Path.cwd() / DEFAULT_STORE_DIR / 'mlflow.db').resolve()}"


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The URI given, else $MLFLOW_TRACKING_URI, else the local ./mlruns store."""
    return uri or os.environ.get(TRACKING_URI_ENV) or default_tracking_uri()


def store_directory(uri: str) -> Path | None:
    """The local directory a ``sqlite:///`` or file store lives in (None for servers)."""
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        path = uri[len("sqlite:///"):]
        if not path or path == ":memory:":
            return None
        return Path("/" + path.lstrip("/") if uri.startswith("sqlite:////") else path).resolve().parent
    if parsed.scheme in ("", "file"):
        return Path(parsed.path or uri).resolve()
    return None


def local_state_directory(uri: str) -> Path:
    """Where this machine keeps per-run state (checkpoints) for ``uri``: beside a local store."""
    directory = store_directory(uri)
    return directory if directory is not None else (Path.cwd() / DEFAULT_STORE_DIR).resolve()


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, before any training, if the store cannot be reached or created."""
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        import requests

        try:
            response = requests.get(uri.rstrip("/") + "/health", timeout=timeout)
            response.raise_for_status()
        except requests.RequestException as error:
            raise TrackingError(
                f"MLflow tracking server at {redact(uri)} is not reachable ({type(error).__name__}: {error}). "
                f"Start it (e.g. `mlflow server --host 127.0.0.1 --port 5000`) or pass another --tracking-uri."
            ) from None
    elif parsed.scheme == "sqlite":
        directory = store_directory(uri)
        if directory is not None:
            try:
                directory.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise TrackingError(f"cannot create the tracking store directory {directory}: {error}") from None
    elif parsed.scheme not in ("", "file", "postgresql", "mysql", "mssql", "databricks"):
        raise TrackingError(
            f"tracking URI {redact(uri)!r} has an unknown scheme {parsed.scheme!r}; expected sqlite:///PATH.db, "
            "http://HOST:PORT, a SQLAlchemy database URL or a directory."
        )


def current_tracking_uri() -> str:
    return mlflow.get_tracking_uri()


def ensure_tracking_uri(uri: str | None = None) -> str:
    """``uri`` if given; else the store the caller chose (``mlflow.set_tracking_uri`` or the environment);
    else the project's default ``./mlruns``. For library functions a user calls from Python."""
    if uri:
        return use_tracking_uri(uri)
    try:
        from mlflow.tracking._tracking_service.utils import is_tracking_uri_set
    except ImportError:  # a future MLflow without it: the environment variable alone decides
        chosen = bool(os.environ.get(TRACKING_URI_ENV))
    else:
        chosen = is_tracking_uri_set()
    return current_tracking_uri() if chosen else use_tracking_uri(None)


def use_tracking_uri(uri: str | None) -> str:
    """Resolve, check and activate a tracking URI; returns it."""
    resolved = resolve_tracking_uri(uri)
    check_tracking_uri(resolved)
    mlflow.set_tracking_uri(resolved)
    return resolved


def get_or_create_experiment(name: str, tags: Mapping[str, str] | None = None) -> str:
    """Experiment id by name, creating it (artifacts beside a local database) if needed; race-safe."""
    client = MlflowClient()
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    directory = store_directory(mlflow.get_tracking_uri())
    location = (directory / "artifacts" / name.replace("/", "_")).as_uri() if directory else None
    try:
        return client.create_experiment(name, artifact_location=location, tags=dict(tags or {}))
    except mlflow.exceptions.MlflowException:
        # Another worker created it between our look-up and create.
        existing = client.get_experiment_by_name(name)
        if existing is None:
            raise
        return existing.experiment_id


def flatten_params(config: TrainConfig) -> dict[str, str]:
    """Every config field as an MLflow param (tuples as comma lists, None as 'None')."""
    return {
        name: ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)
        for name, value in config.to_dict().items()
    }


class MlflowEpochLogger(keras.callbacks.Callback):
    """Logs the per-epoch metrics of a run as MLflow metrics with ``step=epoch``."""

    def __init__(self, run_id: str):
        super().__init__()
        self.run_id = run_id
        self.client = MlflowClient()

    def on_epoch_end(self, epoch, logs=None):
        log_epoch_metrics(self.client, self.run_id, epoch, logs or {})


def log_epoch_metrics(client: MlflowClient, run_id: str, epoch: int, values: Mapping[str, float]) -> None:
    now = int(time.time() * 1000)
    metrics = [Metric(key, float(values[key]), now, epoch) for key in EPOCH_METRICS if key in values]
    client.log_batch(run_id, metrics=metrics)


def predictions_frame(labels: np.ndarray, probabilities: np.ndarray) -> pd.DataFrame:
    """One row per test image: its index, true label, predicted class and ten probabilities."""
    frame = pd.DataFrame(probabilities.astype(np.float32), columns=[f"prob_{k}" for k in range(10)])
    frame.insert(0, "predicted", probabilities.argmax(axis=1).astype(np.int64))
    frame.insert(0, "label", labels.astype(np.int64))
    frame.insert(0, "index", np.arange(len(labels), dtype=np.int64))
    return frame


def log_result_artifacts(result: RunResult, title: str) -> None:
    """Final metrics, figures, predictions and the model, into the active run."""
    metrics = {
        "test_loss": result.test_loss,
        "test_accuracy": result.test_accuracy,
        "train_seconds": result.train_seconds,
        "train_images_per_second": result.train_images_per_second,
        **result.extra_metrics,
    }
    mlflow.log_metrics(metrics)
    for name, figure in (
        ("plots/training_curves.png", training_curves_figure(result.history, title)),
        ("plots/confusion_matrix.png", confusion_matrix_figure(result.test_labels, result.test_probabilities.argmax(1))),
    ):
        mlflow.log_figure(figure, name)
    log_predictions(result.test_labels, result.test_probabilities, PREDICTIONS_ARTIFACT)
    if result.tta_probabilities is not None:
        log_predictions(result.test_labels, result.tta_probabilities, TTA_PREDICTIONS_ARTIFACT)
    log_keras_model(result.model)


def log_predictions(labels: np.ndarray, probabilities: np.ndarray, artifact: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(artifact).name
        predictions_frame(labels, probabilities).to_parquet(path, index=False)
        mlflow.log_artifact(str(path), artifact_path=str(Path(artifact).parent))


def log_keras_model(model: keras.Model) -> None:
    """Log the model so ``mlflow.keras.load_model(f"runs:/{run_id}/model")`` returns it."""
    from mlflow.models import infer_signature

    example = np.zeros((1, 28, 28, 1), dtype=np.float32)
    signature = infer_signature(example, np.zeros((1, 10), dtype=np.float32))
    inference_model = inference_copy(model)  # logged for inference, without the optimizer's state
    # Stated, not inferred: MLflow's requirement inference re-imports the model in a subprocess (~20 s a run).
    requirements = [f"{name}=={importlib.metadata.version(name)}" for name in ("tensorflow", "keras")]
    mlflow.keras.log_model(inference_model, name=MODEL_NAME, signature=signature, pip_requirements=requirements)


@dataclass
class TrackedRun:
    run_id: str
    result: RunResult


def _end_failed(run_id: str, status: str, reason: str) -> None:
    """End the active run with ``status`` (never FINISHED), recording why."""
    try:
        MlflowClient().set_tag(run_id, FAILURE_REASON_TAG, redact(reason)[:4900])
    finally:
        mlflow.end_run(status)


def mark_run_dead(run_id: str, reason: str) -> bool:
    """End a run left RUNNING by a dead process as KILLED, recording why. True if it was changed."""
    client = MlflowClient()
    try:
        run = client.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return False
    if run.info.status != "RUNNING":
        return False
    client.set_tag(run_id, FAILURE_REASON_TAG, redact(reason))
    client.set_terminated(run_id, "KILLED")
    return True


def _start_run(config: TrainConfig, config_hash: str, experiment_name: str, run_name: str | None,
               tags: Mapping[str, str] | None, parent_run_id: str | None) -> str:
    experiment_id = get_or_create_experiment(experiment_name)
    all_tags = {CONFIG_HASH_TAG: config_hash, SEED_TAG: str(config.seed), **dict(tags or {})}
    if parent_run_id:
        all_tags[PARENT_RUN_TAG] = parent_run_id
    return mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=all_tags).info.run_id


def _log_config(run_id: str, config: TrainConfig, environment: Mapping) -> None:
    MlflowClient().log_batch(run_id, params=[Param(k, v) for k, v in flatten_params(config).items()])
    mlflow.log_dict(config.to_dict(), CONFIG_ARTIFACT)
    mlflow.log_dict(dict(environment), ENVIRONMENT_ARTIFACT)


@contextlib.contextmanager
def _finished_only_if_complete(run_id: str, stop_exceptions: tuple[type[BaseException], ...] = ()):
    """End the active run FINISHED if the body completes, KILLED on an interrupt, FAILED on any error.

    ``stop_exceptions`` are decisions, not faults (a pruned tuning trial): the run ends KILLED with the
    exception's message as its description and a ``stopped_early`` tag, no traceback.
    """
    try:
        yield
    except KeyboardInterrupt:
        _end_failed(run_id, "KILLED", "interrupted (KeyboardInterrupt / SIGINT)")
        raise
    except stop_exceptions as stopped:
        try:
            set_tags(run_id, {"stopped_early": str(stopped), DESCRIPTION_TAG: str(stopped)})
        finally:
            mlflow.end_run("KILLED")
        raise
    except BaseException as error:
        _end_failed(run_id, "FAILED", f"{type(error).__name__}: {error}\n{traceback.format_exc(limit=5)}")
        raise
    mlflow.end_run(RunStatus.to_string(RunStatus.FINISHED))


def run_training(config: TrainConfig, data: Mnist, *, experiment_name: str = DEFAULT_EXPERIMENT,
                 run_name: str | None = None, tags: Mapping[str, str] | None = None,
                 parent_run_id: str | None = None, checkpoint_dir: str | os.PathLike | None = None,
                 callbacks: Sequence[keras.callbacks.Callback] = (), verbose: int | str = 2,
                 on_run_created=None, stop_exceptions: tuple[type[BaseException], ...] = ()) -> TrackedRun:
    """Train ``config`` on ``data`` inside a new MLflow run and log everything.

    Any exception ends the run FAILED with a ``failure_reason`` tag, and an interrupt ends it KILLED;
    the exception propagates. The checkpoint directory is removed only after the run is FINISHED.
    """
    run_id = _start_run(config, config.hash(data.checksums), experiment_name, run_name, tags, parent_run_id)
    if on_run_created is not None:
        on_run_created(run_id)
    with _finished_only_if_complete(run_id, stop_exceptions):
        client = MlflowClient()
        _log_config(run_id, config, environment_record(data.checksums, data.source))
        result = train(config, data, callbacks=[MlflowEpochLogger(run_id), *callbacks],
                       checkpoint_dir=checkpoint_dir, verbose=verbose)
        # Epochs trained before a resume come from the checkpoint's history, so the curve is whole.
        for epoch in range(result.initial_epoch):
            log_epoch_metrics(client, run_id, epoch, {k: v[epoch] for k, v in result.history.items()})
        if result.initial_epoch:
            mlflow.set_tag("resumed_from_epoch", str(result.initial_epoch))
        log_result_artifacts(result, run_name or "")
    if checkpoint_dir is not None:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return TrackedRun(run_id, result)


def log_offline_result(result: RunResult, record: Mapping, *, experiment_name: str = DEFAULT_EXPERIMENT,
                       run_name: str | None = None, tags: Mapping[str, str] | None = None,
                       parent_run_id: str | None = None) -> TrackedRun:
    """Log a run trained elsewhere (``offline.load_result``) with everything ``run_training`` logs.

    Its environment.json is the record of the machine that trained it; tags ``trained_offline`` and
    ``keras_backend`` say so. Like ``run_training``, it is FINISHED only once every artifact landed.
    """
    run_id = _start_run(result.config, record["config_hash"], experiment_name, run_name,
                        {**dict(tags or {}), "trained_offline": "true", "keras_backend": record["keras_backend"]},
                        parent_run_id)
    with _finished_only_if_complete(run_id):
        _log_config(run_id, result.config, record["environment"])
        client = MlflowClient()
        for epoch in range(len(result.history["loss"])):
            log_epoch_metrics(client, run_id, epoch, {k: v[epoch] for k, v in result.history.items()})
        log_result_artifacts(result, run_name or "")
    return TrackedRun(run_id, result)


# -- writing to runs by id (parent runs, ensembles, tuning) ----------------------------------------------


def create_run(experiment_id: str, run_name: str, tags: Mapping[str, str]) -> str:
    """A new RUNNING run (not the active one), e.g. a study's parent run; returns its id."""
    return MlflowClient().create_run(experiment_id, run_name=run_name, tags=dict(tags)).info.run_id


def log_params(run_id: str, params: Mapping[str, object]) -> None:
    """Params of a run by id (values as strings, credentials redacted); existing equal values are fine."""
    MlflowClient().log_batch(run_id, params=[Param(k, redact(str(v))[:6000]) for k, v in params.items()])


def log_metrics(run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
    now = int(time.time() * 1000)
    MlflowClient().log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


def log_json(run_id: str, payload, artifact_file: str) -> None:
    MlflowClient().log_dict(run_id, payload, artifact_file)


def log_text(run_id: str, text: str, artifact_file: str) -> None:
    MlflowClient().log_text(run_id, text, artifact_file)


def log_figure(run_id: str, figure, artifact_file: str) -> None:
    """Log a matplotlib figure to a run by id (and release it if pyplot made it, as Optuna's plots do)."""
    MlflowClient().log_figure(run_id, figure, artifact_file)
    if getattr(figure, "number", None) is not None:  # a pyplot-managed figure
        import matplotlib.pyplot as plt

        plt.close(figure)


def log_files(run_id: str, files: Sequence[tuple[Path, str | None]]) -> None:
    """Log local files to a run: (path, artifact directory or None for the root)."""
    client = MlflowClient()
    for path, directory in files:
        client.log_artifact(run_id, str(path), artifact_path=directory)


def set_tags(run_id: str, tags: Mapping[str, str]) -> None:
    client = MlflowClient()
    for key, value in tags.items():
        client.set_tag(run_id, key, redact(str(value)))


def set_status(run_id: str, status: str) -> None:
    """``RUNNING`` reopens a run (a study resumed); ``FINISHED``, ``FAILED`` or ``KILLED`` end it."""
    client = MlflowClient()
    if status == "RUNNING":
        client.update_run(run_id, status="RUNNING")
    else:
        client.set_terminated(run_id, status)


@contextlib.contextmanager
def active_run(experiment_id: str, run_name: str, tags: Mapping[str, str]):
    """A run that is the active one inside the block and ends FINISHED only if the block completes.

    For runs assembled from other runs' results (ensembles): any exception ends it FAILED with a
    ``failure_reason``, an interrupt KILLED; the exception propagates.
    """
    run_id = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=dict(tags)).info.run_id
    with _finished_only_if_complete(run_id):
        yield run_id
