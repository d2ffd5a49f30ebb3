"""Parity benchmark: is the trainer's baseline the seed's pipeline? The ``parity`` study over repeated seeds.

    python -m benchmarks.parity --mode smoke          # a few hundred images x 1 epoch x 2 seeds: checks the script
    python -m benchmarks.parity --mode cpu            # 55,000 images x 3 epochs x 8 seeds per arm (~1 h, 2 cores)
    python -m benchmarks.parity --mode full --workers 8   # 15 epochs x 5 seeds per arm (a GPU machine)

It runs ``python -m experiments.ablate --study parity`` (resumable: finished cells are skipped; its own store under
benchmarks/results/parity/<mode>/), then compares the ``seed_script`` arm (the seed's code as written) with the
``baseline`` arm (the trainer at the seed's recipe) with ``stats.compare_to_baseline`` on the cells' per-image
correctness, seeds and test images both random, and an equivalence test (TOST) at +-0.1 points. It prints a table and
writes benchmarks/results/parity-<mode>.json with the machine, the commands, the protocol and the figures.

On a machine with a GPU and Keras on JAX but no MLflow, train the cells there and import them here:

    KERAS_BACKEND=jax python -m experiments.ablate --study parity --seeds 5 --offline cells --workers 8
    python -m benchmarks.parity --mode full --offline-cells cells
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from benchmarks.common import (
    DASH,
    Benchmark,
    Rendered,
    finish_machine_record,
    finite,
    machine_record,
    mean_std_percent,
    number,
    p_value,
    percent,
    points,
)
from benchmarks.common import table as section_table
from mnist_ablation.defaults import CONFIDENCE, EQUIVALENCE_MARGIN

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
STUDY = "parity"
BASELINE_ARM, SEED_SCRIPT_ARM = "baseline", "seed_script"
# mode: (train_subset (None = all 55,000 training images), epochs, seeds per arm, what it shows)
MODES = {
    "smoke": (300, 1, 2, "checks the script end to end; its accuracies mean nothing"),
    "cpu": (None, 3, 8, "parity of the two pipelines over the first 3 epochs (the schedule's steps at epochs 5 and 10 "
                        "are not reached), not the 15-epoch figure"),
    "full": (None, 15, 5, "parity at the seed's full length"),
}


def ablate_command(train_subset: int | None, epochs: int, seeds: int, workers: int, tracking_uri: str,
                   data_dir: str | None, overrides: list[str], report_dir: Path,
                   offline_cells: Path | None = None) -> list[str]:
    command = [sys.executable, "-m", "experiments.ablate", "--study", STUDY, "--seeds", str(seeds),
               "--epochs", str(epochs), "--workers", str(workers), "--tracking-uri", tracking_uri,
               "--equivalence-margin", str(EQUIVALENCE_MARGIN), "--output", str(report_dir)]
    if train_subset is not None:
        command += ["--train-subset", str(train_subset)]
    for override in overrides:
        command += ["--set", override]
    if offline_cells is not None:
        command += ["--import-offline", str(offline_cells)]
    if data_dir:
        command += ["--data-dir", data_dir]
    return command


def _portable(command: str, data_dir: str | None) -> str:
    """A recorded command without this machine's paths: the repository's relative, the data as $MNIST_DATA_DIR."""
    command = command.replace(f"{REPO_ROOT}/", "")
    return command.replace(str(data_dir), "$MNIST_DATA_DIR") if data_dir else command


def _relative_uri(uri: str) -> str:
    """A store under the repository, named relative to it (the JSON is committed; no machine paths in it)."""
    prefix = f"sqlite:///{REPO_ROOT}/"
    return "sqlite:///" + uri[len(prefix):] if uri.startswith(prefix) else uri


def summarise(tracking_uri: str) -> dict:
    """Per-arm figures and the seed_script-versus-baseline comparison from the study's finished cells."""
    from mnist_ablation import compare, stats, store

    runs = compare.study_runs(STUDY, tracking_uri=tracking_uri)
    if runs.empty:
        raise SystemExit(f"no finished cells of study {STUDY!r} in {tracking_uri}; did the ablate step fail?")
    arms = {}
    for arm, group in runs.groupby("arm", sort=False):
        accuracy = group["test_accuracy"].astype(float)
        run_seconds = (group["end_time"] - group["start_time"]).dt.total_seconds()
        arms[arm] = {
            "n_seeds": int(group["seed"].nunique()),
            "seeds": sorted(int(seed) for seed in group["seed"]),
            "test_accuracy_mean": float(accuracy.mean()),
            "test_accuracy_std": finite(accuracy.std(ddof=1)) if len(accuracy) > 1 else None,
            "test_accuracy_per_seed": {int(s): float(a) for s, a in zip(group["seed"], accuracy)},
            "val_accuracy_mean": float(group["val_accuracy"].astype(float).mean()),
            "train_seconds_mean": float(group["train_seconds"].astype(float).mean()),
            "run_seconds_mean": float(run_seconds.mean()),
            "train_subset": int(group["train_subset"].iloc[0]) if group["train_subset"].notna().iloc[0] else None,
        }
    correct = store.prediction_correctness(runs[["run_id", "arm", "seed"]])
    table = stats.compare_to_baseline(correct, baseline=BASELINE_ARM, confidence=CONFIDENCE,
                                      equivalence_margin=EQUIVALENCE_MARGIN)
    row = table.set_index("arm").loc[SEED_SCRIPT_ARM] if SEED_SCRIPT_ARM in set(table["arm"]) else None
    comparison = None
    if row is not None:
        n_images = int(correct["image"].nunique())
        standard_error = finite(row["standard_error"])
        image_part = math.sqrt(row["image_variance"] / n_images) if math.isfinite(row["image_variance"]) else None
        comparison = {
            "arm": SEED_SCRIPT_ARM, "baseline": BASELINE_ARM, "n_pairs": int(row["n_pairs"]), "n_images": n_images,
            "delta": finite(row["delta"]),
            "delta_ci_low": finite(row["delta_ci_low"]), "delta_ci_high": finite(row["delta_ci_high"]),
            "confidence": CONFIDENCE, "p_value": finite(row["p_value"]),
            "equivalence_margin": EQUIVALENCE_MARGIN, "equivalence_p_value": finite(row["equivalence_p_value"]),
            "standard_error": standard_error,
            "seed_variance": finite(row["seed_variance"]), "image_variance": finite(row["image_variance"]),
            "residual_variance": finite(row["residual_variance"]),
            # The standard error's two parts: what more seeds shrink, and the test set's floor.
            "standard_error_image_part": image_part,
            "standard_error_seed_part": (math.sqrt(max(standard_error ** 2 - image_part ** 2, 0.0))
                                         if standard_error is not None and image_part is not None else None),
            "ci_width_floor": finite(row["ci_width_floor"]),
            "delta_ci_low_this_test_set": finite(row["delta_ci_low_this_test_set"]),
            "delta_ci_high_this_test_set": finite(row["delta_ci_high_this_test_set"]),
            "p_value_this_test_set": finite(row["p_value_this_test_set"]),
        }
    return {"arms": arms, "comparison": comparison}


def compare_protocols(split_uri: str, test_uri: str) -> dict:
    """The trainer on the default split against the trainer with the seed's protocol (validation on test).

    Two sweeps of the baseline arm in two stores: 55,000 training images with a 5,000-image validation split,
    and all 60,000 with the test set as validation data. Paired by seed, seeds and test images random.
    """
    from mnist_ablation import compare, stats, store

    frames = []
    for label, uri in (("validation_split", split_uri), ("validation_test", test_uri)):
        runs = compare.study_runs(STUDY, tracking_uri=uri)
        runs = runs[runs["arm"] == BASELINE_ARM].assign(arm=label)
        frames.append(store.prediction_correctness(runs[["run_id", "arm", "seed"]]))
    correct = pd.concat(frames, ignore_index=True)
    row = stats.compare_to_baseline(correct, baseline="validation_split", confidence=CONFIDENCE,
                                    equivalence_margin=EQUIVALENCE_MARGIN).iloc[0]
    means = correct.groupby(["arm", "seed"])["correct"].mean().groupby("arm")
    return {
        "baseline": "validation_split (55,000 training images, 5,000 held out)",
        "arm": "validation_test (all 60,000 training images, the test set as validation data: the seed's protocol)",
        "n_pairs": int(row["n_pairs"]),
        "test_accuracy_mean": {arm: float(m) for arm, m in means.mean().items()},
        "test_accuracy_std": {arm: finite(s) for arm, s in means.std(ddof=1).items()},
        "delta": finite(row["delta"]), "delta_ci_low": finite(row["delta_ci_low"]),
        "delta_ci_high": finite(row["delta_ci_high"]), "p_value": finite(row["p_value"]),
        "equivalence_p_value": finite(row["equivalence_p_value"]), "ci_width_floor": finite(row["ci_width_floor"]),
        "delta_ci_low_this_test_set": finite(row["delta_ci_low_this_test_set"]),
        "delta_ci_high_this_test_set": finite(row["delta_ci_high_this_test_set"]),
        "p_value_this_test_set": finite(row["p_value_this_test_set"]),
    }


def _points(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:+.3f}" if signed else f"{100 * value:.3f}"


def _g(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


_p = _g  # p-values


def verdict(comparison: dict | None) -> str:
    if comparison is None or comparison["equivalence_p_value"] is None:
        return "no verdict: needs at least 2 paired seeds"
    margin = 100 * comparison["equivalence_margin"]
    if comparison["equivalence_p_value"] < 1 - comparison["confidence"]:
        tost = _p(comparison["equivalence_p_value"])
        return f"equivalent: the difference is within +-{margin:g} points (TOST p {tost})"
    if comparison["p_value"] is not None and comparison["p_value"] < 1 - comparison["confidence"]:
        return f"NOT equivalent: the pipelines differ (p {_p(comparison['p_value'])}); find out why (docs/parity.md)"
    return (f"undecided: neither a difference (p {_p(comparison['p_value'])}) nor equivalence within +-{margin:g} "
            f"points (TOST p {_p(comparison['equivalence_p_value'])}) is shown; more seeds narrow the interval "
            f"down to its test-set floor of {_points(comparison['ci_width_floor'])} points")


def table(summary: dict) -> str:
    lines = [f"{'arm':14s} {'n':>3s} {'test acc % (mean +- std)':>25s} {'val acc %':>10s} {'s / cell (train)':>17s} "
             f"{'s / cell (run)':>15s}"]
    for arm, figures in summary["arms"].items():
        std = figures["test_accuracy_std"]
        accuracy = f"{100 * figures['test_accuracy_mean']:.3f}" + (f" +- {100 * std:.3f}" if std is not None else "")
        lines.append(f"{arm:14s} {figures['n_seeds']:3d} {accuracy:>25s} {100 * figures['val_accuracy_mean']:10.3f} "
                     f"{figures['train_seconds_mean']:17.1f} {figures['run_seconds_mean']:15.1f}")
    comparison = summary["comparison"]
    if comparison is not None:
        c = comparison
        tost_label = f"TOST p (+-{100 * c['equivalence_margin']:g} points)"
        lines += [
            "",
            f"{c['arm']} vs {c['baseline']} ({c['n_pairs']} paired seeds x {c['n_images']:,} test images, both "
            "random), in points of accuracy:",
            f"  delta                    {_points(c['delta'], signed=True)}",
            f"  95% CI                   [{_points(c['delta_ci_low'], True)}, {_points(c['delta_ci_high'], True)}]",
            f"  p (difference)           {_p(c['p_value'])}",
            f"  {tost_label:25s}{_p(c['equivalence_p_value'])}",
            f"  standard error           {_points(c['standard_error'])} = seeds "
            f"{_points(c['standard_error_seed_part'])} (+) test images {_points(c['standard_error_image_part'])}",
            f"  variance components      seed {_g(c['seed_variance'])}, image {_g(c['image_variance'])} "
            "(of the per-image correctness difference, fractions squared)",
            f"  CI width floor           {_points(c['ci_width_floor'])} (the test set's limit at any number of seeds)",
            f"  verdict                  {verdict(c)}",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.parity", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=list(MODES), default="smoke",
                        help="smoke: check the script; cpu: 55,000 images x 3 epochs x 8 seeds; full: 15 epochs x 5 "
                             "seeds (default: %(default)s)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per arm (default: the mode's)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per cell (default: the mode's)")
    parser.add_argument("--train-subset", type=int, default=None,
                        help="training images per cell (default: the mode's; cpu and full use all 55,000)")
    parser.add_argument("--workers", type=int, default=1, help="cells trained at once (default: %(default)s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="config override for both arms, e.g. validation=test for the seed's own protocol "
                             "(repeatable)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow store (default: sqlite under benchmarks/results/parity/<mode>/)")
    parser.add_argument("--data-dir", default=os.environ.get("MNIST_DATA_DIR"), help="MNIST directory")
    parser.add_argument("--output", type=Path, default=None, help="JSON path (default results/parity-<mode>.json)")
    parser.add_argument("--skip-training", action="store_true", help="only summarise the cells already in the store")
    parser.add_argument("--compare-protocols", action="store_true",
                        help="also train the baseline arm with the seed's own protocol (--set validation=test: all "
                             "60,000 images, the test set as validation data) in a second store and compare it with "
                             "the default split")
    parser.add_argument("--offline-cells", type=Path, default=None, metavar="DIR",
                        help="import cells trained elsewhere with `experiments.ablate --study parity --offline DIR` "
                             "(a GPU machine, say) instead of training here")
    args = parser.parse_args(argv)
    default_subset, default_epochs, default_seeds, shows = MODES[args.mode]
    train_subset = args.train_subset if args.train_subset is not None else default_subset
    epochs = args.epochs or default_epochs
    seeds = args.seeds or default_seeds
    if seeds < 1 or epochs < 1 or args.workers < 1:
        parser.error("--seeds, --epochs and --workers must be integers >= 1")
    store_dir = RESULTS_DIR / "parity" / args.mode
    tracking_uri = args.tracking_uri or f"sqlite:///{store_dir / 'mlflow.db'}"
    output = args.output or RESULTS_DIR / f"parity-{args.mode}.json"

    command = ablate_command(train_subset, epochs, seeds, args.workers, tracking_uri, args.data_dir, args.overrides,
                             store_dir / "report", args.offline_cells)
    machine = machine_record()
    started = time.perf_counter()
    ablate_exit = None
    if not args.skip_training:
        store_dir.mkdir(parents=True, exist_ok=True)
        print("$ python", " ".join(command[1:]), flush=True)
        ablate_exit = subprocess.run(command, cwd=REPO_ROOT).returncode
        if ablate_exit != 0:
            print(f"warning: the ablate step exited {ablate_exit}; summarising the cells that finished",
                  file=sys.stderr)
    summary = summarise(tracking_uri)
    if args.compare_protocols:
        test_dir = RESULTS_DIR / "parity" / f"{args.mode}-validation-test"
        test_uri = f"sqlite:///{test_dir / 'mlflow.db'}"
        test_command = ablate_command(train_subset, epochs, seeds, args.workers, test_uri, args.data_dir,
                                      [*args.overrides, "validation=test"], test_dir / "report")
        test_command[test_command.index("--study") + 1:test_command.index("--study") + 2] = [STUDY, "--arms",
                                                                                             BASELINE_ARM]
        if not args.skip_training:
            test_dir.mkdir(parents=True, exist_ok=True)
            print("$ python", " ".join(test_command[1:]), flush=True)
            subprocess.run(test_command, cwd=REPO_ROOT, check=False)
        summary["protocols"] = compare_protocols(tracking_uri, test_uri)
        summary["protocols"]["command"] = _portable(" ".join(["python", *test_command[1:]]), args.data_dir)
    result = {
        "benchmark": "parity",
        "mode": args.mode,
        "study": STUDY,
        "protocol": {
            "arms": {BASELINE_ARM: "the trainer at the seed's recipe",
                     SEED_SCRIPT_ARM: "the seed's code as written (mnist_ablation.seed_pipeline)"},
            "seeds_per_arm": seeds, "epochs": epochs,
            "train_images": train_subset if train_subset is not None else "all (55,000 with validation=split)",
            "overrides": args.overrides, "test_images": 10_000, "confidence": CONFIDENCE,
            "equivalence_margin": EQUIVALENCE_MARGIN, "what_it_shows": shows,
            "statistics": "mnist_ablation.stats.compare_to_baseline on store.prediction_correctness: seeds and test "
                          "images random (crossed), paired by seed",
        },
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commands": {
            "benchmark": _portable(" ".join(["python", "-m", "benchmarks.parity",
                                             *(argv if argv is not None else sys.argv[1:])]), args.data_dir),
            "ablate": _portable(" ".join(["python", *command[1:]]), args.data_dir),
        },
        "ablate_exit_code": ablate_exit,
        "tracking_uri": _relative_uri(tracking_uri),
        "wall_seconds": time.perf_counter() - started,
        "machine": finish_machine_record(machine),
        **summary,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2))
    images = f"{train_subset:,} images" if train_subset is not None else "all 55,000 training images"
    print()
    print(f"Parity benchmark ({args.mode} mode: {images} x {epochs} epoch(s), {seeds} seed(s) per arm), test accuracy "
          "on the 10,000 MNIST test images")
    print(table(summary))
    if "protocols" in summary:
        c = summary["protocols"]
        print(f"\nThe trainer, seed's protocol (validation on test, 60,000 images) minus default split (55,000), "
              f"{c['n_pairs']} paired seeds, points: {_points(c['delta'], True)} [{_points(c['delta_ci_low'], True)}, "
              f"{_points(c['delta_ci_high'], True)}], p {_p(c['p_value'])}; this test set only "
              f"[{_points(c['delta_ci_low_this_test_set'], True)}, {_points(c['delta_ci_high_this_test_set'], True)}]")
    print(f"\n{args.mode} mode {shows}.")
    print(f"wall time {result['wall_seconds']:.0f} s; results in {output}")
    return 0


# -- its section of docs/benchmarks.md (benchmarks/common.py) ----------------------------------------------------


def render_report(data: dict, out: Rendered) -> None:
    rows = [[f"`{arm}`", f.get("n_seeds"), mean_std_percent({"mean": f.get("test_accuracy_mean"),
                                                             "std": f.get("test_accuracy_std")}, 3),
             percent(f.get("val_accuracy_mean"), 3), number(f.get("train_seconds_mean"), 1),
             number(f.get("run_seconds_mean"), 1)]
            for arm, f in data.get("arms", {}).items()]
    out.tables.append(section_table(["arm", "seeds", "test accuracy % (mean ± std)", "val accuracy %",
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
    out.tables.append(section_table([f"`{c['arm']}` minus `{c['baseline']}`", "value"], [
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
        out.tables.append(section_table(["the seed's protocol minus the default split", "value"], [
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


REPORT = Benchmark(
    key="parity", title="Parity", command="python -m benchmarks.parity", order=70,
    about=("The `parity` study: the trainer's `baseline` against `seed_script`, the seed's own code as written, "
           "on the same split, epochs and seeds, compared with seeds and test images random and an equivalence "
           "test (TOST) at ±0.1 points. See [parity.md](parity.md) for what it does and does not show in each "
           "mode."),
    render=render_report,
    missing=("Not yet measured. `python -m benchmarks.parity --mode cpu` (all 55,000 training images × 3 epochs, "
             "8 seeds per arm: about an hour and a half on 2 cores) writes `benchmarks/results/parity-cpu.json`, "
             "and `--mode full` (15 epochs, 5 seeds per arm, a GPU machine) `parity-full.json`; then regenerate "
             "this page with `python -m benchmarks.report`."))


if __name__ == "__main__":
    sys.exit(main())
