"""What any packing could buy on this machine: the seed model's bare training step, per backend and batch size.

    python -m benchmarks.step_ceiling [--backends tensorflow,jax] [--batch-sizes 32,64,128,256] [--images 4096]
                                      [--repeats 3]

Each backend runs in its own process: the seed recipe's model (``model.build_model(BASELINE)``), compiled as the
trainer compiles it, trains one warm-up pass and then ``--repeats`` timed epochs (the median counts) of ``--images``
random images with ``model.fit`` at each batch size: no augmentation, no validation, no callbacks, so the figure is
the step alone. A pack of K members at batch 32 does the arithmetic of one batch of 32 K, so the growth of images/s
from batch 32 to larger batches bounds what packing can gain on this machine over the steps, and the ratio between
backends is what the packed path (Keras on JAX) starts from against the default trainer (TensorFlow). Writes
benchmarks/results/step_ceiling.json (or ``--output``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import Benchmark, Rendered, finish_machine_record, machine_record, number, spread, table

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "step_ceiling.json"


def run_worker(batch_sizes: list[int], images: int, repeats: int) -> None:
    """In this process's backend: one JSON line, images/s of the bare training step per batch size (the median
    of ``repeats`` timed epochs: this machine's speed comes and goes)."""
    import keras
    import numpy as np

    from mnist_ablation.config import BASELINE
    from mnist_ablation.model import build_model
    from mnist_ablation.train import compile_model, steps_per_epoch

    rng = np.random.default_rng(0)
    x = rng.random((images, 28, 28, 1), dtype=np.float32)
    y = keras.utils.to_categorical(rng.integers(0, 10, images), 10)
    rates, repeated = {}, {}
    for batch in batch_sizes:
        config = BASELINE.replace(batch_size=batch)
        model = compile_model(build_model(config), config, steps_per_epoch(images, batch))
        model.fit(x[:batch * 8], y[:batch * 8], batch_size=batch, epochs=1, verbose=0)  # traces and compiles
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            model.fit(x, y, batch_size=batch, epochs=1, verbose=0)
            seconds.append(time.perf_counter() - started)
        rates[str(batch)] = images / statistics.median(seconds)
        repeated[str(batch)] = [images / s for s in seconds]
    print(json.dumps({"backend": keras.backend.backend(), "images_per_second": rates,
                      "images_per_second_each_repeat": repeated}))


def _measure(backend: str, args) -> dict:
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2")
    command = [sys.executable, "-m", "benchmarks.step_ceiling", "--worker", "--backends", backend,
               "--batch-sizes", args.batch_sizes, "--images", str(args.images), "--repeats", str(args.repeats)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        return {"backend": backend, "error": lines[-1] if lines else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.step_ceiling", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="tensorflow,jax", help="Keras backends, each in its own process")
    parser.add_argument("--batch-sizes", default="32,64,128,256")
    parser.add_argument("--images", type=int, default=4096, help="random images in the timed epoch")
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per batch size; the median counts")
    parser.add_argument("--output", type=Path, default=RESULTS_PATH)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        parser.error(f"--batch-sizes {args.batch_sizes!r}: expected comma-separated integers, e.g. 32,128")
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: expected an integer >= 1")
    if min(batch_sizes) < 1 or args.images < max(batch_sizes):
        parser.error(f"--batch-sizes {args.batch_sizes} with --images {args.images}: expected batch sizes >= 1 and "
                     "at least one batch of the largest in the timed epoch")
    if args.worker:
        run_worker(batch_sizes, args.images, args.repeats)
        return 0
    machine = machine_record()
    rows = [_measure(backend, args) for backend in args.backends.split(",")]
    result = {
        "benchmark": "step_ceiling",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python -m benchmarks.step_ceiling " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": {"batch_sizes": batch_sizes, "images": args.images, "repeats": args.repeats},
        "machine": finish_machine_record(machine),
        "rows": rows,
    }
    for row in rows:
        rates = row.get("images_per_second", {})
        print(f"{row['backend']:<12} " + ("failed: " + row["error"] if "error" in row else
                                          "  ".join(f"batch {b}: {rate:.0f} img/s" for b, rate in rates.items())))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


# -- its section of docs/benchmarks.md (benchmarks/common.py) ----------------------------------------------------


def render_report(data: dict, out: Rendered) -> None:
    sizes = [str(b) for b in data.get("settings", {}).get("batch_sizes", [])]
    reference = next((row.get("images_per_second", {}).get(sizes[0]) for row in data.get("rows", [])
                      if row.get("backend") == "tensorflow"), None) if sizes else None
    rows = []
    for row in data.get("rows", []):
        if "error" in row:
            rows.append([row["backend"], "failed: " + row["error"]] + [""] * len(sizes))
            continue
        rates, each = row.get("images_per_second", {}), row.get("images_per_second_each_repeat", {})
        rows.append([row["backend"], *(spread({"median": rates.get(b), "min": min(each[b]), "max": max(each[b])}, 0)
                                       if each.get(b) else number(rates.get(b), 0) for b in sizes),
                     number(rates[sizes[0]] / reference, 2) if reference and sizes[0] in rates else "—"])
    out.tables.append(table(["backend", *(f"images/s at batch {b} (median [min-max])" for b in sizes),
                             f"× TensorFlow at batch {sizes[0] if sizes else '?'}"], rows))
    settings = data.get("settings", {})
    out.lines.append(f"{settings.get('images', 0):,} random images per timed epoch, the median of "
                     f"{settings.get('repeats', 1)} epochs; the bare training step (no augmentation, validation or "
                     "callbacks).")


REPORT = Benchmark(
    key="step_ceiling", title="The training step's ceiling", command="python -m benchmarks.step_ceiling", order=82,
    about=("The seed model's bare training step (`model.fit` on random images, nothing else) per Keras backend and "
           "batch size, each backend in its own process. A pack of K at batch 32 does the arithmetic of one batch of "
           "32 K, so the rise from batch 32 bounds what any packing can gain over the steps here, and the ratio "
           "between backends is where the packed path (JAX) starts against the default trainer (TensorFlow)."),
    render=render_report)


if __name__ == "__main__":
    sys.exit(main())
