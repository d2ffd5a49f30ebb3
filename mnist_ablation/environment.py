"""What a run needs to be re-created: package versions, git commit, machine, data checksums."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path

from .redaction import redact_argv

PACKAGES = (
    "tensorflow", "keras", "mlflow", "optuna", "numpy", "pandas", "scipy", "statsmodels",
    "matplotlib", "seaborn", "mnist_ablation", "jax", "jaxlib",
)
REPO_ROOT = Path(__file__).resolve().parent.parent


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_state(root: Path = REPO_ROOT) -> dict[str, object]:
    """Commit of the code that ran, and whether the work tree had uncommitted changes."""

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}


def machine() -> dict[str, object]:
    record: dict[str, object] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "processor": platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
    }
    import keras

    record["keras_backend"] = keras.backend.backend()
    if record["keras_backend"] == "tensorflow":
        import tensorflow as tf

        record["tensorflow_devices"] = [d.name for d in tf.config.list_physical_devices()]
    elif record["keras_backend"] == "jax":
        import jax

        record["jax_devices"] = [str(device) for device in jax.devices()]
    return record


def environment_record(data_checksums: dict[str, str], data_source: str) -> dict[str, object]:
    return {
        "packages": package_versions(),
        "git": git_state(),
        "machine": machine(),
        "data": {"source": data_source, "sha256": dict(data_checksums)},
        "command": redact_argv(sys.argv),
    }
