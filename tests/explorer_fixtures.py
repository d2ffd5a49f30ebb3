"""Fixtures for the model explorer's tests (tests/test_serve.py, tests/test_browser.py); a pytest plugin.

``explorer_store`` trains one tiny run (300 images, 1 epoch) per arm of a study into a temporary SQLite MLflow
store: the seed's CNN with and without batch norm, a pooling-free ``no_pool_5x5`` net (output: Dense
``logits``, BatchNormalization ``logits_bn``, ``Activation("softmax")``), and a run whose arm is HTML markup.
``explorer_server`` serves that study with ``python -m experiments.serve`` as a real uvicorn process on a
free 127.0.0.1 port, once for the session.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from servers import free_port, wait_for_health

REPO_ROOT = Path(__file__).resolve().parent.parent
STUDY = "explorer-test"
MARKUP_ARM = "<img src=x onerror=alert(1)>"  # a label that would run script if the page parsed it as HTML
NO_POOL_ARM = "no_pool_5x5"
# Arm -> config overrides of the tiny runs. Offered baseline first, then by arm name (the study has no study.json).
ARM_OVERRIDES = {
    "baseline": {},
    "no_batch_norm": {"batch_norm": False},
    NO_POOL_ARM: {"architecture": "no_pool_5x5", "conv_filters": (8, 16, 16)},
    MARKUP_ARM: {"architecture": "no_pool_7x7", "conv_filters": (8, 16)},
}
ARMS = ("baseline", MARKUP_ARM, "no_batch_norm", NO_POOL_ARM)  # the order the server offers them in
ALLOWED_HOST = "explorer.test"  # passed as --allowed-host
MLFLOW_UI_URL = "http://mlflow.example:5001/"
SERVER_START_TIMEOUT = 240.0  # TensorFlow import plus model load on a busy 2-core machine


@pytest.fixture(scope="session")
def explorer_store(tmp_path_factory, mnist) -> dict:
    """{"uri": SQLite tracking URI, "runs": {arm: run_id}} of study STUDY, one tiny trained run per arm."""
    import mlflow

    from mnist_ablation import naming, tracking
    from mnist_ablation.config import BASELINE

    root = tmp_path_factory.mktemp("explorer_store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    previous_uri = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        experiment_name = naming.ablation_experiment(STUDY)
        experiment_id = tracking.get_or_create_experiment(experiment_name)
        parent_id = tracking.create_run(experiment_id, STUDY,
                                        {naming.STUDY_TAG: STUDY, naming.ROLE_TAG: naming.STUDY_ROLE})
        tracking.set_status(parent_id, "FINISHED")
        runs = {}
        for arm, overrides in ARM_OVERRIDES.items():
            config = BASELINE.replace(train_subset=300, epochs=1, **overrides)
            tracked = tracking.run_training(
                config, mnist, experiment_name=experiment_name, run_name=f"{arm}-seed0", parent_run_id=parent_id,
                tags={naming.STUDY_TAG: STUDY, naming.ARM_TAG: arm, naming.ROLE_TAG: naming.CELL_ROLE}, verbose=0,
            )
            runs[arm] = tracked.run_id
    finally:
        mlflow.set_tracking_uri(previous_uri)
    return {"uri": uri, "runs": runs}


class ServerProcess:
    """``python -m experiments.serve ARGS`` on a free port, waited for until /api/health answers."""

    def __init__(self, arguments: list[str], log_path: Path, data_dir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        command = [sys.executable, "-m", "experiments.serve", *arguments, "--host", "127.0.0.1",
                   "--port", str(self.port), "--data-dir", str(data_dir), "--log-level", "warning"]
        environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
        with open(log_path, "w") as log:
            self.process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                            env=environment)

    def wait_until_healthy(self, timeout: float = SERVER_START_TIMEOUT) -> None:
        wait_for_health(f"{self.url}/api/health", self.process, self.log_path, timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


@pytest.fixture(scope="session")
def explorer_server(tmp_path_factory, data_dir, explorer_store):
    """The explorer serving study STUDY from ``explorer_store`` (also answering Host ALLOWED_HOST)."""
    log_path = tmp_path_factory.mktemp("explorer_server") / "server.log"
    server = ServerProcess(["--study", STUDY, "--tracking-uri", explorer_store["uri"], "--allowed-host", ALLOWED_HOST,
                            "--mlflow-ui-url", MLFLOW_UI_URL], log_path, data_dir)
    try:
        server.wait_until_healthy()
    except RuntimeError as error:
        server.stop()
        pytest.fail(str(error))
    yield server
    server.stop()
