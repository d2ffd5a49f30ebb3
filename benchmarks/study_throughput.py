"""Whole-study throughput: runs per hour of a sequential loop of the seed's script against
``experiments.ablate`` with one and with several workers, on the same cells.

    python -m benchmarks.study_throughput [--cells 4] [--train-subset 10000] [--epochs 1] [--workers 2]

Each mode trains ``--cells`` identical-cost runs (the baseline arm, seeds 0..cells-1) of the same size.
Modes run one after another in this order, so compare them on a quiet machine; each reports wall time,
runs per hour, the ratio to the seed loop, and the peak resident memory of its largest process. Writes
benchmarks/results/study_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "study_throughput.json"


def _measure(command: list[str], env: dict[str, str], cwd: str) -> dict[str, float]:
    """Run ``command`` in a wrapper process; wall seconds and the peak RSS of its largest descendant."""
    wrapper = ("import resource, subprocess, sys, json, time; t = time.perf_counter(); "
               "code = subprocess.run(sys.argv[1:]).returncode; "
               "print(json.dumps({'code': code, 'seconds': time.perf_counter() - t, "
               "'peak_rss_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))")
    result = subprocess.run([sys.executable, "-c", wrapper, *command], env=env, cwd=cwd,
                            capture_output=True, text=True)
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    if figures["code"] != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return figures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.study_throughput", description=__doc__)
    parser.add_argument("--cells", type=int, default=4)
    parser.add_argument("--train-subset", type=int, default=10000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--output", default=str(RESULTS_PATH))
    args = parser.parse_args(argv)

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    size = ["--train-subset", str(args.train_subset), "--epochs", str(args.epochs)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="study_throughput_") as tmp:
        seed_loop = {"seconds": 0.0, "peak_rss_mb": 0.0}
        for _ in range(args.cells):
            figures = _measure([sys.executable, "-m", "benchmarks.seed_script", *size], env, tmp)
            seed_loop["seconds"] += figures["seconds"]
            seed_loop["peak_rss_mb"] = max(seed_loop["peak_rss_mb"], figures["peak_rss_mb"])
        rows.append({"mode": "seed script, sequential loop", **seed_loop})
        for workers in sorted({1, args.workers}):
            uri = f"sqlite:///{tmp}/store{workers}/mlflow.db"
            figures = _measure([sys.executable, "-m", "experiments.ablate", "--arms", "baseline", "--seeds",
                                str(args.cells), *size, "--workers", str(workers), "--no-report",
                                "--tracking-uri", uri], env, tmp)
            rows.append({"mode": f"experiments.ablate --workers {workers}", **figures})
    for row in rows:
        row["runs_per_hour"] = args.cells / row["seconds"] * 3600
        row["ratio_to_seed_loop"] = rows[0]["seconds"] / row["seconds"]
        row.pop("code", None)
    result = {
        "cells": args.cells, "train_subset": args.train_subset, "epochs": args.epochs,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "load_average": os.getloadavg()},
        "rows": rows,
    }
    print(f"{args.cells} runs of {args.train_subset} images x {args.epochs} epoch(s), load {os.getloadavg()[0]:.1f}")
    print(f"{'mode':36s} {'seconds':>8s} {'runs/hour':>10s} {'x seed loop':>12s} {'peak RSS MB':>12s}")
    for row in rows:
        print(f"{row['mode']:36s} {row['seconds']:8.1f} {row['runs_per_hour']:10.1f} "
              f"{row['ratio_to_seed_loop']:12.2f} {row['peak_rss_mb']:12.0f}")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
