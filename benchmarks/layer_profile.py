"""Where a training step of the seed's model spends its time, layer by layer, against the matmul peak.

    python -m benchmarks.layer_profile              # batch 32 (the seed's), about a minute on 2 cores
    python -m benchmarks.layer_profile --batch 128

Each layer of the seed's model is timed alone: forward and backward (gradients for its input and its
weights, as training computes them) in one compiled ``tf.function``, on inputs of the shape it sees in the
model, in training mode, median over repeats. The whole step (the model's own ``train_on_batch``: forward,
backward, Adam update) is timed the same way, so the table shows which layers take the time, the GFLOP/s
each reaches, and what the per-layer sum leaves for the optimizer and framework overhead. FLOPs are counted
as in ``benchmarks.speed`` (forward product, and twice it backward); the peak is the best 4096x4096 fp32
``tf.matmul`` rate, measured in the same process. Results go to ``benchmarks/results/layer_profile.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from benchmarks.common import DASH, Benchmark, Rendered, finish_machine_record, is_missing, machine_record, number
from benchmarks.common import table as section_table

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "layer_profile.json"


def _median_seconds(function, repeats: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak_gflops(size: int = 4096, repeats: int = 5) -> float:
    import tensorflow as tf

    a = tf.random.normal((size, size))
    b = tf.random.normal((size, size))
    product = tf.function(lambda: tf.reduce_sum(tf.matmul(a, b)))
    seconds = min(_median_seconds(lambda: product().numpy(), 1, warmup=1) for _ in range(repeats))
    return 2 * size**3 / seconds / 1e9


def layer_flops(layer) -> float:
    """Training FLOPs of one layer per image (0 for element-wise layers)."""
    import keras

    if isinstance(layer, keras.layers.Conv2D):
        _, height, width, filters = layer.output.shape
        kernel_height, kernel_width = layer.kernel_size
        return 3 * 2.0 * height * width * filters * kernel_height * kernel_width * layer.input.shape[-1]
    if isinstance(layer, keras.layers.Dense):
        return 3 * 2.0 * layer.input.shape[-1] * layer.units
    return 0.0


def profile(batch: int, repeats: int) -> dict:
    import keras
    import numpy as np
    import tensorflow as tf

    from mnist_ablation.model import seed_sequential_model

    keras.utils.set_random_seed(0)
    model = seed_sequential_model()
    model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
    rows = []
    for layer in model.layers:
        inputs = tf.random.uniform((batch, *layer.input.shape[1:]))

        @tf.function
        def step(x=inputs, layer=layer):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=True)
                total = tf.reduce_sum(y)
            gradients = tape.gradient(total, [x, *layer.trainable_weights])
            return tf.add_n([tf.reduce_sum(g) for g in gradients if g is not None])

        seconds = _median_seconds(lambda: step().numpy(), repeats)
        flops = layer_flops(layer) * batch
        rows.append({"layer": layer.name, "kind": type(layer).__name__,
                     "input_shape": list(layer.input.shape[1:]), "output_shape": list(layer.output.shape[1:]),
                     "milliseconds": 1e3 * seconds, "gflop": flops / 1e9,
                     "gflops_per_second": flops / seconds / 1e9 if flops else None})
    images = np.random.default_rng(0).random((batch, 28, 28, 1), dtype=np.float32)
    labels = keras.utils.to_categorical(np.arange(batch) % 10, 10)
    whole = _median_seconds(lambda: model.train_on_batch(images, labels), repeats)
    total_flops = sum(layer_flops(layer) for layer in model.layers) * batch
    return {"batch": batch, "repeats": repeats, "layers": rows, "train_step_milliseconds": 1e3 * whole,
            "train_step_gflops_per_second": total_flops / whole / 1e9,
            "sum_of_layers_milliseconds": sum(row["milliseconds"] for row in rows)}


def table(result: dict, peak: float) -> str:
    lines = [f"{'layer':22s} {'kind':20s} {'output':>14s} {'ms':>7s} {'share':>6s} {'GFLOP':>7s} "
             f"{'GFLOP/s':>8s} {'% peak':>7s}"]
    step = result["train_step_milliseconds"]
    for row in result["layers"]:
        rate = row["gflops_per_second"]
        lines.append(f"{row['layer']:22s} {row['kind']:20s} {'x'.join(map(str, row['output_shape'])):>14s} "
                     f"{row['milliseconds']:7.2f} {row['milliseconds'] / step:6.0%} {row['gflop']:7.3f} "
                     f"{rate if rate else 0:8.1f} {(rate or 0) / peak:7.0%}")
    rest = step - result["sum_of_layers_milliseconds"]
    lines.append(f"{'sum of layers':22s} {'':20s} {'':>14s} {result['sum_of_layers_milliseconds']:7.2f} "
                 f"{result['sum_of_layers_milliseconds'] / step:6.0%}")
    lines.append(f"{'rest (Adam, loss, glue)':22s} {'':20s} {'':>14s} {rest:7.2f} {rest / step:6.0%}")
    lines.append(f"{'whole train step':22s} {'train_on_batch':20s} {'':>14s} {step:7.2f} {1:6.0%} "
                 f"{'':>7s} {result['train_step_gflops_per_second']:8.1f} "
                 f"{result['train_step_gflops_per_second'] / peak:7.0%}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.layer_profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32, help="batch size (default: the seed's 32)")
    parser.add_argument("--repeats", type=int, default=50, help="timed repeats per layer (median)")
    parser.add_argument("--output", type=Path, default=RESULTS_PATH)
    args = parser.parse_args(argv)
    machine = machine_record()
    peak = matmul_peak_gflops()
    result = profile(args.batch, args.repeats)
    result.update({"matmul_peak_gflops": peak, "machine": finish_machine_record(machine)})
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    print(table(result, peak))
    print(f"\nbatch {args.batch}; fp32 matmul peak {peak:.0f} GFLOP/s (4096x4096); {os.cpu_count()} cores; "
          f"wrote {args.output}")
    return 0


# -- its section of docs/benchmarks.md (benchmarks/common.py) ----------------------------------------------------


def render_report(data: dict, out: Rendered) -> None:
    step = data.get("train_step_milliseconds")
    peak = data.get("matmul_peak_gflops")

    def share(milliseconds):
        return f"{100 * milliseconds / step:.0f}%" if step and not is_missing(milliseconds) else DASH

    def of_peak(rate):
        return f"{100 * rate / peak:.0f}%" if peak and not is_missing(rate) else DASH

    rows = [[row["layer"], row.get("kind", ""), "x".join(str(d) for d in row.get("output_shape", [])),
             number(row.get("milliseconds"), 1), share(row.get("milliseconds")),
             number(row.get("gflops_per_second"), 0), of_peak(row.get("gflops_per_second"))]
            for row in data.get("layers", [])]
    layers_sum = data.get("sum_of_layers_milliseconds")
    if layers_sum is not None and step:
        rows.append(["sum of the layers", "", "", number(layers_sum, 1), share(layers_sum), DASH, DASH])
        rows.append(["rest (Adam, loss, glue)", "", "", number(step - layers_sum, 1), share(step - layers_sum),
                     DASH, DASH])
    rows.append(["whole train step", "`train_on_batch`, Adam included", "", number(step, 1), share(step),
                 number(data.get("train_step_gflops_per_second"), 0),
                 of_peak(data.get("train_step_gflops_per_second"))])
    out.tables.append(section_table(["layer", "kind", "output", "ms", "share of step", "GFLOP/s", "% of peak"], rows))
    out.lines.append(f"Batch {data.get('batch')}"
                     + (f", median of {data['repeats']} repeats" if data.get("repeats") else "")
                     + (f"; fp32 matmul peak {peak:.0f} GFLOP/s." if peak else "."))


REPORT = Benchmark(
    key="layer_profile", title="Layer profile", command="python -m benchmarks.layer_profile", order=30,
    about=("Where a training step of the seed's model spends its time: each layer timed alone, forward and "
           "backward, in one compiled `tf.function` on inputs of the shape it sees in the model, and the whole "
           "`train_on_batch` step (Adam included), median over repeats, against the fp32 matmul peak."),
    render=render_report,
    reconstruct=lambda d: (f"python -m benchmarks.layer_profile --batch {d.get('batch')}"
                           + (f" --repeats {d['repeats']}" if d.get("repeats") else "")))


if __name__ == "__main__":
    raise SystemExit(main())
