"""Speed benchmark: the seed's own pipeline against the project's trainer, interleaved on one machine.

    python -m benchmarks.speed                 # short mode, about two minutes on 2 free cores
    python -m benchmarks.speed --mode full     # whole epochs (about 1-2 minutes per epoch per path)

Each path runs in its own persistent worker process (``--worker NAME``) so that its peak resident memory
(``ru_maxrss``, read after its first measurement: imports, data and one training run) is its own, and
imports and data loading happen once. The parent drives the workers in
rounds, one at a time, rotating the order every round, so that all paths see the same machine: on a
shared machine the load drifts, and a ratio taken within one round is far steadier than one taken
minutes apart. Every figure is reported as the median over rounds with its min-max spread.

A measurement is one ``model.fit`` of a fresh model: the first ``--warmup`` steps (tracing, first
allocations) are excluded, then ``--steps`` steps are timed (short mode) or the rest of the epoch is
(full mode). Short mode estimates seconds per epoch as the epoch's images at the measured rate plus the
measured validation pass; full mode measures the epoch (including validation) directly.

The fraction of peak counts the model's training FLOPs (forward plus two backward products per layer)
against the best 4096x4096 fp32 ``tf.matmul`` rate measured in a worker of its own, using every core.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import (
    Benchmark,
    Rendered,
    finish_machine_record,
    machine_record,
    machine_text,
    number,
    percent,
    spread,
)
from benchmarks.common import table as section_table
from mnist_ablation.seed_pipeline import lr_scheduler as seed_lr_scheduler  # import-light: no Keras

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "speed.json"
MATMUL_SIZE = 4096
RESULT_PREFIX = "SPEED-RESULT "  # marks the worker's protocol lines among anything else on stdout
MODES = {
    # mode: (timed steps per measurement or None for the whole epoch, rounds, warm-up steps)
    "short": (200, 3, 20),
    "full": (None, 3, 20),
}


@dataclass(frozen=True)
class SpeedPath:
    """One way of training the seed's model for the benchmark."""

    name: str
    description: str
    runner: str  # "seed": the seed's code as written; "trainer": mnist_ablation.train.train
    overrides: dict[str, Any] = field(default_factory=dict)  # TrainConfig overrides for trainer paths
    environment: dict[str, str] = field(default_factory=dict)  # extra environment for the worker


PATHS: dict[str, SpeedPath] = {
    "seed": SpeedPath(
        "seed",
        "seed code as written: Sequential, ImageDataGenerator.flow(batch 32), fit, validation on test",
        "seed",
    ),
    "trainer": SpeedPath(
        "trainer",
        "mnist_ablation.train.train at BASELINE (augmentation on, batch 32; default steps_per_execution=16, "
        "9 for the 1719-step epoch)",
        "trainer",
    ),
    "trainer-spe1": SpeedPath(
        "trainer-spe1",
        "trainer with steps_per_execution=1 (one Python round trip per step, like the seed)",
        "trainer",
        {"steps_per_execution": 1},
    ),
}
DEFAULT_PATHS = ("seed", "trainer", "trainer-spe1")


def training_flops_per_image(model) -> float:
    """Multiply-add FLOPs to train on one image: the forward pass, and twice it for the backward pass.

    Counts Conv2D (2 * output pixels * kernel size * input channels * filters) and Dense (2 * in * out);
    the backward pass computes a gradient for the weights and one for the inputs, each as large as the
    forward product. Element-wise layers (BN, ReLU, pooling, dropout) are memory-bound and not counted.
    """
    import keras

    forward = 0.0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            _, height, width, filters = layer.output.shape
            kernel_height, kernel_width = layer.kernel_size
            in_channels = layer.input.shape[-1]
            forward += 2.0 * height * width * filters * kernel_height * kernel_width * in_channels
        elif isinstance(layer, keras.layers.Dense):
            forward += 2.0 * layer.input.shape[-1] * layer.units
    return 3.0 * forward


# ----------------------------------------------------------------------------------------------------
# Worker side: one process per path, answering "run" with one measurement and "exit" with its peak RSS.


def _peak_rss_megabytes() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def _step_clock(warmup_steps: int, timed_steps: int | None):
    """A Keras callback timing steps after warm-up, the validation pass and the first epoch."""
    import keras

    class StepClock(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.start_time = self.start_step = None
            self.last_time = self.last_step = None
            self.validation_seconds = None
            self.epoch_seconds = None

        def on_epoch_begin(self, epoch, logs=None):
            self._epoch_start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            now, steps_done = time.perf_counter(), batch + 1  # Keras passes the last step's index
            if self.start_time is None and steps_done >= warmup_steps:
                self.start_time, self.start_step = now, steps_done
            self.last_time, self.last_step = now, steps_done
            if timed_steps is not None and self.start_step is not None and steps_done - self.start_step >= timed_steps:
                self.model.stop_training = True

        def on_test_begin(self, logs=None):
            self._validation_start = time.perf_counter()

        def on_test_end(self, logs=None):
            if self.validation_seconds is None:
                self.validation_seconds = time.perf_counter() - self._validation_start

        def on_epoch_end(self, epoch, logs=None):
            self.epoch_seconds = time.perf_counter() - self._epoch_start
            self.model.stop_training = True  # one epoch per measurement

        def result(self) -> dict[str, float]:
            steps = self.last_step - self.start_step
            if steps <= 0:
                raise RuntimeError(
                    f"no steps were timed (warm-up {warmup_steps}, last step {self.last_step}); "
                    "lower --warmup or raise the number of training images."
                )
            return {
                "timed_steps": steps,
                "timed_seconds": self.last_time - self.start_time,
                "validation_seconds": self.validation_seconds or 0.0,
                "epoch_seconds": self.epoch_seconds,
            }

    return StepClock()


class _SeedRunner:
    """The seed's training code, as its text writes it (only the data source is the project's)."""

    batch_size = 32

    def __init__(self, data, speed_path: SpeedPath):
        import keras

        from mnist_ablation.augment import AugmentationParams, image_data_generator

        self.images, self.test_images = data.x_train, data.x_test
        self.labels = keras.utils.to_categorical(data.y_train)
        self.test_labels = keras.utils.to_categorical(data.y_test)
        self.datagen = image_data_generator(AugmentationParams())
        self.datagen.fit(self.images)
        self.epoch_images = len(self.labels)

    lr_scheduler = staticmethod(seed_lr_scheduler)

    def build_model(self):
        from mnist_ablation.model import seed_sequential_model

        return seed_sequential_model()

    def run(self, clock) -> None:
        import keras

        keras.backend.clear_session()
        model = self.build_model()
        model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
        model.fit(
            self.datagen.flow(self.images, self.labels, batch_size=self.batch_size),
            epochs=15,
            validation_data=(self.test_images, self.test_labels),
            callbacks=[keras.callbacks.LearningRateScheduler(self.lr_scheduler), clock],
            verbose=0,
        )


class _TrainerRunner:
    """The project's own trainer, ``mnist_ablation.train.train``, on the seed's recipe plus overrides."""

    def __init__(self, data, speed_path: SpeedPath):
        from mnist_ablation.config import BASELINE
        from mnist_ablation.data import build_split

        self.data = data
        self.config = BASELINE.replace(**speed_path.overrides)
        self.batch_size = self.config.batch_size
        from mnist_ablation.train import row_numbers

        split = build_split(row_numbers(data), self.config.validation, self.config.validation_size,
                            self.config.split_seed, self.config.train_subset)  # counts rows, copies no images
        self.epoch_images = len(split.y_train)

    def build_model(self):
        from mnist_ablation.model import build_model

        return build_model(self.config)

    def run(self, clock) -> None:
        import keras

        from mnist_ablation.train import train

        keras.backend.clear_session()
        train(self.config, self.data, callbacks=[clock], verbose=0)


RUNNERS = {"seed": _SeedRunner, "trainer": _TrainerRunner}


def _emit(payload: dict[str, Any]) -> None:
    sys.stdout.write(RESULT_PREFIX + json.dumps(payload) + "\n")
    sys.stdout.flush()


def run_worker(path_name: str, timed_steps: int | None, warmup_steps: int) -> None:
    """Serve measurements for one path over stdin/stdout until told to exit."""
    from mnist_ablation.data import load_mnist

    if path_name == "matmul":
        _matmul_worker()
        return
    speed_path = PATHS[path_name]
    runner = RUNNERS[speed_path.runner](load_mnist(), speed_path)
    model = runner.build_model()
    _emit({
        "ready": True,
        "parameters": int(model.count_params()),
        "training_flops_per_image": training_flops_per_image(model),
        "batch_size": runner.batch_size,
        "epoch_images": runner.epoch_images,
    })
    del model
    for command in sys.stdin:
        if command.strip() == "exit":
            break
        clock = _step_clock(warmup_steps, timed_steps)
        runner.run(clock)
        _emit({**clock.result(), "peak_rss_megabytes": _peak_rss_megabytes()})
    _emit({"peak_rss_megabytes": _peak_rss_megabytes()})


def _matmul_worker() -> None:
    """Best fp32 rate of a 4096x4096 matmul, on TensorFlow's default pools (every core)."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(os.cpu_count() or 0)
    a = tf.random.normal((MATMUL_SIZE, MATMUL_SIZE), seed=1)
    b = tf.random.normal((MATMUL_SIZE, MATMUL_SIZE), seed=2)
    tf.linalg.matmul(a, b).numpy()  # warm-up: first call allocates and picks kernels
    _emit({"ready": True})
    for command in sys.stdin:
        if command.strip() == "exit":
            break
        rates = []
        for _ in range(4):
            start = time.perf_counter()
            tf.linalg.matmul(a, b).numpy()
            rates.append(2.0 * MATMUL_SIZE**3 / (time.perf_counter() - start))
        _emit({"flops_per_second": max(rates)})
    _emit({"peak_rss_megabytes": _peak_rss_megabytes()})


# ----------------------------------------------------------------------------------------------------
# Parent side: start the workers, drive them in rotating rounds, summarise.


class Worker:
    """A worker subprocess for one path, spoken to line by line."""

    def __init__(self, name: str, timed_steps: int | None, warmup_steps: int):
        self.name = name
        command = [sys.executable, "-m", "benchmarks.speed", "--worker", name, "--warmup", str(warmup_steps)]
        if timed_steps is not None:
            command += ["--steps", str(timed_steps)]
        environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
        if name in PATHS:
            environment.update(PATHS[name].environment)
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - the worker's stderr, read when it fails
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
            env=environment, cwd=Path(__file__).resolve().parent.parent,
        )

    def read(self) -> dict[str, Any]:
        for line in self.process.stdout:
            if line.startswith(RESULT_PREFIX):
                return json.loads(line[len(RESULT_PREFIX):])
        self.log.seek(0)
        tail = self.log.read()[-3000:]
        raise RuntimeError(f"benchmark worker {self.name!r} exited (code {self.process.wait()}):\n{tail}")

    def send(self, command: str) -> None:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def run_benchmark(mode: str, path_names: list[str], rounds: int, timed_steps: int | None,
                  warmup_steps: int, log=print) -> dict[str, Any]:
    """Measure ``path_names`` in ``rounds`` rotating rounds; return the JSON-able summary."""
    unknown = [name for name in path_names if name not in PATHS]
    if unknown:
        raise ValueError(f"unknown speed path(s) {unknown}; known paths: {', '.join(PATHS)}.")
    if "seed" not in path_names:
        raise ValueError("the 'seed' path is the reference for the ratios; include it in --paths.")
    machine = machine_record()
    workers = {name: Worker(name, timed_steps, warmup_steps) for name in ["matmul", *path_names]}
    try:
        info = {name: worker.read() for name, worker in workers.items()}
        measurements: dict[str, list[dict[str, Any]]] = {name: [] for name in workers}
        for round_index in range(rounds):
            order = path_names[round_index % len(path_names):] + path_names[:round_index % len(path_names)]
            for name in ["matmul", *order]:
                workers[name].send("run")
                measurements[name].append(workers[name].read())
                if name != "matmul":
                    m = measurements[name][-1]
                    log(f"round {round_index + 1}/{rounds} {name:>15s}: "
                        f"{m['timed_steps'] * info[name]['batch_size'] / m['timed_seconds']:7.0f} images/s")
        for worker in workers.values():
            worker.send("exit")
            info[worker.name].update(worker.read())
    finally:
        for worker in workers.values():
            if worker.process.poll() is None:
                worker.process.kill()
            worker.process.wait()
    return _summarise(mode, path_names, rounds, timed_steps, warmup_steps, info, measurements,
                      finish_machine_record(machine))


def _summarise(mode, path_names, rounds, timed_steps, warmup_steps, info, measurements,
               machine: dict[str, Any]) -> dict[str, Any]:
    peak_flops = max(m["flops_per_second"] for m in measurements["matmul"])
    per_round_rate = {
        name: [m["timed_steps"] * info[name]["batch_size"] / m["timed_seconds"] for m in measurements[name]]
        for name in path_names
    }
    rows = []
    for name in path_names:
        rates = per_round_rate[name]
        epoch_images = info[name]["epoch_images"]
        if mode == "full":
            epoch_seconds = [m["epoch_seconds"] for m in measurements[name]]
        else:
            epoch_seconds = [epoch_images / rate + m["validation_seconds"]
                             for rate, m in zip(rates, measurements[name])]
        ratios = [rate / seed for rate, seed in zip(rates, per_round_rate["seed"])]
        flops = info[name]["training_flops_per_image"]
        rows.append({
            "path": name,
            "description": PATHS[name].description,
            "overrides": PATHS[name].overrides,
            "images_per_second": _spread(rates),
            "milliseconds_per_step": _spread([1000 * info[name]["batch_size"] / rate for rate in rates]),
            "seconds_per_epoch": _spread(epoch_seconds),
            "epoch_images": epoch_images,
            "validation_seconds": _spread([m["validation_seconds"] for m in measurements[name]]),
            "ratio_to_seed": _spread(ratios),
            "fraction_of_matmul_peak": statistics.median(rates) * flops / peak_flops,
            # After the first measurement: import, data and one training run. Later rounds re-train in the
            # same process and only add the allocator's growth, which a real run does not have.
            "peak_rss_megabytes": measurements[name][0]["peak_rss_megabytes"],
            "peak_rss_megabytes_all_rounds": info[name]["peak_rss_megabytes"],
            "parameters": info[name]["parameters"],
            "training_flops_per_image": flops,
            "rounds": measurements[name],
        })
    return {
        "mode": mode,
        "rounds": rounds,
        "timed_steps": timed_steps,
        "warmup_steps": warmup_steps,
        "matmul_peak_gflops": peak_flops / 1e9,
        "matmul_gflops_per_round": [m["flops_per_second"] / 1e9 for m in measurements["matmul"]],
        "machine": machine,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "paths": rows,
    }


def format_table(summary: dict[str, Any]) -> str:
    """The summary as a fixed-width table (median [min-max] over rounds)."""
    header = (f"{'path':<15} {'images/s':>20} {'ms/step':>8} {'s/epoch':>8} {'x seed':>16} "
              f"{'% peak':>7} {'peak RSS MB':>11}")
    lines = [header, "-" * len(header)]
    for row in summary["paths"]:
        rate, ratio = row["images_per_second"], row["ratio_to_seed"]
        lines.append(
            f"{row['path']:<15} {rate['median']:>7.0f} [{rate['min']:>5.0f}-{rate['max']:>5.0f}] "
            f"{row['milliseconds_per_step']['median']:>8.1f} {row['seconds_per_epoch']['median']:>8.1f} "
            f"{ratio['median']:>5.2f} [{ratio['min']:.2f}-{ratio['max']:.2f}] "
            f"{100 * row['fraction_of_matmul_peak']:>6.1f}% {row['peak_rss_megabytes']:>11.0f}"
        )
    machine = summary["machine"]
    lines.append(
        f"mode {summary['mode']}, {summary['rounds']} rounds; fp32 matmul peak "
        f"{summary['matmul_peak_gflops']:.0f} GFLOP/s ({MATMUL_SIZE}x{MATMUL_SIZE}); training "
        f"{summary['paths'][0]['training_flops_per_image'] / 1e6:.1f} MFLOP/image; {machine_text(machine)}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=tuple(MODES), default="short",
                        help="short: fixed steps per measurement (about two minutes); full: whole epochs")
    parser.add_argument("--paths", default=",".join(DEFAULT_PATHS),
                        help=f"comma-separated paths to compare (known: {', '.join(PATHS)})")
    parser.add_argument("--rounds", type=int, help="rounds of measurements (default: 3)")
    parser.add_argument("--steps", type=int, help="timed steps per measurement in short mode (default: 200)")
    parser.add_argument("--warmup", type=int, help="steps excluded at the start of each fit (default: 20)")
    parser.add_argument("--output", type=Path, default=RESULTS_PATH, help=f"JSON file (default: {RESULTS_PATH})")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    default_steps, default_rounds, default_warmup = MODES[args.mode]
    warmup = args.warmup if args.warmup is not None else default_warmup
    if args.worker:
        run_worker(args.worker, args.steps, warmup)
        return 0
    steps = (args.steps or default_steps) if args.mode == "short" else None
    rounds = args.rounds or default_rounds
    if rounds < 1 or (steps is not None and steps < 1) or warmup < 1:
        parser.error(f"--rounds ({rounds}), --steps ({steps}) and --warmup ({warmup}) must be >= 1.")
    paths = [name.strip() for name in args.paths.split(",") if name.strip()]
    summary = run_benchmark(args.mode, paths, rounds, steps, warmup,
                            log=lambda text: print(text, file=sys.stderr, flush=True))
    print(format_table(summary))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(summary, indent=2))
    print(f"wrote {args.output}")
    return 0


# -- its section of docs/benchmarks.md (benchmarks/common.py) ----------------------------------------------------


def render_report(data: dict, out: Rendered) -> None:
    rows = []
    for path in data.get("paths", []):
        rows.append([f"`{path['path']}`", spread(path.get("images_per_second"), 0),
                     spread(path.get("milliseconds_per_step"), 1), spread(path.get("seconds_per_epoch"), 1),
                     spread(path.get("ratio_to_seed"), 2), percent(path.get("fraction_of_matmul_peak"), 1),
                     number(path.get("peak_rss_megabytes"), 0)])
    out.tables.append(section_table(["path", "images/s", "ms/step", "s/epoch", "× seed (images/s, per round)",
                             "% of matmul peak", "peak RSS (MB)"], rows))
    setup = [f"{data['mode']} mode" if data.get("mode") else None,
             f"{data['timed_steps']} timed steps" if data.get("timed_steps") else None,
             f"after {data['warmup_steps']} warm-up steps" if data.get("warmup_steps") else None,
             f"{data['rounds']} rounds" if data.get("rounds") else None]
    text = ", ".join(part for part in setup if part)
    out.lines.append((text + "; " if text else "") + "medians over rounds, [min-max] where the file has them.")
    flops = next((p["training_flops_per_image"] for p in data.get("paths", []) if p.get("training_flops_per_image")),
                 None)
    if data.get("matmul_peak_gflops"):
        out.lines.append(f"fp32 matmul peak (4096x4096 `tf.matmul`): {data['matmul_peak_gflops']:.0f} GFLOP/s"
                         + (f"; training counts {flops / 1e6:.2f} MFLOP per image." if flops else "."))
    out.lines += [f"`{p['path']}`: {p['description']}" for p in data.get("paths", []) if p.get("description")]


def report_command(data: dict) -> str:
    """The command of a result that did not record it, from its settings."""
    flags = [f"--mode {data['mode']}"] if data.get("mode") else []
    if data.get("mode") == "short" and data.get("timed_steps") not in (None, 200):
        flags.append(f"--steps {data['timed_steps']}")
    if data.get("rounds") not in (None, 3):
        flags.append(f"--rounds {data['rounds']}")
    return " ".join(["python -m benchmarks.speed", *flags])


REPORT = Benchmark(
    key="speed", title="Training speed", command="python -m benchmarks.speed", order=10,
    about=("The seed's pipeline as its text writes it (`Sequential`, "
           "`ImageDataGenerator(...).flow(batch_size=32)`, `model.fit` with `LearningRateScheduler`, validation "
           "on the 10,000 test images) against the project's trainer (`mnist_ablation.train.train` at "
           "`BASELINE`) and the trainer with `steps_per_execution=1`, on one machine. Each path runs in a "
           "persistent worker process of its own (so its peak RSS is its own); the parent drives them one at a "
           "time in rounds, rotating the order, and the ratio to the seed is taken within each round. Short mode "
           "times 200 steps of batch 32 after 20 warm-up steps; `--mode full` times whole epochs. \"% of matmul "
           "peak\" divides the training FLOPs by the best 4096x4096 fp32 `tf.matmul` rate of the same run; "
           "s/epoch in short mode is the epoch's images at the measured rate plus the measured validation pass "
           "(10,000 test images for the seed, the 5,000-image split for the trainer)."),
    render=render_report, reconstruct=report_command)


if __name__ == "__main__":
    sys.exit(main())
