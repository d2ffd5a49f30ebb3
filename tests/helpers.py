"""Running the project's commands as a user would: real subprocesses against real stores."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def command_env(tracking_uri: str, data_dir: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"MLFLOW_TRACKING_URI": tracking_uri, "MNIST_DATA_DIR": str(data_dir), "TF_CPP_MIN_LOG_LEVEL": "2",
                "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def run_module(module: str, *args: str, env: dict[str, str], cwd: Path | None = None, timeout: float = 600,
               check: bool = True) -> subprocess.CompletedProcess:
    """``python -m module args`` to completion; on an unexpected exit code the output is in the assertion."""
    result = subprocess.run([sys.executable, "-m", module, *args], env=env, cwd=cwd or REPO_ROOT,
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{module} {' '.join(args)} exited {result.returncode}\n"
                             f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}")
    return result


def start_module(module: str, *args: str, env: dict[str, str], cwd: Path | None = None,
                 log: Path | None = None) -> subprocess.Popen:
    """``python -m module args`` in the background; its output in ``process.stdout``, or in the file ``log``."""
    if log is None:
        return subprocess.Popen([sys.executable, "-m", module, *args], env=env, cwd=cwd or REPO_ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with open(log, "w") as handle:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([sys.executable, "-m", module, *args], env=env, cwd=cwd or REPO_ROOT,
                                stdout=handle, stderr=subprocess.STDOUT, text=True)
