"""Optuna RDB storage for the cell queue, tuning and the doctor: one place for URLs, retries and heartbeats.

SQLite beside the local MLflow store by default (``mlruns/optuna.db``), PostgreSQL to share work between
machines. Only public Optuna APIs are used.
"""

from __future__ import annotations

import importlib.util
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial
from sqlalchemy.exc import DBAPIError, OperationalError

from .errors import StorageError
from .redaction import redact

STORAGE_FILE = "optuna.db"
T = TypeVar("T")


def default_storage_url(state_directory: Path) -> str:
    """``sqlite:///<dir>/optuna.db``: the storage beside a local MLflow store (``mlruns/optuna.db``)."""
    return f"sqlite:///{Path(state_directory) / STORAGE_FILE}"


def normalize_url(url: str) -> str:
    """Name an installed PostgreSQL driver in a bare ``postgresql://`` URL (psycopg 3, else psycopg2)."""
    if not url.startswith("postgresql://"):
        return url
    for module, driver in (("psycopg", "psycopg"), ("psycopg2", "psycopg2")):
        if importlib.util.find_spec(module) is not None:
            return f"postgresql+{driver}://" + url[len("postgresql://"):]
    raise StorageError(f"storage {redact(url)} needs a PostgreSQL driver: pip install 'psycopg[binary]'.")


def retrying(action: Callable[[], T], attempts: int = 20) -> T:
    """Run ``action``, retrying SQLite's transient 'database is locked' errors."""
    for attempt in range(attempts):
        try:
            return action()
        except OperationalError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 + 0.1 * attempt)
    raise AssertionError("unreachable")


def open_storage(url: str, heartbeat_interval: int = 10, grace_period: int = 60, max_retry: int | None = 3,
                 stale_trial_callback: Callable[[optuna.Study, FrozenTrial], None] | None = None) -> RDBStorage:
    """Optuna RDB storage with heartbeats: a trial whose worker stops beating is failed and retried.

    ``stale_trial_callback`` runs for each such trial (default: Optuna's RetryHeartbeatStaleTrialCallback
    with ``max_retry``). Workers starting together race to create Optuna's tables; the loser retries.
    """
    if grace_period <= heartbeat_interval:
        raise StorageError(f"grace_period={grace_period} must exceed heartbeat_interval={heartbeat_interval} "
                           "(a few intervals), or live trials would be declared dead.")
    url = normalize_url(url)
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs: dict[str, Any] = {"connect_args": {"timeout": 60}}  # wait out other workers' locks
    else:
        engine_kwargs = {"pool_pre_ping": True}  # survive a database restart between trials
    callback = stale_trial_callback or retry_callback(max_retry)
    attempts = 6
    for attempt in range(attempts):
        try:
            # Heartbeats are marked experimental but have been stable since Optuna 2.9.
            return quietly(lambda: RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval,
                                              grace_period=grace_period, heartbeat_stale_trial_callback=callback))
        except DBAPIError as error:
            # "already exists", duplicate keys or "database is locked" while another worker creates the tables.
            if attempt == attempts - 1:
                raise StorageError(f"cannot open the Optuna storage {redact(url)}: {redact(str(error))}") from None
            time.sleep(0.5 * (attempt + 1))
        except Exception as error:  # noqa: BLE001 - SQLAlchemy raises many types for bad URLs and dead servers
            raise StorageError(
                f"cannot open the Optuna storage {redact(url)} ({type(error).__name__}: {redact(str(error))}). "
                "Expected a reachable SQLAlchemy URL such as sqlite:///mlruns/optuna.db or "
                "postgresql://USER@HOST:5432/DB (password from ~/.pgpass or PGPASSWORD)."
            ) from None
    raise AssertionError("unreachable")


def quietly(action: Callable[[], T]) -> T:
    """Run an Optuna call that is marked experimental (heartbeats, metric names) without its warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return action()


def retry_callback(max_retry: int | None) -> RetryHeartbeatStaleTrialCallback:
    """Optuna's callback that enqueues a copy of a trial whose worker died."""
    return quietly(lambda: RetryHeartbeatStaleTrialCallback(max_retry=max_retry))


def fail_stale_trials(study: optuna.Study) -> None:
    """Fail ``study``'s trials whose worker stopped beating (and run the storage's stale-trial callback)."""
    quietly(lambda: retrying(lambda: optuna.storages.fail_stale_trials(study)))


def study_id(storage: RDBStorage, study_name: str) -> int:
    """The storage's id of a study (public API, unlike ``Study._study_id``)."""
    return retrying(lambda: storage.get_study_id_from_name(study_name))

