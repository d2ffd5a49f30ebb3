"""Shared fixtures: MNIST from ../shared/data/mnist (or $MNIST_DATA_DIR), temporary MLflow stores, services."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

pytest_plugins = ["explorer_fixtures"]  # the model explorer's trained study store and server
REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("MNIST_DATA_DIR") or REPO_ROOT.parent / "shared" / "data" / "mnist").resolve()
# Absolute, so that commands the tests start in temporary directories find the data too.
os.environ["MNIST_DATA_DIR"] = str(DATA_DIR)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "train-images-idx3-ubyte.gz").exists() and not (DATA_DIR / "mnist.npz").exists():
        pytest.fail(f"MNIST not found in {DATA_DIR}; set MNIST_DATA_DIR to the directory with the IDX files")
    return DATA_DIR


@pytest.fixture(scope="session")
def mnist(data_dir):
    from mnist_ablation.data import load_mnist

    return load_mnist(data_dir)


@pytest.fixture()
def tracking_uri(tmp_path, monkeypatch) -> str:
    """A fresh SQLite MLflow store in a temporary directory, active for this test."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()


from servers import browser, chromium, mlflow_server, postgres_url  # noqa: E402,F401
