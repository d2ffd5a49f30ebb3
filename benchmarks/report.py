"""``python -m benchmarks.report``: docs/benchmarks.md, generated from the benchmarks' JSON results.

    python -m benchmarks.report            # rewrite docs/benchmarks.md from benchmarks/results/*.json
    python -m benchmarks.report --check    # exit 1 if docs/benchmarks.md is not what the files give

Every benchmark writes ``benchmarks/results/<benchmark>[-<anything>].json``. This module reads them all and
writes one section per benchmark (speed, study throughput, layer profile, pruning, explorer latency, accuracy,
parity), one subsection per file: its table, the machine it ran on, the date, the command, and where a file
was transcribed from an earlier page rather than written by a run, its ``source``. A file may also carry
``notes`` (findings that belong to that measurement) and, for figures no benchmark script writes, a generic
``table`` (``columns`` and ``rows``) with the ``section`` it belongs to.

The page is data -> Markdown through one Jinja2 template (autoescaped); nothing in it is written by hand, so
``tests/test_docs.py`` regenerates it in memory and compares.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jinja2 import Environment
from markupsafe import Markup

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
OUTPUT_PATH = REPO_ROOT / "docs" / "benchmarks.md"
GENERATOR = "python -m benchmarks.report"
DASH = "—"


@dataclass
class Result:
    """One JSON file of ``benchmarks/results``."""

    name: str  # file name
    data: dict[str, Any]
    section: str  # key of SECTIONS


@dataclass
class Rendered:
    """What the template shows for one result file."""

    heading: str
    file: str
    date: str
    machine: str
    command: str
    command_note: str
    source: str | None
    lines: list[str] = field(default_factory=list)
    tables: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def command_line(self) -> str:
        if not self.command:
            return "not recorded in the file"
        return f"`{self.command}`" + (f" ({self.command_note})" if self.command_note else "")


# -- formatting ------------------------------------------------------------------------------------------------


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def number(value: Any, digits: int = 1, thousands: bool = False) -> str:
    """``value`` rounded to ``digits`` decimals ('—' when missing)."""
    if _missing(value):
        return DASH
    if isinstance(value, str):
        return value
    return f"{value:,.{digits}f}" if thousands else f"{value:.{digits}f}"


def spread(value: Any, digits: int = 1, thousands: bool = False) -> str:
    """A benchmark's ``{"median", "min", "max"}`` as 'median [min-max]' (the median alone when that is all)."""
    if isinstance(value, dict):
        text = number(value.get("median"), digits, thousands)
        if not _missing(value.get("min")) and not _missing(value.get("max")):
            text += f" [{number(value['min'], digits, thousands)}-{number(value['max'], digits, thousands)}]"
        return text
    return number(value, digits, thousands)


def percent(fraction: Any, digits: int = 2) -> str:
    return DASH if _missing(fraction) else f"{100 * fraction:.{digits}f}"


def mean_std_percent(stats: dict | None, digits: int = 2) -> str:
    """``{"mean", "std"}`` of a fraction as 'mean ± std' in percent ('mean' alone without a std)."""
    if not stats or _missing(stats.get("mean")):
        return DASH
    text = percent(stats["mean"], digits)
    return text if _missing(stats.get("std")) else f"{text} ± {percent(stats['std'], digits)}"


def points(value: Any, signed: bool = False, digits: int = 3) -> str:
    if _missing(value):
        return DASH
    return f"{100 * value:+.{digits}f}" if signed else f"{100 * value:.{digits}f}"


def p_value(value: Any) -> str:
    if _missing(value):
        return DASH
    return "< 0.001" if value < 0.001 else f"{value:.3g}"


_ABSOLUTE_PATH = re.compile(r"^(?P<scheme>[a-z+]+:///)?/(?:[^/\s]+/)*(?P<last>[^/\s]*)$")


def portable(command: str) -> str:
    """``command`` with absolute paths cut to their last part ('…/mlflow.db'): they name another machine's disk."""
    def shorten(token: str) -> str:
        match = _ABSOLUTE_PATH.match(token)
        if not match:
            return token
        return f"{match['scheme'] or ''}…/{match['last']}"

    return " ".join(shorten(token) for token in command.split(" "))


def machine_text(machine: Any) -> str:
    """The machine a result ran on, in words, from a benchmark's ``machine`` (or ``environment``) record."""
    if machine is None:
        return "not recorded in the file"
    if isinstance(machine, str):
        return machine
    parts = []
    cpu = machine.get("cpu") or machine.get("processor")
    count = machine.get("cpu_count") or machine.get("cpus")
    if cpu or count:
        parts.append(", ".join(str(p) for p in (cpu, f"{count} CPUs" if count else None) if p))
    if machine.get("gpus"):
        parts.append("; ".join(machine["gpus"]))
    if machine.get("keras_backend"):
        parts.append(f"Keras backend {machine['keras_backend']}")
    packages = dict(machine.get("packages") or {})
    if machine.get("tensorflow"):
        packages.setdefault("tensorflow", machine["tensorflow"])
    if packages:
        parts.append(", ".join(f"{name} {version}" for name, version in packages.items() if version))
    if machine.get("python"):
        parts.append(f"Python {machine['python']}")
    if machine.get("platform"):
        parts.append(machine["platform"])
    loads = [(key, machine[key]) for key in ("load_average", "load_average_1_5_15", "load_average_before",
                                             "load_average_at_start", "load_average_after", "load_average_at_end")
             if machine.get(key) is not None]
    if loads:
        parts.append("load average " + " → ".join(_load(value) for _, value in loads))
    return "; ".join(parts) or "not recorded in the file"


def _load(value: Any) -> str:
    values = value if isinstance(value, (list, tuple)) else [value]
    return number(values[0], 1) if values else DASH


def date_text(data: dict) -> str:
    for key in ("date", "time", "measured_at", "timestamp"):
        if data.get(key):
            return str(data[key])[:10]
    return ""


# -- one renderer per benchmark's JSON format ---------------------------------------------------------------


def table(columns: list[str], rows: list[list[Any]]) -> dict:
    return {"columns": columns, "rows": [[DASH if _missing(cell) else str(cell) for cell in row] for row in rows]}


def render_speed(data: dict, out: Rendered) -> None:
    rows = []
    for path in data.get("paths", []):
        rows.append([f"`{path['path']}`", spread(path.get("images_per_second"), 0),
                     spread(path.get("milliseconds_per_step"), 1), spread(path.get("seconds_per_epoch"), 1),
                     spread(path.get("ratio_to_seed"), 2), percent(path.get("fraction_of_matmul_peak"), 1),
                     number(path.get("peak_rss_megabytes"), 0)])
    out.tables.append(table(["path", "images/s", "ms/step", "s/epoch", "× seed (images/s, per round)",
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


def render_study_throughput(data: dict, out: Rendered) -> None:
    cells = data.get("cells")
    rows = [[row["mode"], number(row.get("seconds"), 1), number(row.get("runs_per_hour"), 0),
             number(row.get("ratio_to_seed_loop"), 2), number(row.get("peak_rss_mb"), 0)]
            for row in data.get("rows", [])]
    out.tables.append(table(["mode", f"seconds for {cells} runs", "runs per hour", "× seed loop",
                             "peak RSS of the largest process (MB)"], rows))
    out.lines.append(f"{cells} runs (the baseline arm, seeds 0-{cells - 1}) of {data.get('train_subset', 0):,} "
                     f"training images × {data.get('epochs')} epoch(s) each, the modes one after the other.")


def render_layer_profile(data: dict, out: Rendered) -> None:
    step = data.get("train_step_milliseconds")
    peak = data.get("matmul_peak_gflops")

    def share(milliseconds):
        return f"{100 * milliseconds / step:.0f}%" if step and not _missing(milliseconds) else DASH

    def of_peak(rate):
        return f"{100 * rate / peak:.0f}%" if peak and not _missing(rate) else DASH

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
    out.tables.append(table(["layer", "kind", "output", "ms", "share of step", "GFLOP/s", "% of peak"], rows))
    out.lines.append(f"Batch {data.get('batch')}"
                     + (f", median of {data['repeats']} repeats" if data.get("repeats") else "")
                     + (f"; fp32 matmul peak {peak:.0f} GFLOP/s." if peak else "."))


def render_pruning(data: dict, out: Rendered) -> None:
    settings = data.get("settings", {})
    rows = [[row["pruner"], f"{row.get('pruned', 0)} of {row.get('trials')}",
             f"{row.get('epochs_trained')} / {row.get('epochs_budget')}",
             f"{number(row.get('best_val_accuracy'), 4)} ({row.get('best_trial')})", number(row.get("seconds"), 0)]
            for row in data.get("results", [])]
    out.tables.append(table(["pruner", "trials pruned", "epochs trained", "best validation accuracy (trial)",
                             "wall seconds"], rows))
    out.lines.append(f"{settings.get('n_trials')} trials × {settings.get('epochs')} epochs on "
                     f"{settings.get('train_subset', 0):,} training images, {settings.get('sampler', 'tpe').upper()} "
                     f"seed {settings.get('sampler_seed')}; pruner `{settings.get('pruner_definition')}`. "
                     f"Pruning saved {percent(data.get('epochs_saved_fraction'), 0)}% of the epochs.")


def render_serve_latency(data: dict, out: Rendered) -> None:
    rows = [[name, row.get("requests"), number(row.get("p50_ms"), 1), number(row.get("p90_ms"), 1),
             number(row.get("p99_ms"), 1), number(row.get("server_p50_ms"), 1)]
            for name, row in data.get("results", {}).items()]
    out.tables.append(table(["request", "requests", "p50 (ms)", "p90 (ms)", "p99 (ms)", "server-side p50 (ms)"],
                            rows))
    models = data.get("models")
    if isinstance(models, list):
        models = ", ".join(str(m.get("label", m.get("run_id"))) for m in models)
    out.lines.append(f"`{data.get('endpoint', 'POST /api/predict')}`, sequential requests after "
                     f"{data.get('warmup')} warm-up requests, one keep-alive httpx client on 127.0.0.1"
                     + (f"; served: {models}." if models else "."))


def render_accuracy(data: dict, out: Rendered) -> None:
    goals = data.get("goals", {})
    arms = data.get("arms", {})
    best = data.get("best_arm")
    seed_arm = data.get("seed_recipe_arm", "baseline")

    def goal(key: str, value: Any) -> str:
        if key not in goals or _missing(value):
            return ""
        return f"≥ {percent(goals[key])}: {'met' if value >= goals[key] else 'not met'}"

    rows = []
    for arm, figures in arms.items():
        label = f"`{arm}`" + (" (the seed's recipe)" if arm == seed_arm else " (best on validation)" if arm == best
                              else "")
        mean = figures.get("test_accuracy", {}).get("mean")
        rows.append([label, figures.get("test_accuracy", {}).get("n"), mean_std_percent(figures.get("test_accuracy")),
                     percent(figures.get("val_accuracy", {}).get("mean")),
                     number(figures.get("train_seconds", {}).get("mean"), 0),
                     goal("seed_recipe", mean) if arm == seed_arm else goal("best_arm", mean) if arm == best else ""])
    per_seed = data.get("ensemble_per_seed")
    if per_seed:
        rows.append([f"`{per_seed['name']}`", per_seed["test_accuracy"].get("n"),
                     mean_std_percent(per_seed["test_accuracy"]), DASH, "",
                     goal("ensemble", per_seed["test_accuracy"].get("mean"))])
    of_best = data.get("ensemble_of_best_arm")
    if of_best:
        rows.append([f"`{of_best['name']}` (all seeds of the best arm: one ensemble, not a mean)", 1,
                     percent(of_best.get("test_accuracy")), DASH, "", ""])
    out.tables.append(table(["arm", "n", "test accuracy % (mean ± std)", "val accuracy %", "s / run", "goal"], rows))
    out.lines.append(f"Study `{data.get('study')}`, {data.get('mode')} mode, {data.get('seeds')} seeds per arm; the "
                     f"best arm is chosen by {data.get('best_arm_chosen_by', 'mean final val_accuracy')}.")
    if per_seed:
        members = {tuple(r.get("member_arms", [])) for r in per_seed.get("repeats", []) if r.get("member_arms")}
        chosen = "; ".join(" + ".join(m) for m in sorted(members))
        out.lines.append(f"`{per_seed['name']}`: {per_seed.get('chosen_by', '')}"
                         + (f" (members: {chosen})." if chosen else "."))


def render_parity(data: dict, out: Rendered) -> None:
    from benchmarks.parity import verdict  # the benchmark's own wording of the answer

    rows = [[f"`{arm}`", f.get("n_seeds"), mean_std_percent({"mean": f.get("test_accuracy_mean"),
                                                             "std": f.get("test_accuracy_std")}, 3),
             percent(f.get("val_accuracy_mean"), 3), number(f.get("train_seconds_mean"), 1),
             number(f.get("run_seconds_mean"), 1)]
            for arm, f in data.get("arms", {}).items()]
    out.tables.append(table(["arm", "seeds", "test accuracy % (mean ± std)", "val accuracy %",
                             "s / cell (training)", "s / cell (whole run)"], rows))
    protocol = data.get("protocol", {})
    overrides = ", ".join(f"`--set {o}`" for o in protocol.get("overrides", []))
    out.lines.append(f"{protocol.get('seeds_per_arm')} seeds per arm, {protocol.get('epochs')} epoch(s), training "
                     f"images: {protocol.get('train_images')}" + (f", {overrides}" if overrides else "")
                     + f". This mode shows {protocol.get('what_it_shows', DASH)}.")
    c = data.get("comparison")
    if not c:
        out.lines.append("No comparison: the file has no paired `seed_script` and `baseline` cells.")
        return
    level = f"{round(100 * c.get('confidence', 0.95))}%"
    out.tables.append(table([f"`{c['arm']}` minus `{c['baseline']}`", "value"], [
        ["paired seeds × test images", f"{c.get('n_pairs')} × {c.get('n_images', 0):,}"],
        ["difference (points)", points(c.get("delta"), signed=True)],
        [f"{level} interval, seeds and test images random (points)",
         f"[{points(c.get('delta_ci_low'), True)}, {points(c.get('delta_ci_high'), True)}]"],
        ["p (difference)", p_value(c.get("p_value"))],
        [f"TOST p (±{100 * c.get('equivalence_margin', 0.001):g} points)", p_value(c.get("equivalence_p_value"))],
        ["standard error = seed part ⊕ test-image part (points)",
         (f"{points(c.get('standard_error'))} = {points(c.get('standard_error_seed_part'))} ⊕ "
          f"{points(c.get('standard_error_image_part'))}")],
        ["interval width floor from the test set (points)", points(c.get("ci_width_floor"))],
        [f"{level} interval, this test set only (points)",
         (f"[{points(c.get('delta_ci_low_this_test_set'), True)}, "
          f"{points(c.get('delta_ci_high_this_test_set'), True)}]")],
        ["verdict", verdict(c)],
    ]))
    protocols = data.get("protocols")
    if protocols:
        means = protocols.get("test_accuracy_mean", {})
        stds = protocols.get("test_accuracy_std", {})
        out.lines.append(f"The trainer under two protocols (`--compare-protocols`): {protocols['arm']} minus "
                         f"{protocols['baseline']}.")
        out.tables.append(table(["the seed's protocol minus the default split", "value"], [
            ["test accuracy % (mean ± std), default split",
             mean_std_percent({"mean": means.get("validation_split"), "std": stds.get("validation_split")}, 3)],
            ["test accuracy % (mean ± std), the seed's protocol",
             mean_std_percent({"mean": means.get("validation_test"), "std": stds.get("validation_test")}, 3)],
            ["paired seeds", protocols.get("n_pairs")],
            ["difference (points)", points(protocols.get("delta"), signed=True)],
            [f"{level} interval, seeds and test images random (points)",
             f"[{points(protocols.get('delta_ci_low'), True)}, {points(protocols.get('delta_ci_high'), True)}]"],
            ["p (difference)", p_value(protocols.get("p_value"))],
            [f"{level} interval, this test set only (points)",
             (f"[{points(protocols.get('delta_ci_low_this_test_set'), True)}, "
              f"{points(protocols.get('delta_ci_high_this_test_set'), True)}]")],
            ["command", f"`{protocols.get('command', DASH)}`"],
        ]))


def render_table(data: dict, out: Rendered) -> None:
    """A generic ``{"columns", "rows"}`` table: figures that no benchmark script writes (transcribed)."""
    out.tables.append(table(data["table"]["columns"], data["table"]["rows"]))


# -- sections ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Section:
    key: str
    title: str
    command: str
    about: str
    render: Callable[[dict, Rendered], None]
    reconstruct: Callable[[dict], str] | None = None


def _speed_command(data: dict) -> str:
    flags = [f"--mode {data['mode']}"] if data.get("mode") else []
    if data.get("mode") == "short" and data.get("timed_steps") not in (None, 200):
        flags.append(f"--steps {data['timed_steps']}")
    if data.get("rounds") not in (None, 3):
        flags.append(f"--rounds {data['rounds']}")
    return " ".join(["python -m benchmarks.speed", *flags])


def _throughput_command(data: dict) -> str:
    workers = max([int(m) for row in data.get("rows", []) for m in re.findall(r"--workers (\d+)", row["mode"])] or [2])
    return (f"python -m benchmarks.study_throughput --cells {data.get('cells')} --train-subset "
            f"{data.get('train_subset')} --epochs {data.get('epochs')} --workers {workers}")


def _pruning_command(data: dict) -> str:
    s = data.get("settings", {})
    return (f"python -m benchmarks.pruning --n-trials {s.get('n_trials')} --epochs {s.get('epochs')} --train-subset "
            f"{s.get('train_subset')} --sampler-seed {s.get('sampler_seed')} --pruner {s.get('pruner')}")


SECTIONS: dict[str, Section] = {s.key: s for s in (
    Section("speed", "Training speed", "python -m benchmarks.speed",
            "The seed's pipeline as its text writes it (`Sequential`, `ImageDataGenerator(...).flow(batch_size=32)`, "
            "`model.fit` with `LearningRateScheduler`, validation on the 10,000 test images) against the project's "
            "trainer (`mnist_ablation.train.train` at `BASELINE`) and the trainer with `steps_per_execution=1`, on "
            "one machine. Each path runs in a persistent worker process of its own (so its peak RSS is its own); "
            "the parent drives them one at a time in rounds, rotating the order, and the ratio to the seed is taken "
            "within each round. Short mode times 200 steps of batch 32 after 20 warm-up steps; `--mode full` times "
            "whole epochs. \"% of matmul peak\" divides the training FLOPs by the best 4096x4096 fp32 `tf.matmul` "
            "rate of the same run; s/epoch in short mode is the epoch's images at the measured rate plus the "
            "measured validation pass (10,000 test images for the seed, the 5,000-image split for the trainer).",
            render_speed, _speed_command),
    Section("study_throughput", "Study throughput", "python -m benchmarks.study_throughput",
            "Whole studies: the same cells (the baseline arm, several seeds) run as a sequential loop of the seed's "
            "script (`benchmarks/seed_script.py`, one process per run), as `experiments.ablate --workers 1` and as "
            "`experiments.ablate --workers 2`, one after the other on the same machine, with everything logged to "
            "MLflow in the ablate modes.",
            render_study_throughput, _throughput_command),
    Section("layer_profile", "Layer profile", "python -m benchmarks.layer_profile",
            "Where a training step of the seed's model spends its time: each layer timed alone, forward and "
            "backward, in one compiled `tf.function` on inputs of the shape it sees in the model, and the whole "
            "`train_on_batch` step (Adam included), median over repeats, against the fp32 matmul peak.",
            render_layer_profile,
            lambda d: f"python -m benchmarks.layer_profile --batch {d.get('batch')}"
                      + (f" --repeats {d['repeats']}" if d.get("repeats") else "")),
    Section("pruning", "Pruning", "python -m benchmarks.pruning",
            "The same tuning study twice, with the median pruner and without (trials train without MLflow). "
            "TPE's seeded start-up trials make both studies try the same configs, so the difference is where "
            "pruning stopped a trial; epochs trained are the measure, wall seconds depend on the machine's load.",
            render_pruning, _pruning_command),
    Section("serve_latency", "Explorer latency", "python -m benchmarks.serve_latency",
            "Latency of the model explorer's `POST /api/predict` over HTTP: sequential requests after a warm-up, "
            "one keep-alive client on 127.0.0.1, for a 28x28 image, the page's 112x112 drawing (MNIST "
            "preprocessing on the server) and the ensemble of all offered runs; server-side times come from the "
            "`Server-Timing` header. See [explorer.md](explorer.md).",
            render_serve_latency,
            lambda d: f"python -m benchmarks.serve_latency --requests {d.get('requests_per_scenario')} "
                      f"--warmup {d.get('warmup')}"),
    Section("accuracy", "Accuracy", "python -m benchmarks.accuracy",
            "The `architecture` study at full length (or a short check): the seed's recipe (test accuracy mean ± "
            "std over seeds), the best arm chosen on mean validation accuracy, `ensemble-top3` per seed and the "
            "ensemble of the chosen arm's seeds, against the goals (seed's recipe ≥ 99.55%, best arm ≥ 99.70%, "
            "ensemble ≥ 99.80%). Every choice is made on validation accuracy. See [ensembles.md](ensembles.md).",
            render_accuracy, None),
    Section("parity", "Parity", "python -m benchmarks.parity",
            "The `parity` study: the trainer's `baseline` against `seed_script`, the seed's own code as written, on "
            "the same split, epochs and seeds, compared with seeds and test images random and an equivalence test "
            "(TOST) at ±0.1 points. See [parity.md](parity.md) for what it does and does not show in each mode.",
            render_parity, None),
    Section("other", "Other measurements", "",
            "Figures that no benchmark script writes.", render_table, None),
)}
PREFIXES = sorted((key for key in SECTIONS if key != "other"), key=len, reverse=True)
NOT_YET_MEASURED = {
    "parity": "Not yet measured. `python -m benchmarks.parity --mode cpu` (all 55,000 training images × 3 epochs, "
              "8 seeds per arm: about an hour and a half on 2 cores) writes `benchmarks/results/parity-cpu.json`, "
              "and `--mode full` (15 epochs, 5 seeds per arm, a GPU machine) `parity-full.json`; then regenerate "
              "this page with `python -m benchmarks.report`.",
}


def section_of(name: str, data: dict) -> str:
    """Which section a result file belongs to: a generic table says so; else the benchmark's name or file name."""
    if "table" in data:
        section = data.get("section", "other")
        if section not in SECTIONS:
            raise ValueError(f"{name}: section {section!r} is not one of {', '.join(SECTIONS)}.")
        return section
    if data.get("benchmark") in SECTIONS:
        return data["benchmark"]
    stem = name[:-len(".json")]
    for key in PREFIXES:
        if stem == key or stem.startswith(key + "-"):
            return key
    raise ValueError(f"{name}: not a result of a known benchmark. Name it <benchmark>[-<anything>].json with "
                     f"<benchmark> one of {', '.join(PREFIXES)}, or give it a generic \"table\".")


def load_results(directory: Path = RESULTS_DIR) -> list[Result]:
    """Every ``*.json`` directly in ``directory`` (the benchmarks' stores and cells live in sub-folders)."""
    results = []
    for path in sorted(Path(directory).glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path.name} is not valid JSON ({error}); rerun its benchmark or fix the file.") from None
        if not isinstance(data, dict):
            # A bad file, reported like any other (main prints ValueErrors as one line).
            raise ValueError(f"{path.name}: expected a JSON object, found {type(data).__name__}.")  # noqa: TRY004
        results.append(Result(path.name, data, section_of(path.name, data)))
    return results


def render_result(result: Result) -> Rendered:
    section = SECTIONS[result.section]
    data = result.data
    commands = data.get("commands") if isinstance(data.get("commands"), dict) else {}
    command, command_note = data.get("command") or commands.get("benchmark"), ""
    if not command and section.reconstruct is not None:
        command, command_note = section.reconstruct(data), "rebuilt from the file's settings"
    rendered = Rendered(
        heading=data.get("title") or f"`{result.name}`", file=result.name,
        date=date_text(data) or "not recorded in the file",
        machine=machine_text(data.get("machine") or data.get("environment")
                             or ({"cpu_count": data["cpu_count"], "load_average": data.get("load_average")}
                                 if "cpu_count" in data else None)),
        command=portable(command) if command else "", command_note=command_note, source=data.get("source"),
        notes=list(data.get("notes", [])),
    )
    (render_table if "table" in data else section.render)(data, rendered)
    return rendered


def _sort_key(result: Result) -> tuple:
    # A benchmark's own results before generic tables (earlier or hand-made figures); newest first, undated last.
    def descending(text: str) -> str:
        return "".join(chr(0x10FFFF - ord(c)) for c in text)

    date = date_text(result.data)
    return ("table" in result.data, date == "", descending(date), descending(result.name))


TEMPLATE = """\
{%- macro table(t) -%}
| {% for column in t.columns %}{{ column | cell }} |{% if not loop.last %} {% endif %}{% endfor %}
|{% for column in t.columns %}---|{% endfor %}
{% for row in t.rows %}| {% for value in row %}{{ value | cell }} |{% if not loop.last %} {% endif %}{% endfor %}
{% endfor %}
{%- endmacro -%}
# Benchmarks

<!-- Generated by `{{ generator }}` from benchmarks/results/*.json. Do not edit by hand. -->

*This page is generated by `{{ generator }}` from the JSON files in `benchmarks/results/`; do not edit it by hand.
Rerun a benchmark (each writes its JSON there), then regenerate the page. `tests/test_docs.py` fails when the page
and the files disagree.*

Every result below names the machine it ran on, the date and the command, newest first. A result whose **Source**
says "transcribed" was copied from a table of the README at commit 7ab0224 (or of another page, as it says): the
JSON files those runs wrote stayed on machines the project no longer has, and the figures describe the code of
their day, not of today.

{% for section in sections %}- [{{ section.title | text }}](#{{ section.anchor }})
{% endfor %}
{% for section in sections %}
## {{ section.title | text }}

{{ section.about | text }}{% if section.command %} Command: `{{ section.command | text }}`.{% endif %}

{% if section.missing %}{{ section.missing | text }}

{% endif %}{% for result in section.results %}### {{ result.heading | text }}

{% if result.source %}**Source:** {{ result.source | text }}.

{% endif %}- Machine: {{ result.machine | text }}
- Date: {{ result.date | text }}
- Command: {{ result.command_line | text }}
- File: `benchmarks/results/{{ result.file | text }}`

{% for line in result.lines %}{{ line | text }}

{% endfor %}{% for t in result.tables %}{{ table(t) }}
{% endfor %}{% for note in result.notes %}{% if loop.first %}Notes:

{% endif %}- {{ note | text }}
{% if loop.last %}
{% endif %}{% endfor %}{% endfor %}{% endfor %}"""


def _markdown_text(value: Any) -> Markup:
    """Text for Markdown: HTML's special characters escaped, nothing else (quotes and apostrophes stay)."""
    text = str(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return Markup(text)


def _markdown_cell(value: Any) -> Markup:
    """A Markdown table cell: escaped as text, pipes escaped, on one line."""
    return Markup(str(_markdown_text(value)).replace("|", "\\|").replace("\n", " "))


def anchor(title: str) -> str:
    """The anchor GitHub gives a heading."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def render_page(results: list[Result]) -> str:
    """docs/benchmarks.md for ``results``."""
    environment = Environment(autoescape=True, keep_trailing_newline=True)
    environment.filters["text"] = _markdown_text
    environment.filters["cell"] = _markdown_cell
    sections = []
    for key, section in SECTIONS.items():
        mine = sorted((r for r in results if r.section == key), key=_sort_key)
        if key == "other" and not mine:
            continue
        measured = [r for r in mine if "table" not in r.data]
        missing = ""
        if not measured and key != "other":
            missing = NOT_YET_MEASURED.get(key, "No results yet: run the command above, then regenerate this page.")
        sections.append({"title": section.title, "anchor": anchor(section.title), "about": section.about,
                         "command": section.command, "results": [render_result(r) for r in mine],
                         "missing": missing})
    page = environment.from_string(TEMPLATE).render(generator=GENERATOR, sections=sections)
    return re.sub(r"\n{3,}", "\n\n", page).rstrip("\n") + "\n"


def generate(results_dir: Path = RESULTS_DIR) -> str:
    return render_page(load_results(results_dir))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=GENERATOR, description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="folder of the JSON results")
    parser.add_argument("--output", type=Path, default=OUTPUT_PATH, help="the page to write (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when the page is out of date")
    args = parser.parse_args(argv)
    try:
        results = load_results(args.results)
        page = render_page(results)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.exists() else ""
        if current != page:
            print(f"{args.output} is out of date; run: {GENERATOR}", file=sys.stderr)
            return 1
        print(f"{args.output} is up to date")
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(page, encoding="utf-8")
    print(f"wrote {args.output} from {len(results)} result file(s) in {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
