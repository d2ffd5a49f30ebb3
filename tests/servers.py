"""Real services on 127.0.0.1 for tests: a PostgreSQL cluster, an ``mlflow server`` and headless Chromium.

All are session-scoped; the servers live in a temporary directory that is removed afterwards. Nothing is
mocked: distributed tuning and ablation tests talk to them exactly as workers on several machines would.
``tests/conftest.py`` imports the fixtures, so any test can ask for ``postgres_url``, ``mlflow_server`` or
``chromium``.

A service that is not installed (PostgreSQL's server binaries, Chromium) skips the tests that need it with
a one-line reason saying how to install it, so the test command passes on a fresh machine; under CI
(``CI`` set to anything but empty/0/false/no) it is a failure instead, so CI never passes by skipping.
A service that is installed but fails to start is always a failure.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import NoReturn

import pytest

CI_ENV = "CI"
POSTGRES_BIN_ENV = "POSTGRES_BIN"  # directory holding initdb and pg_ctl, when not in the usual place
POSTGRES_DEBIAN_ROOT = Path("/usr/lib/postgresql")  # Debian/Ubuntu: <root>/<major version>/bin
CHROMIUM_PATH_ENV = "CHROMIUM_PATH"  # the Chromium executable, when not /usr/bin/chromium
CHROMIUM_DEFAULT = Path("/usr/bin/chromium")  # Debian's chromium package
CHROMIUM_NAMES = ("chromium", "chromium-browser")  # looked up on PATH after the default
STARTUP_TIMEOUT_SECONDS = 120.0


class ServiceNotFound(Exception):
    """A service a test needs is not installed here; the message says where we looked and how to install it."""


def in_ci() -> bool:
    """True when ``$CI`` is set to a true value (GitHub Actions, GitLab, .ci/run all set CI=true)."""
    return os.environ.get(CI_ENV, "").strip().lower() not in ("", "0", "false", "no")


def missing_service(reason: str) -> NoReturn:
    """Skip the requesting tests (a developer's machine) or fail them (CI) for a service that is not installed."""
    if in_ci():
        pytest.fail(f"{reason} [{CI_ENV}={os.environ[CI_ENV]}: a missing service fails under CI, never skips]",
                    pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def find_postgres_bin() -> Path:
    """The directory with initdb and pg_ctl: $POSTGRES_BIN alone when set, else the newest
    /usr/lib/postgresql/*/bin, else the directory of initdb on PATH. Raises ServiceNotFound."""
    if os.environ.get(POSTGRES_BIN_ENV):
        # An explicit setting is the only place looked: a wrong one is reported, not silently bypassed.
        candidates = [Path(os.environ[POSTGRES_BIN_ENV])]
        looked = f"${POSTGRES_BIN_ENV}={candidates[0]}"
    else:
        candidates = sorted(POSTGRES_DEBIAN_ROOT.glob("*/bin"),
                            key=lambda path: int(path.parent.name) if path.parent.name.isdigit() else 0,
                            reverse=True)
        on_path = shutil.which("initdb")
        if on_path:
            candidates.append(Path(on_path).parent)
        looked = f"{POSTGRES_DEBIAN_ROOT}/*/bin and PATH"
    for directory in candidates:
        if _is_executable(directory / "initdb") and _is_executable(directory / "pg_ctl"):
            return directory
    raise ServiceNotFound(
        f"PostgreSQL server binaries (initdb, pg_ctl) not found (looked in {looked}): "
        f"apt-get install postgresql, or set {POSTGRES_BIN_ENV} to the directory holding them"
    )


def find_chromium() -> Path:
    """The Chromium executable: $CHROMIUM_PATH alone when set, else /usr/bin/chromium, else chromium on PATH.
    Raises ServiceNotFound."""
    if os.environ.get(CHROMIUM_PATH_ENV):
        candidates = [Path(os.environ[CHROMIUM_PATH_ENV])]
        looked = f"${CHROMIUM_PATH_ENV}={candidates[0]}"
    else:
        candidates = [CHROMIUM_DEFAULT] + [Path(found) for found in map(shutil.which, CHROMIUM_NAMES) if found]
        looked = f"{CHROMIUM_DEFAULT} and {', '.join(CHROMIUM_NAMES)} on PATH"
    for candidate in candidates:
        if _is_executable(candidate):
            return candidate
    raise ServiceNotFound(
        f"Chromium not found (looked for {looked}): apt-get install chromium, or set {CHROMIUM_PATH_ENV} "
        "to the executable"
    )


# Headless Chromium on a closed network: no background connections, no first-run chatter.
CHROMIUM_ARGUMENTS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                      "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="session")
def browser(chromium):
    """One headless Chromium (Playwright) for the session; tests open their own pages in it."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGUMENTS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture(scope="session")
def chromium() -> Path:
    """Path of a Chromium executable for Playwright (``executable_path=``); skips, or fails under CI, without one."""
    try:
        return find_chromium()
    except ServiceNotFound as error:
        reason = str(error)
    missing_service(reason)  # outside the except block: one message, no chained traceback


def _as_postgres_user(command: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root; as root, drop to the `postgres` OS user the package created.
    if os.geteuid() != 0:
        return command
    if shutil.which("runuser") is None:
        raise FileNotFoundError("running as root needs `runuser` (util-linux) to start PostgreSQL as the "
                                "`postgres` user; install util-linux or run the tests as a normal user.")
    return ["runuser", "-u", "postgres", "--", *command]


def _run(command: list[str], cwd: Path, what: str) -> None:
    completed = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=STARTUP_TIMEOUT_SECONDS)
    if completed.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {completed.returncode}): {' '.join(command)}\n"
                           f"stdout:\n{completed.stdout[-3000:]}\nstderr:\n{completed.stderr[-3000:]}")


class PostgresServer:
    """A throw-away PostgreSQL cluster in ``root``, listening on 127.0.0.1:``port`` with trust auth."""

    def __init__(self, root: Path, bin_dir: Path):
        self.root = root
        self.bin_dir = bin_dir
        self.data_dir = root / "data"
        self.socket_dir = root / "socket"
        self.log_file = root / "postgres.log"
        self.port = free_port()
        self.user = "postgres"

    def start(self) -> None:
        self.socket_dir.mkdir()
        if os.geteuid() == 0:
            # The cluster files must belong to the user the server runs as.
            shutil.chown(self.root, "postgres", "postgres")
            shutil.chown(self.socket_dir, "postgres", "postgres")
        _run(_as_postgres_user([str(self.bin_dir / "initdb"), "-D", str(self.data_dir), "-U", self.user,
                                "--auth=trust", "--encoding=UTF8", "--no-sync"]), self.root, "initdb")
        options = (f"-c listen_addresses=127.0.0.1 -c port={self.port} "
                   f"-c unix_socket_directories={self.socket_dir} -c max_connections=200 -c fsync=off "
                   "-c shared_buffers=32MB")
        _run(_as_postgres_user([str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-l", str(self.log_file),
                                "-o", options, "-w", "-t", str(int(STARTUP_TIMEOUT_SECONDS)), "start"]),
             self.root, "pg_ctl start")

    def url(self, database: str = "postgres") -> str:
        # Bare postgresql://, as users write it: SQLAlchemy 2.1 reads it as psycopg 3, the driver we ship.
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """Create database ``name`` and return its SQLAlchemy URL."""
        import psycopg

        # autocommit: CREATE DATABASE cannot run inside a transaction
        with psycopg.connect(host="127.0.0.1", port=self.port, user=self.user, dbname="postgres",
                             autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        subprocess.run(_as_postgres_user([str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", "fast",
                                          "-w", "stop"]), cwd=self.root, capture_output=True, timeout=60)

    def log_tail(self) -> str:
        try:
            return self.log_file.read_text()[-3000:]
        except OSError:
            return "(no log)"


@pytest.fixture(scope="session")
def postgres_url():
    """SQLAlchemy URL ``postgresql://postgres@127.0.0.1:<port>/<fresh db>`` of a real, temporary PostgreSQL.

    Without PostgreSQL's server binaries it skips (fails under CI) with a one-line install hint; binaries
    that are there but fail to start a cluster are a failure.
    """
    try:
        bin_dir = find_postgres_bin()
    except ServiceNotFound as error:
        bin_dir, reason = None, str(error)
    if bin_dir is None:
        missing_service(reason)  # outside the except block: one message, no chained traceback
    # Not under pytest's tmp_path: its parents are private to root, and the server runs as `postgres`.
    root = Path(tempfile.mkdtemp(prefix="mnist_ablation_postgres_"))
    server = PostgresServer(root, bin_dir)
    try:
        server.start()
    except (RuntimeError, FileNotFoundError, subprocess.TimeoutExpired) as error:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"could not start PostgreSQL: {error}\nserver log:\n{server.log_tail()}")
    try:
        yield server.create_database(f"test_{uuid.uuid4().hex[:12]}")
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def wait_for_health(url: str, process: subprocess.Popen, log_file: Path, timeout: float) -> None:
    """Poll ``url`` (a health endpoint) until it answers 200 OK; fail with the server's log if it dies or never does."""
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with code {process.returncode}:\n{log_file.read_text()[-3000:]}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s:\n{log_file.read_text()[-3000:]}")


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """HTTP URL of a real ``mlflow server`` on 127.0.0.1 (SQLite backend, served artifacts), up for the session."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    mlflow_executable = Path(sys.executable).parent / "mlflow"
    command = [
        str(mlflow_executable) if mlflow_executable.is_file() else "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port),
        "--workers", "1",  # the default (4) only costs start-up time and memory on a test machine
    ]
    log_file = root / "server.log"
    with open(log_file, "w") as log:
        process = subprocess.Popen(command, cwd=root, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        try:
            wait_for_health(f"{url}/health", process, log_file, STARTUP_TIMEOUT_SECONDS)
        except RuntimeError as error:
            pytest.fail(str(error))
        yield url
    finally:
        _stop_process_group(process)


def _stop_process_group(process: subprocess.Popen) -> None:
    # The server forks uvicorn workers into its own session: end that group, and only it.
    import signal

    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        # Uvicorn waits for idle keep-alive clients to leave; a throw-away server need not.
        process.wait(timeout=5)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
