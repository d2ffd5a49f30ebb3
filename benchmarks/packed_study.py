"""A whole study packed against today's route: wall time side by side, and whether packing changes the verdict.

    python -m benchmarks.packed_study [--study leave-one-out] [--arms A,B] [--packs 1,2] [--seeds 2]
                                      [--train-subset 12000] [--epochs 2] [--output FILE]

Runs ``python -m experiments.ablate --study S --pack K --no-report`` once per K in ``--packs``, one after the
other, each in a fresh store of its own (``--pack 1`` is today's route: one cell at a time on the default backend,
TensorFlow; ``--pack K`` trains K cells per process on Keras' JAX backend). The defaults are ``ablate --quick``'s
size. For
every route it records wall seconds, the cells trained and the cells that reuse an identical arm's run. Then it
reads each packed route against today's with the project's own tests (``stats.compare_to_baseline`` on the
per-image predictions: seeds and test images random, paired by seed, equivalence by TOST at the project's margin):
arm by arm, and pooled over every trained (arm, seed) cell. ``--packs 1`` alone times today's route (say
``--study factorial``). Writes benchmarks/results/packed_study.json (or ``--output``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import (
    Benchmark,
    Rendered,
    finish_machine_record,
    finite,
    machine_record,
    number,
    p_value,
    points,
)
from benchmarks.common import table as section_table
from mnist_ablation.defaults import CONFIDENCE, EQUIVALENCE_MARGIN

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_PATH = REPO_ROOT / "benchmarks" / "results" / "packed_study.json"
TODAY = "unpacked"  # today's route, the reference every packed route is compared with
POOLED = "all trained cells"


def _route(pack: int) -> str:
    return TODAY if pack == 1 else f"pack {pack}"


def ablate_command(args: argparse.Namespace, pack: int, store: Path) -> list[str]:
    """The study's ``experiments.ablate`` command for one route, in the fresh store ``store``."""
    return [sys.executable, "-m", "experiments.ablate", "--study", args.study,
            *(["--arms", args.arms] if args.arms else []), "--pack", str(pack), "--seeds", str(args.seeds),
            "--train-subset", str(args.train_subset), "--epochs", str(args.epochs),
            "--tracking-uri", f"sqlite:///{store / 'mlflow.db'}", "--storage", f"sqlite:///{store / 'optuna.db'}",
            "--no-report"]  # the study's report is not what is compared: its own predictions are


def route_figures(study: str, tracking_uri: str):
    """One route's store: per trained cell and test image whether it was right, and the route's figures.

    A cell that reuses an identical arm's run is that run again, so only trained cells are read.
    """
    from mnist_ablation import compare, store

    runs = compare.study_runs(study, tracking_uri=tracking_uri)
    trained = runs[runs["reuses_run"].isna()]
    seconds = (trained["end_time"] - trained["start_time"]).dt.total_seconds()
    correct = store.prediction_correctness(trained[["run_id", "arm", "seed"]])
    return correct, {
        "cells": len(runs), "cells_trained": len(trained), "cells_reusing": len(runs) - len(trained),
        "trained_cell_seconds_mean": finite(seconds.mean()) if len(seconds) else None,
        "test_accuracy_mean": {arm: float(g["test_accuracy"].astype(float).mean())
                               for arm, g in runs.groupby("arm", sort=False)},
    }


def _comparison(correct, label: str) -> dict:
    from mnist_ablation import stats

    row = stats.compare_to_baseline(correct, baseline=TODAY, confidence=CONFIDENCE,
                                    equivalence_margin=EQUIVALENCE_MARGIN).iloc[0]
    return {
        "cells": label, "n_pairs": int(row["n_pairs"]),
        "delta": finite(row["delta"]), "delta_ci_low": finite(row["delta_ci_low"]),
        "delta_ci_high": finite(row["delta_ci_high"]), "p_value": finite(row["p_value"]),
        "equivalence_p_value": finite(row["equivalence_p_value"]), "ci_width_floor": finite(row["ci_width_floor"]),
    }


def compare_routes(today_correct, packed_correct, route: str) -> list[dict]:
    """``route`` minus today's, arm by arm and pooled, from the two routes' per-image correctness."""
    import pandas as pd

    both = pd.concat([today_correct.assign(route=TODAY), packed_correct.assign(route=route)], ignore_index=True)
    rows = [_comparison(cells.assign(arm=cells["route"]), arm) for arm, cells in both.groupby("arm", sort=False)]
    # Pooled: each trained (arm, seed) cell is a unit, paired across the two routes.
    unit = both.groupby(["arm", "seed"], sort=False).ngroup()
    rows.append(_comparison(both.assign(arm=both["route"], seed=unit), POOLED))
    return rows


def verdict(row: dict) -> str:
    if row.get("p_value") is None:
        return "no estimate"
    if row["p_value"] < 1 - CONFIDENCE:
        return "differs"
    if row.get("equivalence_p_value") is not None and row["equivalence_p_value"] < 1 - CONFIDENCE:
        return f"equivalent within ±{100 * EQUIVALENCE_MARGIN:g} points"
    return "no difference detected; equivalence not shown"


def format_table(result: dict) -> str:
    lines = [f"{'route':<10} {'wall s':>8} {'x today':>8} {'trained':>8} {'reusing':>8} {'s / trained cell':>17}"]
    for row in result["routes"]:
        lines.append(f"{row['route']:<10} {row['wall_seconds']:>8.0f} {row['wall_ratio_to_today']:>8.2f} "
                     f"{row['cells_trained']:>8} {row['cells_reusing']:>8} "
                     f"{number(row['trained_cell_seconds_mean'], 1):>17}")
    for route, rows in result.get("comparisons", {}).items():
        lines.append(f"\n{route} minus {TODAY} (points, {100 * CONFIDENCE:.0f}% interval; "
                     "seeds and test images random)")
        for row in rows:
            lines.append(f"  {row['cells']:<22} {points(row['delta'], True):>7} [{points(row['delta_ci_low'], True)}, "
                         f"{points(row['delta_ci_high'], True)}]  p {p_value(row['p_value'])}  "
                         f"TOST p {p_value(row['equivalence_p_value'])}  {verdict(row)}")
    return "\n".join(lines)


def _write(result: dict, output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.packed_study", description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", default="leave-one-out", help="a built-in study (default: %(default)s)")
    parser.add_argument("--arms", default=None, help="only these arms (comma-separated; default: all)")
    parser.add_argument("--packs", default="1,2",
                        help="pack sizes K, one study each; 1 (today's route) is always measured first "
                             "(default: %(default)s)")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per arm (default: --quick's %(default)s)")
    parser.add_argument("--train-subset", type=int, default=12000, help="default: --quick's %(default)s")
    parser.add_argument("--epochs", type=int, default=2, help="default: --quick's %(default)s")
    parser.add_argument("--output", type=Path, default=RESULTS_PATH)
    args = parser.parse_args(argv)
    try:
        packs = sorted({1, *(int(k) for k in args.packs.split(","))})
    except ValueError:
        parser.error(f"--packs {args.packs!r}: expected comma-separated integers, e.g. 1,2,4")
    if packs[0] < 1:
        parser.error(f"--packs {args.packs!r}: pack sizes are integers >= 1")
    for name in ("seeds", "train_subset", "epochs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: expected an integer >= 1")

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # reading predictions, as commands do
    machine = machine_record()
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    result = {
        "benchmark": "packed_study",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python -m benchmarks.packed_study " + " ".join(argv if argv is not None else sys.argv[1:]),
        "study": args.study,
        "settings": {"arms": args.arms, "seeds": args.seeds, "train_subset": args.train_subset, "epochs": args.epochs,
                     "packs": packs, "confidence": CONFIDENCE, "equivalence_margin": EQUIVALENCE_MARGIN},
        "machine": machine,
        "routes": [],
        "comparisons": {},
    }
    correct = {}
    with tempfile.TemporaryDirectory(prefix="packed_study_") as tmp:
        for pack in packs:
            store = Path(tmp) / f"pack{pack}"
            store.mkdir()
            command = ablate_command(args, pack, store)
            print(f"$ python -m experiments.ablate {' '.join(command[3:command.index('--tracking-uri')])}",
                  file=sys.stderr, flush=True)
            started = time.perf_counter()
            done = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True)
            wall = time.perf_counter() - started
            if done.returncode != 0:
                raise SystemExit(f"--pack {pack} failed (exit {done.returncode}); the routes before it are in "
                                 f"{args.output}:\n{done.stderr[-3000:]}")
            correct[pack], figures = route_figures(args.study, f"sqlite:///{store / 'mlflow.db'}")
            today = result["routes"][0]["wall_seconds"] if result["routes"] else wall
            result["routes"].append({"route": _route(pack), "pack": pack, "wall_seconds": wall,
                                     "wall_ratio_to_today": wall / today, **figures})
            if pack != 1:
                result["comparisons"][_route(pack)] = compare_routes(correct[1], correct[pack], _route(pack))
            finish_machine_record(machine)
            _write(result, args.output)  # after every route: a later failure keeps what was measured
    print(format_table(result))
    print(f"wrote {args.output}")
    return 0


# -- its section of docs/benchmarks.md (benchmarks/common.py) ----------------------------------------------------


def render_report(data: dict, out: Rendered) -> None:
    settings = data.get("settings", {})
    out.tables.append(section_table(
        ["route", "wall seconds", "× today", "cells trained", "cells reusing an identical arm's run",
         "s a trained cell's run lasts (a pack's members run together)"],
        [[row["route"], number(row.get("wall_seconds"), 0), number(row.get("wall_ratio_to_today"), 2),
          row.get("cells_trained"), row.get("cells_reusing"), number(row.get("trained_cell_seconds_mean"), 1)]
         for row in data.get("routes", [])]))
    out.lines.append(f"Study `{data.get('study')}`: {settings.get('seeds')} seeds per arm, "
                     f"{settings.get('train_subset', 0):,} training images × {settings.get('epochs')} epochs per cell.")
    level = f"{round(100 * settings.get('confidence', CONFIDENCE))}%"
    margin = 100 * settings.get("equivalence_margin", EQUIVALENCE_MARGIN)
    for route, rows in data.get("comparisons", {}).items():
        out.tables.append(section_table(
            [f"{route} minus {TODAY}", "paired cells", "difference (points)", f"{level} interval (points)", "p",
             f"TOST p (±{margin:g} points)", "verdict"],
            [[row["cells"], row.get("n_pairs"), points(row.get("delta"), True),
              f"[{points(row.get('delta_ci_low'), True)}, {points(row.get('delta_ci_high'), True)}]",
              p_value(row.get("p_value")), p_value(row.get("equivalence_p_value")), verdict(row)] for row in rows]))


REPORT = Benchmark(
    key="packed_study", title="A whole study, packed and unpacked", command="python -m benchmarks.packed_study",
    order=81,
    about=("`ablate --pack K` against today's route (`--pack 1`) on a whole study, one after the other on the same "
           "machine, each in a fresh store: wall time, cells trained, and the packed cells' test predictions "
           "against today's read with the project's own difference and equivalence tests (seeds and test images "
           "random, paired by seed), arm by arm and pooled over every trained cell."),
    render=render_report)


if __name__ == "__main__":
    sys.exit(main())
