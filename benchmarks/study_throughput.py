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
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import Benchmark, Rendered, finish_machine_record, machine_record, number
from benchmarks.common import table as section_table

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

    machine = machine_record()
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
        "machine": finish_machine_record(machine),
        "rows": rows,
    }
    print(f"{args.cells} runs of {args.train_subset} images x {args.epochs} epoch(s), "
          f"load {machine['load_average']['start'][0]:.1f}")
    print(f"{'mode':36s} {'seconds':>8s} {'runs/hour':>10s} {'x seed loop':>12s} {'peak RSS MB':>12s}")
    for row in rows:
        print(f"{row['mode']:36s} {row['seconds']:8.1f} {row['runs_per_hour']:10.1f} "
              f"{row['ratio_to_seed_loop']:12.2f} {row['peak_rss_mb']:12.0f}")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2))
    return 0


# -- its section of docs/benchmarks.md (benchmarks/common.py) ----------------------------------------------------


def render_report(data: dict, out: Rendered) -> None:
    cells = data.get("cells")
    rows = [[row["mode"], number(row.get("seconds"), 1), number(row.get("runs_per_hour"), 0),
             number(row.get("ratio_to_seed_loop"), 2), number(row.get("peak_rss_mb"), 0)]
            for row in data.get("rows", [])]
    out.tables.append(section_table(["mode", f"seconds for {cells} runs", "runs per hour", "× seed loop",
                             "peak RSS of the largest process (MB)"], rows))
    out.lines.append(f"{cells} runs (the baseline arm, seeds 0-{cells - 1}) of {data.get('train_subset', 0):,} "
                     f"training images × {data.get('epochs')} epoch(s) each, the modes one after the other.")


def report_command(data: dict) -> str:
    """The command of a result that did not record it, from its settings."""
    workers = max([int(m) for row in data.get("rows", []) for m in re.findall(r"--workers (\d+)", row["mode"])] or [2])
    return (f"python -m benchmarks.study_throughput --cells {data.get('cells')} --train-subset "
            f"{data.get('train_subset')} --epochs {data.get('epochs')} --workers {workers}")


REPORT = Benchmark(
    key="study_throughput", title="Study throughput", command="python -m benchmarks.study_throughput", order=20,
    about=("Whole studies: the same cells (the baseline arm, several seeds) run as a sequential loop of the "
           "seed's script (`benchmarks/seed_script.py`, one process per run), as `experiments.ablate --workers "
           "1` and as `experiments.ablate --workers 2`, one after the other on the same machine, with everything "
           "logged to MLflow in the ablate modes."),
    render=render_report, reconstruct=report_command)


if __name__ == "__main__":
    raise SystemExit(main())
