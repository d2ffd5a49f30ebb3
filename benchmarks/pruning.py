"""How much compute pruning saves: the same study with and without the median pruner.

Both studies use the same seeded TPE sampler, whose first trials are its seeded random start-up
trials, so (with the baseline enqueued first) the two studies look at the same configs; the pruned one
stops the poor ones early. Reported: epochs trained, trials pruned, wall time, and the best
validation accuracy each study found. Trials train without MLflow (the figure is about training
compute, not logging).

    MNIST_DATA_DIR=... python -m benchmarks.pruning [--n-trials 8] [--epochs 4] [--train-subset 2000]

Prints a table and writes benchmarks/results/pruning.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks.common import Benchmark, Rendered, finish_machine_record, machine_record, number, percent
from benchmarks.common import table as section_table
from mnist_ablation.config import BASELINE, TrainConfig

if TYPE_CHECKING:
    from mnist_ablation.data import Mnist

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
RESULTS = Path(__file__).resolve().parent / "results" / "pruning.json"


def untracked_objective(base: TrainConfig, data: Mnist, name: str):
    """The tuning objective with the same pruning callback, training without an MLflow run.

    Built here, not at import: the report reads this module's ``REPORT`` without loading Optuna or Keras.
    """
    from mnist_ablation import tuning
    from mnist_ablation.train import train

    class UntrackedObjective(tuning.Objective):
        def run_trial(self, trial, config: TrainConfig, tags) -> dict[str, list[float]]:
            return train(config, self.data, callbacks=[tuning.PruningCallback(trial)], verbose=0).history

    return UntrackedObjective(base, data, name, parent_run_id="")


def _print_trial(study, trial) -> None:
    print(f"  {study.study_name}: trial {trial.number} {trial.state.name.lower()} after "
          f"{len(trial.intermediate_values)} epoch(s)", flush=True)


def run_study(pruner_name: str, base: TrainConfig, data: Mnist, n_trials: int, sampler_seed: int) -> dict:
    import optuna

    from mnist_ablation import search_space, tuning
    from mnist_ablation.train import TrainingDiverged

    study = optuna.create_study(study_name=f"pruning-{pruner_name}", direction="maximize",
                                sampler=search_space.build_sampler("tpe", sampler_seed),
                                pruner=search_space.build_pruner(pruner_name, base.epochs))
    study.enqueue_trial(search_space.baseline_params(base), user_attrs={tuning.BASELINE_ATTR: True})
    start = time.perf_counter()
    study.optimize(untracked_objective(base, data, f"pruning-{pruner_name}"),
                   n_trials=n_trials, catch=(TrainingDiverged,), callbacks=[_print_trial])
    seconds = time.perf_counter() - start
    trials = study.trials
    return {
        "pruner": pruner_name,
        "trials": len(trials),
        "pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in trials),
        "failed": sum(t.state == optuna.trial.TrialState.FAIL for t in trials),
        "epochs_trained": sum(len(t.intermediate_values) for t in trials),
        "epochs_budget": len(trials) * base.epochs,
        "best_val_accuracy": study.best_value,
        "best_trial": study.best_trial.number,
        "seconds": seconds,
        "per_trial": [{"number": t.number, "state": t.state.name, "epochs": len(t.intermediate_values),
                       "val_accuracy": (list(t.intermediate_values.values()) or [None])[-1], "params": t.params}
                      for t in trials],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pruning", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--train-subset", type=int, default=2000)
    parser.add_argument("--sampler-seed", type=int, default=0)
    parser.add_argument("--pruner", default="median", help="pruner compared with none (default: %(default)s)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    from mnist_ablation.data import load_mnist

    base = BASELINE.replace(epochs=args.epochs, train_subset=args.train_subset)
    data = load_mnist(args.data_dir)
    machine = machine_record()
    results = [run_study(name, base, data, args.n_trials, args.sampler_seed) for name in (args.pruner, "none")]
    finish_machine_record(machine)

    pruned, full = results
    print(f"\n{args.n_trials} trials x {args.epochs} epochs on {args.train_subset} images, "
          f"TPE seed {args.sampler_seed}")
    print(f"{'pruner':<10}{'pruned':>8}{'epochs':>10}{'seconds':>10}{'best val acc':>14}{'best trial':>12}")
    for row in results:
        print(f"{row['pruner']:<10}{row['pruned']:>8}{row['epochs_trained']:>6}/{row['epochs_budget']:<3}"
              f"{row['seconds']:>10.0f}{row['best_val_accuracy']:>14.4f}{row['best_trial']:>12}")
    saved = 1 - pruned["epochs_trained"] / full["epochs_trained"]
    print(f"pruning saved {saved:.0%} of the epochs and {1 - pruned['seconds'] / full['seconds']:.0%} of the time; "
          f"best validation accuracy {pruned['best_val_accuracy']:.4f} vs {full['best_val_accuracy']:.4f}")

    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "settings": {"n_trials": args.n_trials, "epochs": args.epochs, "train_subset": args.train_subset,
                     "sampler": "tpe", "sampler_seed": args.sampler_seed, "pruner": args.pruner,
                     "pruner_definition": "MedianPruner(n_startup_trials=3, n_warmup_steps=1)"
                     if args.pruner == "median" else args.pruner},
        "machine": machine,
        "epochs_saved_fraction": saved,
        "results": results,
    }, indent=2))
    print(f"wrote {args.output}")
    return 0


# -- its section of docs/benchmarks.md (benchmarks/common.py) ----------------------------------------------------


def render_report(data: dict, out: Rendered) -> None:
    settings = data.get("settings", {})
    rows = [[row["pruner"], f"{row.get('pruned', 0)} of {row.get('trials')}",
             f"{row.get('epochs_trained')} / {row.get('epochs_budget')}",
             f"{number(row.get('best_val_accuracy'), 4)} ({row.get('best_trial')})", number(row.get("seconds"), 0)]
            for row in data.get("results", [])]
    out.tables.append(section_table(["pruner", "trials pruned", "epochs trained", "best validation accuracy (trial)",
                             "wall seconds"], rows))
    out.lines.append(f"{settings.get('n_trials')} trials × {settings.get('epochs')} epochs on "
                     f"{settings.get('train_subset', 0):,} training images, {settings.get('sampler', 'tpe').upper()} "
                     f"seed {settings.get('sampler_seed')}; pruner `{settings.get('pruner_definition')}`. "
                     f"Pruning saved {percent(data.get('epochs_saved_fraction'), 0)}% of the epochs.")


def report_command(data: dict) -> str:
    """The command of a result that did not record it, from its settings."""
    s = data.get("settings", {})
    return (f"python -m benchmarks.pruning --n-trials {s.get('n_trials')} --epochs {s.get('epochs')} --train-subset "
            f"{s.get('train_subset')} --sampler-seed {s.get('sampler_seed')} --pruner {s.get('pruner')}")


REPORT = Benchmark(
    key="pruning", title="Pruning", command="python -m benchmarks.pruning", order=40,
    about=("The same tuning study twice, with the median pruner and without (trials train without MLflow). TPE's "
           "seeded start-up trials make both studies try the same configs, so the difference is where pruning "
           "stopped a trial; epochs trained are the measure, wall seconds depend on the machine's load."),
    render=render_report, reconstruct=report_command)


if __name__ == "__main__":
    raise SystemExit(main())
