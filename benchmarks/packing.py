"""Packed training against today's one-run-per-process route: images/s and full-length runs per hour.

    python -m benchmarks.packing [--packs 1,2,4,8,16,32] [--train-subset 1024] [--epochs 2] [--member-axis vmap]
                                 [--time-limit SECONDS]

Each measurement runs in its own process, one after another (compare them on a quiet machine): today's route
is ``train.train`` of one seed-recipe run on the process's Keras backend (the default, TensorFlow, as
``experiments.ablate`` trains each cell; JAX where ``KERAS_BACKEND=jax`` is set, as on a GPU machine without
TensorFlow), and the row names the backend it measured; a pack of K is ``packed.train_pack`` of K seeds on JAX.
Both train ``--train-subset`` images for ``--epochs`` epochs with a 500-image validation set, so an epoch is
mostly training. The steady rate is the last epoch's (the first one compiles); ``images/s`` is every member's
training images over that epoch's wall time, and full-length runs per hour extrapolate it to the seed recipe
(15 epochs of 55,000 images), leaving out per-run fixed costs (process start, compilation, the test
evaluation), which the table reports apart. Writes benchmarks/results/packing.json (or ``--output``), rewritten
after every measurement; with ``--time-limit``, the packs left when it runs out are recorded as not measured
(the packs are measured in ``--packs`` order and tabled by K, so list first the ones that matter most).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from benchmarks.common import Benchmark, Rendered, finish_machine_record, machine_record, number, table

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "packing.json"
FULL_RUN_IMAGES = 15 * 55_000  # the seed recipe: 15 epochs of the 55,000 training images
VALIDATION_SIZE = 500
TODAY = "today"  # the worker mode of today's route


def _config(seed: int, train_subset: int, epochs: int):
    from mnist_ablation.config import BASELINE

    return BASELINE.replace(seed=seed, train_subset=train_subset, epochs=epochs, validation_size=VALIDATION_SIZE)


def run_worker(mode: str, train_subset: int, epochs: int, member_axis: str) -> None:
    """Train in this process and print one JSON line: per-epoch seconds, images per epoch, wall time."""
    started = time.perf_counter()
    from mnist_ablation.data import load_mnist

    data = load_mnist()
    if mode == TODAY:
        from mnist_ablation.train import train

        results = [train(_config(0, train_subset, epochs), data, verbose=0)]
    else:
        from mnist_ablation.packed import train_pack

        configs = [_config(seed, train_subset, epochs) for seed in range(int(mode))]
        results = train_pack(configs, data, member_axis=member_axis)
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        raise failed[0]
    import keras

    print(json.dumps({"epoch_seconds": results[0].history["epoch_seconds"], "members": len(results),
                      "images_per_epoch": results[0].num_train_images, "backend": keras.backend.backend(),
                      "wall_seconds": time.perf_counter() - started}))


def _measure(mode: str, args, seconds_left: float | None = None) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    if mode != TODAY:
        env["KERAS_BACKEND"] = "jax"
    command = [sys.executable, "-m", "benchmarks.packing", "--worker", mode, "--train-subset", str(args.train_subset),
               "--epochs", str(args.epochs), "--member-axis", args.member_axis]
    if seconds_left is not None and seconds_left <= 0:
        return {"mode": mode, "error": f"not measured: the --time-limit of {args.time_limit:g} s ran out"}
    try:
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=seconds_left)
    except subprocess.TimeoutExpired:
        return {"mode": mode, "error": f"stopped at the --time-limit of {args.time_limit:g} s"}
    if result.returncode != 0:
        return {"mode": mode, "error": result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"}
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    steady = figures["epoch_seconds"][-1]
    images_per_second = figures["members"] * figures["images_per_epoch"] / steady
    return {
        "mode": mode,
        "members": figures["members"],
        "backend": figures["backend"],
        "images_per_second": images_per_second,
        "full_runs_per_hour": 3600 * images_per_second / FULL_RUN_IMAGES,
        "first_epoch_extra_seconds": figures["epoch_seconds"][0] - steady,
        "process_seconds": figures["wall_seconds"],
    }


def format_table(payload: dict) -> str:
    lines = [f"{'route':<40} {'images/s':>10} {'x today':>8} {'runs/h (15 ep)':>15} {'compile s':>10}"]
    for row in payload["rows"]:
        if "error" in row:
            lines.append(f"{row['label']:<40} failed: {row['error']}")
            continue
        lines.append(f"{row['label']:<40} {row['images_per_second']:>10.0f} {row['ratio_to_today']:>8.2f} "
                     f"{row['full_runs_per_hour']:>15.1f} {row['first_epoch_extra_seconds']:>10.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.packing", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--packs", default="1,2,4,8,16,32", help="pack sizes K to measure (comma-separated)")
    parser.add_argument("--train-subset", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=2, help="at least 2: the last epoch gives the steady rate")
    parser.add_argument("--member-axis", default="vmap", choices=("vmap", "map"))
    parser.add_argument("--output", default=str(RESULTS_PATH))
    parser.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                        help="stop measuring after this many seconds in all (the rest are recorded as not measured)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        run_worker(args.worker, args.train_subset, args.epochs, args.member_axis)
        return 0
    if args.epochs < 2:
        parser.error(f"--epochs {args.epochs}: expected at least 2 (the first epoch compiles).")
    packs = [int(k) for k in args.packs.split(",")]
    machine = machine_record()
    deadline = None if args.time_limit is None else time.monotonic() + args.time_limit
    rows: list[dict] = []
    for mode in [TODAY, *map(str, packs)]:
        if mode != TODAY:
            print(f"measuring a pack of {mode} ...", file=sys.stderr, flush=True)
        row = _measure(mode, args, None if deadline is None else deadline - time.monotonic())
        rows.append(dict(row, label=_label(row, args.member_axis)))
        payload = _payload(rows, args, argv, machine)
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(payload, indent=2) + "\n")  # what is measured so far survives a kill
    payload = _payload(rows, args, argv, finish_machine_record(machine))
    Path(args.output).write_text(json.dumps(payload, indent=2) + "\n")
    print(format_table(payload))
    print(f"wrote {args.output}")
    return 0


def _label(row: dict, member_axis: str) -> str:
    if row["mode"] == TODAY:
        return f"today: one run per process ({row.get('backend', 'not measured')})"
    return f"packed, K={row['mode']} ({member_axis})"


def _payload(rows: list[dict], args, argv, machine: dict) -> dict:
    """The result file: today's row first, then the packs by K, each with its rate relative to today's."""
    today = next((row.get("images_per_second") for row in rows if row["mode"] == TODAY), None)
    for row in rows:
        if "error" not in row and today:
            row["ratio_to_today"] = row["images_per_second"] / today
    ordered = sorted(rows, key=lambda row: -1 if row["mode"] == TODAY else int(row["mode"]))
    return {
        "benchmark": "packing",
        "date": date.today().isoformat(),
        "command": "python -m benchmarks.packing " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine,
        "settings": {"train_subset": args.train_subset, "epochs": args.epochs, "validation_size": VALIDATION_SIZE,
                     "member_axis": args.member_axis, "full_run_images": FULL_RUN_IMAGES,
                     "today_backend": next((row.get("backend") for row in rows if row["mode"] == TODAY), None)},
        "rows": ordered,
    }


def render_report(data: dict, out: Rendered) -> None:
    rows = [[row["label"], "failed: " + row["error"]] + [""] * 3 if "error" in row else
            [row["label"], number(row.get("images_per_second"), 0), number(row.get("ratio_to_today"), 2),
             number(row.get("full_runs_per_hour"), 1), number(row.get("first_epoch_extra_seconds"), 1)]
            for row in data.get("rows", [])]
    out.tables.append(table(["route", "training images/s", "× today", "full-length runs/hour (extrapolated)",
                             "first epoch's extra seconds (compilation)"], rows))
    settings = data.get("settings", {})
    out.lines.append(f"{settings.get('train_subset', 0):,} training images × {settings.get('epochs')} epochs per run "
                     f"({settings.get('validation_size')} validation images); the rate is the last epoch's, and "
                     "runs/hour extrapolate it to 15 epochs of 55,000 images without per-run fixed costs.")


REPORT = Benchmark(
    key="packing", title="Packed training", command="python -m benchmarks.packing", order=80,
    about=("K seed-recipe runs trained as one pack (`ablate --pack K`: one compiled, `jax.vmap`-ed step per batch "
           "on Keras' JAX backend, data and augmentation on the device) against today's route, one run per process "
           "on the default backend (TensorFlow; on a GPU machine without it, one unpacked JAX run per process: the "
           "row names its backend), each in its own process, one after the other on the same machine."),
    render=render_report)


if __name__ == "__main__":
    sys.exit(main())
