"""Real servers on 127.0.0.1 for tests: a PostgreSQL cluster and an ``mlflow server``.

Both are session-scoped and live in a temporary directory that is removed afterwards. Nothing is
mocked: distributed tuning and ablation tests talk to them exactly as workers on several machines
would. ``tests/conftest.py`` imports the two fixtures, so any test can ask for ``postgres_url`` or
``mlflow_server``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

POSTGRES_BIN_ENV = "POSTGRES_BIN"  # directory holding initdb and pg_ctl, when not in the usual place
POSTGRES_INSTALL_HINT = (
    "Install PostgreSQL's server binaries (Debian/Ubuntu: `apt-get install postgresql`, which puts them "
    "in /usr/lib/postgresql/<version>/bin) or point ${env} at the directory holding initdb and pg_ctl."
).format(env=POSTGRES_BIN_ENV)
STARTUP_TIMEOUT_SECONDS = 120.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def find_postgres_bin() -> Path:
    """The directory with initdb/pg_ctl: $POSTGRES_BIN, else the newest /usr/lib/postgresql/*/bin, else PATH."""
    candidates: list[Path] = []
    if os.environ.get(POSTGRES_BIN_ENV):
        candidates.append(Path(os.environ[POSTGRES_BIN_ENV]))
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin"),
                    key=lambda path: int(path.parent.name) if path.parent.name.isdigit() else 0, reverse=True)
    candidates.extend(debian)
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).parent)
    for directory in candidates:
        if (directory / "initdb").is_file() and (directory / "pg_ctl").is_file():
            return directory
    looked = ", ".join(str(c) for c in candidates) or "/usr/lib/postgresql/*/bin and PATH"
    raise FileNotFoundError(f"PostgreSQL's initdb and pg_ctl were not found (looked in {looked}). "
                            f"{POSTGRES_INSTALL_HINT}")


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
        # The driver is named: SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3, and we ship psycopg2.
        return f"postgresql+psycopg2://{self.user}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """Create database ``name`` and return its SQLAlchemy URL."""
        import psycopg2

        connection = psycopg2.connect(host="127.0.0.1", port=self.port, user=self.user, dbname="postgres")
        try:
            connection.autocommit = True  # CREATE DATABASE cannot run inside a transaction
            with connection.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{name}"')
        finally:
            connection.close()
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
    """SQLAlchemy URL ``postgresql+psycopg2://postgres@127.0.0.1:<port>/<fresh db>`` of a real, temporary PostgreSQL.

    Fails (never skips) with an install hint when PostgreSQL's binaries are missing.
    """
    try:
        bin_dir = find_postgres_bin()
    except FileNotFoundError as error:
        pytest.fail(str(error))
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
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=10)
