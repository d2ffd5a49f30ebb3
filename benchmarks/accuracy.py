"""Accuracy benchmark: the seed's recipe, the best stronger arm and ensembles, over repeated seeds.

    python -m benchmarks.accuracy --mode short    # same code path on a small subset (the no_pool arms cost ~10x)
    python -m benchmarks.accuracy --mode full     # full length: 8 arms x 3 seeds x 15-30 epochs (hours on CPU)

    # the same cells trained on a GPU box with JAX and no MLflow, then summarised here:
    KERAS_BACKEND=jax python -m experiments.ablate --study architecture --seeds 3 --offline cells --workers 15
    python -m benchmarks.accuracy --mode full --offline-cells cells

It runs ``python -m experiments.ablate --study architecture`` (resumable: finished cells are skipped), then:

- the seed's recipe: the ``baseline`` arm, test accuracy mean +- std over seeds, seconds per run;
- the best single-model arm, chosen by mean final *validation* accuracy over seeds;
- ensembles, built by ``mnist_ablation.ensemble`` from the runs' logged test probabilities:
  ``ensemble-top{K}`` per seed (the K runs of that seed with the best validation accuracy; the seeds
  give disjoint member sets, so the figure is a mean +- std over repeats) and ``ensemble-{best arm}``
  (every seed of the chosen arm; one figure).

Every choice (arm, members, K, epochs) is made on validation data or fixed in advance; test accuracy is
only reported. Results go to ``benchmarks/results/accuracy-{mode}.json`` and a table on stdout.
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
from typing import Any

from benchmarks.common import (
    DASH,
    Benchmark,
    Rendered,
    finish_machine_record,
    is_missing,
    machine_record,
    mean_std_percent,
    number,
    percent,
)
from benchmarks.common import table as section_table

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
STUDY = "architecture"
BASELINE_ARM = "baseline"
MODES = {
    # mode: ablate overrides (None = the arms' own full-length values), seeds, ensemble size K
    "short": ({"train_subset": 12000, "epochs": 2}, 2, 3),  # the ablate --quick preset
    "full": ({}, 3, 3),
}
GOALS = {  # the targets, on test accuracy means over seeds
    "seed_recipe": 0.9955,
    "best_arm": 0.9970,
    "ensemble": 0.9980,
}


def ablate_command(mode: str, seeds: int, tracking_uri: str, data_dir: str | None,
                   offline_cells: Path | None = None) -> list[str]:
    overrides, _, _ = MODES[mode]
    command = [sys.executable, "-m", "experiments.ablate", "--study", STUDY, "--seeds", str(seeds),
               "--no-report", "--tracking-uri", tracking_uri]
    if offline_cells is not None:
        command += ["--import-offline", str(offline_cells)]
    if "train_subset" in overrides:
        command += ["--train-subset", str(overrides["train_subset"])]
    if "epochs" in overrides:
        command += ["--epochs", str(overrides["epochs"])]
    if data_dir:
        command += ["--data-dir", data_dir]
    return command


def mean_std(values) -> dict:
    values = [float(v) for v in values]
    return {
        "n": len(values),
        "mean": statistics.fmean(values) if values else float("nan"),
        "std": statistics.stdev(values) if len(values) > 1 else float("nan"),
        "values": values,
    }


def summarise(tracking_uri: str, seeds: int, ensemble_size: int) -> dict:
    """Per-arm figures, the arm chosen on validation, and the ensembles (logged to MLflow as runs)."""
    from mnist_ablation import compare, ensemble

    runs = compare.study_runs(STUDY, tracking_uri=tracking_uri)
    if runs.empty:
        raise SystemExit(f"no finished runs of study {STUDY!r} in {tracking_uri}; the ablate step failed?")
    arms = {}
    for arm, group in runs.groupby("arm", sort=False):
        arms[arm] = {
            "test_accuracy": mean_std(group["test_accuracy"]),
            "val_accuracy": mean_std(group["val_accuracy"]),
            "train_seconds": mean_std(group["train_seconds"]),
            "epochs": int(group["epochs"].iloc[0]),
            "train_subset": None if group["train_subset"].isna().iloc[0] else int(group["train_subset"].iloc[0]),
        }
    # The best single model: highest mean final validation accuracy (test accuracy is not looked at).
    best_arm = max(arms, key=lambda a: arms[a]["val_accuracy"]["mean"])

    per_seed = []
    for seed in sorted(set(runs["seed"])):
        logged = ensemble.log_study_ensemble(STUDY, top_k=ensemble_size, seed=int(seed), tracking_uri=tracking_uri,
                                             command=sys.argv)
        per_seed.append({"seed": int(seed), "run_id": logged.run_id, "members": logged.result.member_run_ids,
                         "member_arms": list(logged.result.members["arm"]), **logged.result.metrics})
    best_arm_ensemble = ensemble.log_study_ensemble(STUDY, arm=best_arm, tracking_uri=tracking_uri, command=sys.argv)
    return {
        "arms": arms,
        "seed_recipe_arm": BASELINE_ARM,
        "best_arm": best_arm,
        "best_arm_chosen_by": "mean final val_accuracy over seeds",
        "ensemble_per_seed": {
            "name": f"ensemble-top{ensemble_size} per seed",
            "chosen_by": f"the {ensemble_size} runs of each seed with the best final val_accuracy",
            "test_accuracy": mean_std(row["test_accuracy"] for row in per_seed),
            "members_test_accuracy_mean": mean_std(row["members_test_accuracy_mean"] for row in per_seed),
            "repeats": per_seed,
        },
        "ensemble_of_best_arm": {
            "name": f"ensemble-{best_arm}",
            "run_id": best_arm_ensemble.run_id,
            "members": best_arm_ensemble.result.member_run_ids,
            **best_arm_ensemble.result.metrics,
        },
    }


def _percent(stats: dict) -> str:
    if stats["n"] > 1:
        return f"{100 * stats['mean']:.2f} +- {100 * stats['std']:.2f}"
    return f"{100 * stats['mean']:.2f}"


def table(summary: dict) -> str:
    arms, best = summary["arms"], summary["best_arm"]
    lines = [f"{'':38s} {'n':>3s} {'test acc % (mean +- std)':>26s} {'val acc %':>10s} {'s / run':>8s}  goal"]

    def goal(key, value):
        target = GOALS[key]
        return f">= {100 * target:.2f}: {'met' if value >= target else 'not met'}"

    for arm, stats in arms.items():
        marker = " (seed's recipe)" if arm == BASELINE_ARM else (" (best on val)" if arm == best else "")
        note = goal("seed_recipe", stats["test_accuracy"]["mean"]) if arm == BASELINE_ARM else (
            goal("best_arm", stats["test_accuracy"]["mean"]) if arm == best else "")
        lines.append(f"{arm + marker:38s} {stats['test_accuracy']['n']:3d} {_percent(stats['test_accuracy']):>26s} "
                     f"{100 * stats['val_accuracy']['mean']:10.2f} {stats['train_seconds']['mean']:8.0f}  {note}")
    per_seed = summary["ensemble_per_seed"]
    lines.append(f"{per_seed['name']:38s} {per_seed['test_accuracy']['n']:3d} "
                 f"{_percent(per_seed['test_accuracy']):>26s} {'n/a':>10s} {'':>8s}  "
                 f"{goal('ensemble', per_seed['test_accuracy']['mean'])}")
    of_best = summary["ensemble_of_best_arm"]
    lines.append(f"{of_best['name'] + ' (all seeds)':38s} {1:3d} {100 * of_best['test_accuracy']:26.2f} "
                 f"{'n/a':>10s} {'':>8s}  one ensemble, not a mean over repeats")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.accuracy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=sorted(MODES), default="short",
                        help="short: a small subset to check the pipeline; full: the real benchmark")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per arm (default: short 2, full 3)")
    parser.add_argument("--ensemble-size", type=int, default=None, help="K of the per-seed ensembles (default 3)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow store (default: sqlite under benchmarks/results/<mode>/mlruns)")
    parser.add_argument("--data-dir", default=os.environ.get("MNIST_DATA_DIR"), help="MNIST directory")
    parser.add_argument("--output", type=Path, default=None, help="JSON path (default results/accuracy-<mode>.json)")
    parser.add_argument("--skip-training", action="store_true",
                        help="only summarise the runs already in the store (no ablate step)")
    parser.add_argument("--offline-cells", type=Path, default=None, metavar="DIR",
                        help="import the cells trained elsewhere with `experiments.ablate --study architecture "
                             "--offline DIR` (a GPU box, say) instead of training here; cells missing from DIR "
                             "are not trained")
    args = parser.parse_args(argv)
    _, default_seeds, default_size = MODES[args.mode]
    seeds = args.seeds or default_seeds
    ensemble_size = args.ensemble_size or default_size
    store = RESULTS_DIR / args.mode / "mlruns"
    tracking_uri = args.tracking_uri or f"sqlite:///{store / 'mlflow.db'}"
    output = args.output or RESULTS_DIR / f"accuracy-{args.mode}.json"

    machine = machine_record()
    command = ablate_command(args.mode, seeds, tracking_uri, args.data_dir, args.offline_cells)
    started = time.perf_counter()
    if not args.skip_training:
        print("$ python", " ".join(command[1:]), flush=True)
        completed = subprocess.run(command, cwd=REPO_ROOT)
        if completed.returncode != 0:
            print(f"warning: the ablate step exited {completed.returncode}; summarising the runs that finished",
                  file=sys.stderr)
    summary = summarise(tracking_uri, seeds, ensemble_size)
    result = {
        "benchmark": "accuracy",
        "mode": args.mode,
        "study": STUDY,
        "seeds": seeds,
        "ensemble_size": ensemble_size,
        "commands": {
            "benchmark": " ".join(["python", "-m", "benchmarks.accuracy",
                                   *(argv if argv is not None else sys.argv[1:])]),
            "ablate": " ".join(["python", *command[1:]]),
        },
        "tracking_uri": tracking_uri,
        "wall_seconds": time.perf_counter() - started,
        "goals": GOALS,
        "machine": finish_machine_record(machine),
        **summary,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2))
    print()
    print(f"Accuracy benchmark ({args.mode} mode: {MODES[args.mode][0] or 'full length'}, {seeds} seeds), "
          f"test accuracy on the 10,000 MNIST test images")
    print(table(summary))
    print(f"\nwall time {result['wall_seconds']:.0f} s; results in {output}")
    if args.mode == "short":
        print("short mode checks the pipeline; its accuracies say nothing about the goals (run --mode full).")
    return 0


# -- its section of docs/benchmarks.md (benchmarks/common.py) ----------------------------------------------------


def render_report(data: dict, out: Rendered) -> None:
    goals = data.get("goals", {})
    arms = data.get("arms", {})
    best = data.get("best_arm")
    seed_arm = data.get("seed_recipe_arm", "baseline")

    def goal(key: str, value: Any) -> str:
        if key not in goals or is_missing(value):
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
    out.tables.append(section_table(["arm", "n", "test accuracy % (mean ± std)", "val accuracy %", "s / run", "goal"],
                                    rows))
    out.lines.append(f"Study `{data.get('study')}`, {data.get('mode')} mode, {data.get('seeds')} seeds per arm; the "
                     f"best arm is chosen by {data.get('best_arm_chosen_by', 'mean final val_accuracy')}.")
    if per_seed:
        members = {tuple(r.get("member_arms", [])) for r in per_seed.get("repeats", []) if r.get("member_arms")}
        chosen = "; ".join(" + ".join(m) for m in sorted(members))
        out.lines.append(f"`{per_seed['name']}`: {per_seed.get('chosen_by', '')}"
                         + (f" (members: {chosen})." if chosen else "."))


REPORT = Benchmark(
    key="accuracy", title="Accuracy", command="python -m benchmarks.accuracy", order=60,
    about=("The `architecture` study at full length (or a short check): the seed's recipe (test accuracy mean ± "
           "std over seeds), the best arm chosen on mean validation accuracy, `ensemble-top3` per seed and the "
           "ensemble of the chosen arm's seeds, against the goals (seed's recipe ≥ 99.55%, best arm ≥ 99.70%, "
           "ensemble ≥ 99.80%). Every choice is made on validation accuracy. See [ensembles.md](ensembles.md)."),
    render=render_report)


if __name__ == "__main__":
    sys.exit(main())
