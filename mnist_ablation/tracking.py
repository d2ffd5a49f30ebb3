"""Writing to MLflow: where runs go, and logging one training run completely.

With ``store`` (which reads), the only library module that imports ``mlflow``. A run logs every config field as a param,
per-epoch metrics, final metrics, the seed's two figures, per-example test predictions, config.json, an
environment record, its three datasets (``mlflow.log_input``: train, validation, test) and the model (a
LoggedModel with signature, input example and the run's final metrics). A run that fails is ended FAILED
(with ``failure_reason``), one that is interrupted KILLED; only a run whose every artifact landed is
FINISHED. With MLflow's system metrics switched on (``enable_system_metrics`` or
``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=true``) runs also record ``system/*`` metrics.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote, urlparse, urlsplit, urlunsplit

import mlflow
import numpy as np
import pandas as pd
from mlflow.data.dataset import Dataset
from mlflow.data.dataset_source import DatasetSource
from mlflow.data.dataset_source_registry import get_dataset_source_from_json
from mlflow.data.http_dataset_source import HTTPDatasetSource
from mlflow.data.schema import TensorDatasetSchema
from mlflow.entities import Metric, Param, RunStatus
from mlflow.environment_variables import MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING
from mlflow.tracking import MlflowClient
from mlflow.types import Schema, TensorSpec

from .config import TrainConfig
from .data import KERAS_DOWNLOAD_SOURCE, NUM_CLASSES, Mnist
from .environment import environment_record
from .errors import TrackingError
from .model import inference_copy
from .naming import (
    CONFIG_ARTIFACT,
    CONFIG_HASH_TAG,
    DEFAULT_EXPERIMENT,
    DESCRIPTION_TAG,
    ENVIRONMENT_ARTIFACT,
    FAILURE_REASON_TAG,
    MODEL_NAME,
    PARENT_RUN_TAG,
    PREDICTIONS_ARTIFACT,
    REUSES_RUN_TAG,
    SEED_TAG,
    SUMMARY_ARTIFACT,
    TTA_PREDICTIONS_ARTIFACT,
)
from .redaction import MASK, printable, redact, remember_secrets
from .results import EPOCH_METRICS, RunResult
from .sweep import predictions_frame, summary_metrics

if TYPE_CHECKING:
    import keras

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
TRACKING_USERNAME_ENV, TRACKING_PASSWORD_ENV = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"
DEFAULT_STORE_DIR = Path("mlruns")
# The file keras.datasets.mnist.load_data() downloads: the source of runs on Keras' own copy of MNIST.
KERAS_MNIST_URL = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz"
TRAIN_DATASET, VALIDATION_DATASET, TEST_DATASET = "mnist-train", "mnist-validation", "mnist-test"
# Dataset name -> MLflow's input context (the ``mlflow.data.context`` tag the UI shows).
DATASET_CONTEXTS = {TRAIN_DATASET: "training", VALIDATION_DATASET: "validation", TEST_DATASET: "testing"}
IMAGE_SHAPE = (28, 28, 1)
# The dataset each metric is measured on; the Models tab groups a model's metrics by it.
METRIC_DATASETS = {"loss": TRAIN_DATASET, "accuracy": TRAIN_DATASET, "val_loss": VALIDATION_DATASET,
                   "val_accuracy": VALIDATION_DATASET, "test_loss": TEST_DATASET, "test_accuracy": TEST_DATASET,
                   "test_loss_tta": TEST_DATASET, "test_accuracy_tta": TEST_DATASET}
# log_model(step=N) links every run metric at step N to the model: epoch N's metrics, but also whatever
# system/* sample has step N. The model is logged at a step no metric uses (the run page's "Logged models"
# table shows it as step -1); log_final_metrics links the right metrics itself.
_UNLINKED_STEP = -1

_logger = logging.getLogger(__name__)


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


DATABASE_SCHEMES = ("postgresql", "mysql", "mssql")  # SQLAlchemy URLs, each with its driver suffix (+psycopg)
CONNECT_TIMEOUT_SECONDS = 5  # one short try before work starts, not MLflow's 125-150 s of retries


def check_tracking_uri(uri: str, timeout: float = CONNECT_TIMEOUT_SECONDS) -> None:
    """Fail fast, before any training, if the store cannot be reached or created (one short try)."""
    parsed = urlparse(uri)
    scheme = parsed.scheme.split("+")[0]
    if scheme in ("http", "https"):
        import requests

        auth = None
        if os.environ.get(TRACKING_USERNAME_ENV):
            auth = (os.environ[TRACKING_USERNAME_ENV], os.environ.get(TRACKING_PASSWORD_ENV, ""))
        try:
            response = requests.get(uri.rstrip("/") + "/health", timeout=timeout, auth=auth)
            response.raise_for_status()
        except requests.RequestException as error:
            raise TrackingError(redact(
                f"MLflow tracking server at {shown_tracking_uri(uri)} is not reachable ({type(error).__name__}: "
                f"{error}). Start it (e.g. `mlflow server --host 127.0.0.1 --port 5000`) or pass another "
                "--tracking-uri."
            )) from None
    elif scheme == "sqlite":
        directory = store_directory(uri)
        if directory is not None:
            try:
                directory.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise TrackingError(f"cannot create the tracking store directory {directory}: {error}") from None
    elif scheme in DATABASE_SCHEMES:
        _check_database(uri, timeout)
    elif scheme in ("", "file"):
        directory = Path(parsed.path or uri)
        raise TrackingError(
            f"tracking URI {redact(uri)!r} is a directory (MLflow's file store), which this MLflow no longer "
            f"writes reliably; use a SQLite database in it instead: --tracking-uri sqlite:///{directory / 'mlflow.db'}"
        )
    elif scheme != "databricks":
        raise TrackingError(
            f"tracking URI {redact(uri)!r} has an unknown scheme {parsed.scheme!r}; expected sqlite:///PATH.db, "
            "http://HOST:PORT or a SQLAlchemy database URL (postgresql://USER:PASSWORD@HOST/DB)."
        )


def _check_database(uri: str, timeout: float) -> None:
    """Connect once to a database tracking URI with a short timeout; a dead one is a TrackingError at once."""
    import sqlalchemy

    scheme = urlparse(uri).scheme.split("+")[0]
    connect_args = {"connect_timeout": max(1, int(timeout))} if scheme in ("postgresql", "mysql") else {}
    try:
        engine = sqlalchemy.create_engine(uri, connect_args=connect_args, poolclass=sqlalchemy.pool.NullPool)
        with engine.connect():
            pass
    except ModuleNotFoundError as error:
        raise TrackingError(f"tracking URI {redact(uri)} needs a database driver: {error}; e.g. pip install "
                            "'psycopg[binary]' for PostgreSQL.") from None
    except Exception as error:  # SQLAlchemy wraps every driver's connection error differently
        reason = redact(str(getattr(error, "orig", None) or error).strip().splitlines()[0][:300])
        raise TrackingError(
            f"cannot connect to the tracking database {redact(uri)} within {timeout:g} s ({type(error).__name__}: "
            f"{reason}). Start the database, check the URL and password, or pass another --tracking-uri."
        ) from None


def _credentials_to_environment(uri: str) -> str:
    """``uri`` without the user info of an http(s) URL, which goes into MLflow's own credential variables.

    MLflow then sends it as HTTP basic auth, and no URL it prints or raises holds the password.
    """
    parsed = urlsplit(uri)
    if parsed.scheme not in ("http", "https") or parsed.password is None:
        return uri
    os.environ[TRACKING_USERNAME_ENV] = unquote(parsed.username or "")
    os.environ[TRACKING_PASSWORD_ENV] = unquote(parsed.password)
    host = parsed.netloc.rpartition("@")[2]
    return urlunsplit(parsed._replace(netloc=host))


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
    """Resolve, check and activate a tracking URI; returns it (an http(s) URL without its user info, which
    moves into $MLFLOW_TRACKING_USERNAME and $MLFLOW_TRACKING_PASSWORD)."""
    resolved = resolve_tracking_uri(uri)
    remember_secrets(resolved)
    resolved = _credentials_to_environment(resolved)
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


# -- tracking server failures -------------------------------------------------------------------------

# What a request to the tracking server does, by its REST path after ``/mlflow/``: the error line says what the
# command was doing when the server failed it. A path not listed is named by the path alone.
REQUEST_ACTIVITIES = {
    "experiments/get-by-name": "look up an experiment", "experiments/get": "read an experiment",
    "experiments/create": "create an experiment", "experiments/search": "list the experiments",
    "runs/create": "start a run", "runs/get": "read a run", "runs/search": "search the runs",
    "runs/update": "end a run", "runs/log-batch": "log params and metrics", "runs/log-metric": "log a metric",
    "runs/log-parameter": "log a param", "runs/set-tag": "tag a run", "runs/log-inputs": "log the datasets",
    "runs/log-outputs": "link a model to its run", "metrics/get-history": "read a metric history",
    "artifacts/list": "list a run's artifacts", "logged-models": "log a model",
}
ARTIFACT_ACTIVITIES = {"PUT": "upload an artifact", "GET": "download an artifact", "DELETE": "delete an artifact"}
SERVER_MESSAGE_LENGTH = 300  # characters of the server's message in the line (a server's traceback stays in its log)
TRACKING_SERVER_FIX = "check --tracking-uri / $MLFLOW_TRACKING_URI and the server's log"


def shown_tracking_uri(uri: str | None = None) -> str:
    """``uri`` (default: the active tracking URI) as the user gave it, password hidden: for an http(s) server the
    user MLflow sends (``$MLFLOW_TRACKING_USERNAME``, where ``use_tracking_uri`` moved it) goes back in front of
    the host, with ``***`` for the password."""
    uri = uri or mlflow.get_tracking_uri()
    parsed = urlsplit(uri)
    user = os.environ.get(TRACKING_USERNAME_ENV)
    if parsed.scheme in ("http", "https") and user and "@" not in parsed.netloc:
        password = f":{MASK}" if os.environ.get(TRACKING_PASSWORD_ENV) else ""
        uri = urlunsplit(parsed._replace(netloc=f"{quote(user, safe='')}{password}@{parsed.netloc}"))
    return redact(uri)


def _exception_chain(error: BaseException | None) -> list[BaseException]:
    """``error`` and the exceptions it was raised from or while handling, outermost first."""
    chain: list[BaseException] = []
    while error is not None and all(error is not seen for seen in chain):
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def _failed_request(error: BaseException):
    """The ``requests`` exception of a request that failed (``None`` where MLflow kept none, or ``error`` is
    not a failed request), and whether ``error`` is one: MLflow's ``RestException`` (an error answered in
    MLflow's JSON), the ``MlflowException`` its REST client raises for anything else ("API request to ...
    failed ..."), or a ``requests`` exception (MLflow's artifact client raises ``requests.HTTPError`` as is)."""
    import requests

    if isinstance(error, requests.RequestException):
        return error, True
    if isinstance(error, mlflow.exceptions.RestException):
        return None, True
    if isinstance(error, mlflow.exceptions.MlflowException) and error.message.startswith("API request to"):
        underlying = error.__cause__ or error.__context__  # MLflow raises it while handling the requests error
        return (underlying if isinstance(underlying, requests.RequestException) else None), True
    return None, False


def _checked_response(error: BaseException):
    """The ``requests.Response`` MLflow was checking when it raised ``error``: the ``response`` argument of the
    function that raised it (``verify_rest_response``, whose ``RestException`` keeps neither the HTTP status nor
    the path), or None."""
    import requests

    entry = error.__traceback__
    while entry is not None and entry.tb_next is not None:
        entry = entry.tb_next
    response = entry.tb_frame.f_locals.get("response") if entry is not None else None
    return response if isinstance(response, requests.Response) else None


def _one_line(text: object, limit: int = SERVER_MESSAGE_LENGTH) -> str:
    text = " ".join(str(text).split())
    return printable(text if len(text) <= limit else text[:limit - 3] + "...")


def _server_message(error: BaseException, response) -> str:
    """What the server answered, to follow "HTTP 400": " CODE: message" from an MLflow error, else ": " and the
    start of its answer."""
    if isinstance(error, mlflow.exceptions.RestException):
        body = error.json if isinstance(error.json, dict) else {}
        return " " + _one_line(f"{body.get('error_code') or error.error_code}: {body.get('message', '')}")
    if response is None:
        return ""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and body.get("error_code"):
        return " " + _one_line(f"{body['error_code']}: {body.get('message', '')}")
    return ": " + _one_line(response.text or response.reason or "no answer body")


def _no_answer(request_error) -> tuple[str, str]:
    """(kind, reason) of a request that got no answer to read: "timeout", "status" (a 5xx on every try, which
    MLflow's retries turn into "too many 503 error responses") or "unreachable" (refused, unknown host, reset)."""
    import re

    import requests
    from urllib3.exceptions import MaxRetryError, NewConnectionError, ResponseError, TimeoutError

    reason = request_error.args[0] if request_error is not None and request_error.args else request_error
    if isinstance(reason, MaxRetryError):
        reason = reason.reason
    if isinstance(request_error, requests.exceptions.RetryError) or isinstance(reason, ResponseError):
        status = re.search(r"\b(\d{3})\b", str(reason))
        return "status", f"HTTP {status[1]}" if status else _one_line(reason)
    if isinstance(request_error, requests.Timeout) or (isinstance(reason, TimeoutError)
                                                       and not isinstance(reason, NewConnectionError)):
        return "timeout", "timed out"
    # The socket's own error says it best (connection refused, name or service not known, connection reset).
    for error in _exception_chain(reason)[1:] if isinstance(reason, BaseException) else []:
        if isinstance(error, OSError) and type(error).__module__ in ("builtins", "socket", "ssl"):
            return "unreachable", _one_line(error.strerror or error).lower()
    return "unreachable", _one_line(reason) if reason is not None else "no answer"


def _activity(method: str, path: str) -> str:
    if "/mlflow-artifacts/" in path:
        return ARTIFACT_ACTIVITIES.get(method, "")
    action = path.partition("/mlflow/")[2]
    action = "logged-models" if action.startswith("logged-models") else "/".join(action.split("/")[:2])
    return REQUEST_ACTIVITIES.get(action, "")


def server_failure(error: BaseException) -> str | None:
    """One line saying how the tracking server failed the request that ended a command, and what to check;
    ``None`` when ``error`` is not a failed request (a bug keeps its traceback).

    The line names the server (password as ``***``), what the command was doing (the request, by its REST
    path), and the HTTP status with the server's error code and message, or why no answer came (connection
    refused, a timeout, a 5xx on every retry). Everything in it is redacted and printable.
    """
    request_error, failed = _failed_request(error)
    if not failed:
        return None
    from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT

    response = getattr(request_error, "response", None)
    if response is None and request_error is None:
        response = _checked_response(error)
    request = response.request if response is not None else getattr(request_error, "request", None)
    label, what, where = f"the MLflow tracking server {shown_tracking_uri()}", "a request", ""
    if request is not None and request.url:
        parts = urlsplit(request.url)
        if parts.netloc != urlsplit(mlflow.get_tracking_uri()).netloc:
            if error is request_error:  # requests' own error, for another server than MLflow's: not ours to explain
                return None
            label = f"the server {redact(f'{parts.scheme}://{parts.netloc}')}"  # MLflow's artifact store elsewhere
        activity = _activity(request.method or "", parts.path)
        what = f"the request to {activity}" if activity else "a request"
        where = f"{request.method} {printable(parts.path)}: "
    elif error is request_error:
        return None
    if response is not None and response.status_code < 400:
        return redact(f"{label} answered {what} with something other than MLflow's JSON ({where}HTTP "
                      f"{response.status_code}{_server_message(error, response)}); {TRACKING_SERVER_FIX}")
    if response is not None or isinstance(error, mlflow.exceptions.RestException):
        status = response.status_code if response is not None else error.get_http_status_code()
        return redact(f"{label} refused {what} ({where}HTTP {status}{_server_message(error, response)}); "
                      f"{TRACKING_SERVER_FIX}")
    kind, reason = _no_answer(request_error)
    retried = f"retried {MLFLOW_HTTP_REQUEST_MAX_RETRIES.get()} times (${MLFLOW_HTTP_REQUEST_MAX_RETRIES.name}"
    if kind == "timeout":
        return redact(f"{label} did not answer {what} within {MLFLOW_HTTP_REQUEST_TIMEOUT.get()} s ({where}{reason}, "
                      f"{retried}; ${MLFLOW_HTTP_REQUEST_TIMEOUT.name} sets the wait)); {TRACKING_SERVER_FIX}")
    if kind == "status":
        return redact(f"{label} failed {what} ({where}{reason}, {retried})); {TRACKING_SERVER_FIX}")
    return redact(f"{label} could not be reached for {what} ({where}{reason}, {retried})); start it or "
                  f"{TRACKING_SERVER_FIX}")


def flatten_params(config: TrainConfig) -> dict[str, str]:
    """Every config field as an MLflow param (tuples as comma lists, None as 'None')."""
    return {
        name: ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)
        for name, value in config.to_dict().items()
    }


# -- system metrics ----------------------------------------------------------------------------------

_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        _logger.warning(message)


def enable_system_metrics() -> None:
    """Record MLflow's system metrics (``system/*``: CPU, memory, disk, network, GPU) in every run started next.

    Sets MLflow's own switch (``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=true``), so worker processes started
    from this one inherit it.
    """
    mlflow.enable_system_metrics_logging()


def system_metrics_requested() -> bool:
    """Whether MLflow's switch asks for system metrics (``--system-metrics`` or the environment variable)."""
    return bool(MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING.get())


def _nvidia_gpu_present() -> bool:
    return shutil.which("nvidia-smi") is not None or Path("/proc/driver/nvidia").exists()


def system_metrics_available() -> bool:
    """Whether this machine can record system metrics; warns once, in one line, about what is missing.

    MLflow needs ``psutil`` for any system metric (without it ``mlflow.start_run`` raises), and
    ``nvidia-ml-py`` (module ``pynvml``) for GPU metrics (without it MLflow silently skips them).
    """
    if importlib.util.find_spec("psutil") is None:
        _warn_once("warning: system metrics are off: MLflow needs psutil to record them (pip install psutil); "
                   "the runs go on without them.")
        return False
    if _nvidia_gpu_present() and importlib.util.find_spec("pynvml") is None:
        _warn_once("warning: GPU system metrics are off: MLflow needs nvidia-ml-py (pip install nvidia-ml-py); "
                   "CPU, memory, disk and network are recorded.")
    return True


# -- datasets ------------------------------------------------------------------------------------------

class MnistSplitDataset(Dataset):
    """One MNIST split as MLflow sees it, described by metadata only.

    MLflow's array datasets hash their contents; here the digest comes from the files' SHA-256 (already
    checked when the data was loaded) and the split's definition, so logging costs no pass over the pixels.
    """

    def __init__(self, source: DatasetSource, name: str, digest: str, profile: dict):
        self._profile = profile
        super().__init__(source=source, name=name, digest=digest)

    def _compute_digest(self) -> str:  # the digest is always given
        raise NotImplementedError

    @property
    def profile(self) -> dict:
        return self._profile

    @property
    def schema(self) -> TensorDatasetSchema:
        return TensorDatasetSchema(
            features=Schema([TensorSpec(np.dtype(np.float32), (-1, *IMAGE_SHAPE), "image")]),
            targets=Schema([TensorSpec(np.dtype(np.int64), (-1,), "label")]),
        )

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "schema": json.dumps(self.schema.to_dict()), "profile": json.dumps(self.profile)}


def dataset_source(data_source: str) -> DatasetSource:
    """Where the data came from: Keras' download URL, or the local directory (or mnist.npz) it was read from."""
    if data_source == KERAS_DOWNLOAD_SOURCE:
        return HTTPDatasetSource(KERAS_MNIST_URL)
    return get_dataset_source_from_json(json.dumps({"uri": data_source}), "local")


def split_definitions(config: TrainConfig) -> dict[str, dict]:
    """Per dataset name, the config fields that decide which images it holds (part of its digest)."""
    if config.validation == "test":
        validation = {"split": "test", "validation": "test"}
        train = {"split": "train", "validation": "test"}
    else:
        held_out = {"validation_size": config.validation_size, "split_seed": config.split_seed}
        validation = {"split": "validation", "validation": config.validation, **held_out}
        train = {"split": "train", "validation": config.validation, **held_out}
    train["train_subset"] = config.train_subset
    if config.train_subset is not None:
        train["split_seed"] = config.split_seed  # the subset is drawn with split_seed + 1
    return {TRAIN_DATASET: train, VALIDATION_DATASET: validation, TEST_DATASET: {"split": "test"}}


def split_sizes(config: TrainConfig, num_train_pool: int, num_test: int) -> dict[str, int]:
    """Images per dataset name, as ``data.build_split`` makes them, computed without touching the arrays."""
    validation = num_test if config.validation == "test" else config.validation_size
    train = num_train_pool if config.validation == "test" else num_train_pool - config.validation_size
    if config.train_subset is not None:
        train = min(train, config.train_subset)
    return {TRAIN_DATASET: train, VALIDATION_DATASET: validation, TEST_DATASET: num_test}


def mnist_datasets(config: TrainConfig, checksums: Mapping[str, str], data_source: str,
                   sizes: Mapping[str, int]) -> dict[str, MnistSplitDataset]:
    """The run's train, validation and test datasets by name, digests from the files' SHA-256 and the split."""
    source = dataset_source(data_source)
    datasets = {}
    for name, definition in split_definitions(config).items():
        identity = {"sha256": dict(sorted(checksums.items())), **definition}
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
        profile = {"num_images": int(sizes[name]), "image_shape": list(IMAGE_SHAPE), "dtype": "float32",
                   "num_classes": NUM_CLASSES, **definition}
        datasets[name] = MnistSplitDataset(source, name, digest, profile)
    return datasets


def log_datasets(datasets: Mapping[str, MnistSplitDataset]) -> None:
    """Record the datasets as inputs of the active run, each with its context (training, validation, testing)."""
    mlflow.log_inputs(datasets=list(datasets.values()), contexts=[DATASET_CONTEXTS[name] for name in datasets],
                      tags_list=[None] * len(datasets))


def __getattr__(name: str):
    if name == "MlflowEpochLogger":
        return _mlflow_epoch_logger()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@cache
def _mlflow_epoch_logger() -> type:
    """``MlflowEpochLogger``, a Keras callback: made on first use, so importing tracking loads no Keras.

    The commands that only read or log results (doctor, report, ensemble) import this module; Keras and
    TensorFlow would add seconds to each of them.
    """
    import keras

    class MlflowEpochLogger(keras.callbacks.Callback):
        """Logs the per-epoch metrics of a run as MLflow metrics with ``step=epoch``."""

        def __init__(self, run_id: str):
            super().__init__()
            self.run_id = run_id
            self.client = MlflowClient()

        def on_epoch_end(self, epoch, logs=None):
            log_epoch_metrics(self.client, self.run_id, epoch, logs or {})

    MlflowEpochLogger.__module__, MlflowEpochLogger.__qualname__ = __name__, "MlflowEpochLogger"
    return MlflowEpochLogger


def log_epoch_metrics(client: MlflowClient, run_id: str, epoch: int, values: Mapping[str, float]) -> None:
    now = int(time.time() * 1000)
    metrics = [Metric(key, float(values[key]), now, epoch) for key in EPOCH_METRICS if key in values]
    client.log_batch(run_id, metrics=metrics)


def log_result_artifacts(result: RunResult, title: str, input_example: np.ndarray,
                         datasets: Mapping[str, MnistSplitDataset] | None = None) -> str:
    """Figures, predictions, the model and the final metrics, into the active run; returns the model's id.

    The final metrics and the last epoch's per-epoch metrics are linked to the logged model (each to the
    dataset it was measured on), so the Models tab shows the run's final numbers.
    """
    from .plots import confusion_matrix_figure, training_curves_figure

    predicted = result.test_probabilities.argmax(1)
    for name, figure in (
        ("plots/training_curves.png", training_curves_figure(result.history, title)),
        ("plots/confusion_matrix.png", confusion_matrix_figure(result.test_labels, predicted)),
    ):
        mlflow.log_figure(figure, name)
    log_predictions(result.test_labels, result.test_probabilities, PREDICTIONS_ARTIFACT)
    if result.tta_probabilities is not None:
        log_predictions(result.test_labels, result.tta_probabilities, TTA_PREDICTIONS_ARTIFACT)
    model_id = log_keras_model(result.model, input_example).model_id
    log_final_metrics(mlflow.active_run().info.run_id, model_id, result, datasets or {})
    return model_id


def final_metrics(result: RunResult) -> dict[str, float]:
    """The metrics a run logs once, at the end."""
    return {
        "test_loss": result.test_loss,
        "test_accuracy": result.test_accuracy,
        "train_seconds": result.train_seconds,
        "train_images_per_second": result.train_images_per_second,
        **result.extra_metrics,
    }


def log_final_metrics(run_id: str, model_id: str, result: RunResult,
                      datasets: Mapping[str, MnistSplitDataset]) -> None:
    """Log the final metrics, and link them and the last epoch's metrics to the logged model.

    The last epoch's points are re-sent with their original timestamps, so the run's history gains no
    duplicate; MLflow keeps the model's copies apart (its Models tab and ``LoggedModel.metrics``).
    """
    client = MlflowClient()
    final_epoch = len(result.history["loss"]) - 1

    def linked(key: str, value: float, timestamp: int, step: int) -> Metric:
        dataset = datasets.get(METRIC_DATASETS.get(key, ""))
        return Metric(key, float(value), timestamp, step, model_id=model_id, run_id=run_id,
                      dataset_name=dataset.name if dataset else None,
                      dataset_digest=dataset.digest if dataset else None)

    metrics = [linked(point.key, point.value, point.timestamp, point.step)
               for key in EPOCH_METRICS
               for point in client.get_metric_history(run_id, key) if point.step == final_epoch]
    now = int(time.time() * 1000)
    metrics += [linked(key, value, now, 0) for key, value in final_metrics(result).items()]
    client.log_batch(run_id, metrics=metrics)


def log_predictions(labels: np.ndarray, probabilities: np.ndarray, artifact: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(artifact).name
        predictions_frame(labels, probabilities).to_parquet(path, index=False)
        mlflow.log_artifact(str(path), artifact_path=str(Path(artifact).parent))


class _KerasFlavor:
    """``mlflow.keras`` as the flavor of ``Model.log``, with two fixes for this project.

    ``mlflow.keras.save_model`` writes the input example before it creates the model directory, so an
    input example fails with FileNotFoundError (mlflow/mlflow#16183); the directory is made first here.
    ``Model.log`` also hands its ``validate_serving_input`` switch to the flavor, which
    ``mlflow.keras.save_model`` does not accept: it is dropped here. We switch that check off: it reloads
    the model and predicts the example (0.5 s a run) to re-prove the signature we state.
    """

    @staticmethod
    def save_model(model, path, mlflow_model, validate_serving_input=False, **kwargs):
        os.makedirs(path, exist_ok=True)
        mlflow.keras.save_model(model, path=path, mlflow_model=mlflow_model, **kwargs)


def log_keras_model(model: keras.Model, input_example: np.ndarray):
    """Log the model so ``mlflow.keras.load_model(f"runs:/{run_id}/model")`` returns it; returns its ModelInfo.

    ``input_example``: float32 images (N, 28, 28, 1) in [0, 1], saved with the model (and shown by the
    UI). No run metric is linked to the model here (``log_final_metrics`` links the right ones).
    """
    from mlflow.models import Model, infer_signature

    input_example = np.asarray(input_example, dtype=np.float32).reshape((-1, *IMAGE_SHAPE))
    signature = infer_signature(input_example[:1], np.zeros((1, NUM_CLASSES), dtype=np.float32))
    inference_model = inference_copy(model)  # logged for inference, without the optimizer's state
    # Stated, not inferred: MLflow's requirement inference re-imports the model in a subprocess (~20 s a run).
    requirements = [f"{name}=={importlib.metadata.version(name)}" for name in ("tensorflow", "keras")]
    return Model.log(artifact_path=None, name=MODEL_NAME, flavor=_KerasFlavor, flavor_name="mlflow.keras",
                     model=inference_model, signature=signature, input_example=input_example,
                     pip_requirements=requirements, step=_UNLINKED_STEP, validate_serving_input=False)


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
    # Decided here, not by MLflow: without psutil its switch makes start_run raise; we warn and go on.
    log_system_metrics = system_metrics_requested() and system_metrics_available()
    return mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=all_tags,
                            log_system_metrics=log_system_metrics).info.run_id


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
    from .train import train

    run_id = _start_run(config, config.hash(data.checksums), experiment_name, run_name, tags, parent_run_id)
    if on_run_created is not None:
        on_run_created(run_id)
    with _finished_only_if_complete(run_id, stop_exceptions):
        client = MlflowClient()
        _log_config(run_id, config, environment_record(data.checksums, data.source))
        datasets = mnist_datasets(config, data.checksums, data.source,
                                  split_sizes(config, len(data.y_train), len(data.y_test)))
        log_datasets(datasets)
        result = train(config, data, callbacks=[_mlflow_epoch_logger()(run_id), *callbacks],
                       checkpoint_dir=checkpoint_dir, verbose=verbose)
        # Epochs trained before a resume come from the checkpoint's history, so the curve is whole.
        for epoch in range(result.initial_epoch):
            log_epoch_metrics(client, run_id, epoch, {k: v[epoch] for k, v in result.history.items()})
        if result.initial_epoch:
            mlflow.set_tag("resumed_from_epoch", str(result.initial_epoch))
        log_result_artifacts(result, run_name or "", input_example=data.x_test[:1], datasets=datasets)
    if checkpoint_dir is not None:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return TrackedRun(run_id, result)


@dataclass(frozen=True)
class PackMember:
    """One cell of a pack for ``run_training_pack``: what ``run_training`` takes for one run."""

    config: TrainConfig
    run_name: str
    tags: Mapping[str, str]
    checkpoint_dir: str | os.PathLike | None = None
    callbacks: Sequence[keras.callbacks.Callback] = ()
    on_run_created: object = None  # called with the member's run id as soon as its run exists


def run_training_pack(members: Sequence[PackMember], data: Mnist, *, experiment_name: str = DEFAULT_EXPERIMENT,
                      parent_run_id: str | None = None) -> list[TrackedRun | BaseException]:
    """Train ``members`` as one pack (``packed.train_pack``, Keras on JAX), each into its own MLflow run.

    Each member's run holds what ``run_training`` logs (params, config, environment, datasets, per-epoch and final
    metrics, figures, predictions, the model) plus a ``pack`` tag naming the pack; a member that fails ends its
    own run FAILED with its ``failure_reason`` and comes back as its exception, the others are logged as usual.
    An interrupt ends every member's run KILLED. System metrics are not sampled for packed runs.
    """
    from .naming import PACK_TAG, pack_labels
    from .packed import train_pack

    experiment_id = get_or_create_experiment(experiment_name)
    labels = pack_labels([m.run_name for m in members])
    client = MlflowClient()
    run_ids = []
    for member, label in zip(members, labels, strict=True):
        tags = {CONFIG_HASH_TAG: member.config.hash(data.checksums), SEED_TAG: str(member.config.seed),
                **dict(member.tags), PACK_TAG: label}
        if parent_run_id:
            tags[PARENT_RUN_TAG] = parent_run_id
        run_id = client.create_run(experiment_id, run_name=member.run_name, tags=tags).info.run_id
        run_ids.append(run_id)
        if member.on_run_created is not None:
            member.on_run_created(run_id)
        client.log_batch(run_id, params=[Param(k, v) for k, v in flatten_params(member.config).items()])
        client.log_dict(run_id, member.config.to_dict(), CONFIG_ARTIFACT)
        client.log_dict(run_id, environment_record(data.checksums, data.source), ENVIRONMENT_ARTIFACT)
    try:
        callbacks = [[_mlflow_epoch_logger()(run_id), *m.callbacks] for m, run_id in zip(members, run_ids, strict=True)]
        results = train_pack([m.config for m in members], data, callbacks=callbacks,
                             checkpoint_dirs=[m.checkpoint_dir for m in members])
    except BaseException as error:
        status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
        for run_id in run_ids:
            client.set_tag(run_id, FAILURE_REASON_TAG, redact(f"{type(error).__name__}: {error}")[:4900])
            client.set_terminated(run_id, status)
        raise
    outcomes: list[TrackedRun | BaseException] = []
    for member, run_id, result in zip(members, run_ids, results, strict=True):
        mlflow.start_run(run_id=run_id)  # the member's run becomes the active one for the fluent logging
        if isinstance(result, BaseException):
            _end_failed(run_id, "FAILED", f"{type(result).__name__}: {result}")
            outcomes.append(result)
            continue
        try:
            with _finished_only_if_complete(run_id):
                datasets = mnist_datasets(member.config, data.checksums, data.source,
                                          split_sizes(member.config, len(data.y_train), len(data.y_test)))
                log_datasets(datasets)
                for epoch in range(result.initial_epoch):
                    log_epoch_metrics(client, run_id, epoch, {k: v[epoch] for k, v in result.history.items()})
                if result.initial_epoch:
                    mlflow.set_tag("resumed_from_epoch", str(result.initial_epoch))
                log_result_artifacts(result, member.run_name, input_example=data.x_test[:1], datasets=datasets)
        except Exception as error:  # noqa: BLE001 - logged FAILED by the context manager; the others go on
            outcomes.append(error)
            continue
        if member.checkpoint_dir is not None:
            shutil.rmtree(member.checkpoint_dir, ignore_errors=True)
        outcomes.append(TrackedRun(run_id, result))
    return outcomes


def log_offline_result(result: RunResult, record: Mapping, *, experiment_name: str = DEFAULT_EXPERIMENT,
                       run_name: str | None = None, tags: Mapping[str, str] | None = None,
                       parent_run_id: str | None = None, input_example: np.ndarray | None = None) -> TrackedRun:
    """Log a run trained elsewhere (``offline.load_result``) with everything ``run_training`` logs.

    Its environment.json is the record of the machine that trained it; tags ``trained_offline`` and
    ``keras_backend`` say so; its datasets come from the record's data checksums and source. Like
    ``run_training``, it is FINISHED only once every artifact landed. ``input_example``: images saved
    with the model (e.g. ``data.x_test[:1]``); without it, a blank image of the right shape and type.
    """
    run_id = _start_run(result.config, record["config_hash"], experiment_name, run_name,
                        {**dict(tags or {}), "trained_offline": "true", "keras_backend": record["keras_backend"]},
                        parent_run_id)
    with _finished_only_if_complete(run_id):
        _log_config(run_id, result.config, record["environment"])
        data_record = record["environment"]["data"]
        num_test = len(result.test_labels)
        sizes = {**split_sizes(result.config, 0, num_test), TRAIN_DATASET: result.num_train_images}
        datasets = mnist_datasets(result.config, data_record["sha256"], data_record["source"], sizes)
        log_datasets(datasets)
        client = MlflowClient()
        for epoch in range(len(result.history["loss"])):
            log_epoch_metrics(client, run_id, epoch, {k: v[epoch] for k, v in result.history.items()})
        if input_example is None:
            input_example = np.zeros((1, *IMAGE_SHAPE), dtype=np.float32)
        log_result_artifacts(result, run_name or "", input_example=input_example, datasets=datasets)
    return TrackedRun(run_id, result)


def log_reused_run(source_run_id: str, config: TrainConfig, config_hash: str, *, experiment_name: str,
                   run_name: str, tags: Mapping[str, str], parent_run_id: str | None) -> str:
    """A FINISHED cell run that is ``source_run_id``'s training under another arm's name (identical arms).

    It records its own config (params, config.json) and hash, the source's environment.json and a copy of
    the source's metrics (every epoch and the final ones, same steps and times), and the tag
    ``mnist_ablation.reuses_run``: its predictions and model are the source run's (``store`` follows the tag).
    """
    client = MlflowClient()
    source = client.get_run(source_run_id)
    run_id = _start_run(config, config_hash, experiment_name, run_name,
                        {**dict(tags), REUSES_RUN_TAG: source_run_id}, parent_run_id)
    with _finished_only_if_complete(run_id):
        environment = mlflow.artifacts.load_dict(f"runs:/{source_run_id}/{ENVIRONMENT_ARTIFACT}")
        _log_config(run_id, config, environment)
        metrics = [Metric(point.key, point.value, point.timestamp, point.step)
                   for key in source.data.metrics for point in client.get_metric_history(source_run_id, key)]
        for start in range(0, len(metrics), 1000):  # MLflow takes at most 1,000 metrics a batch
            client.log_batch(run_id, metrics=metrics[start:start + 1000])
    return run_id


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


def log_study_summary(run_id: str, summary: pd.DataFrame) -> None:
    """A study's per-arm table (``sweep.study_summary``) on its parent run: ``summary.csv`` and one metric per arm
    and number (``sweep.summary_metrics``); the parent run then ends FINISHED."""
    log_text(run_id, summary.to_csv(index=False), SUMMARY_ARTIFACT)
    log_metrics(run_id, summary_metrics(summary))
    set_status(run_id, "FINISHED")


@contextlib.contextmanager
def active_run(experiment_id: str, run_name: str, tags: Mapping[str, str]):
    """A run that is the active one inside the block and ends FINISHED only if the block completes.

    For runs assembled from other runs' results (ensembles): any exception ends it FAILED with a
    ``failure_reason``, an interrupt KILLED; the exception propagates.
    """
    run_id = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=dict(tags)).info.run_id
    with _finished_only_if_complete(run_id):
        yield run_id
