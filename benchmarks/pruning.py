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
import platform
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import optuna  # noqa: E402

from mnist_ablation import search_space, tuning  # noqa: E402
from mnist_ablation.config import BASELINE, TrainConfig  # noqa: E402
from mnist_ablation.data import Mnist, load_mnist  # noqa: E402
from mnist_ablation.train import TrainingDiverged, train  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "pruning.json"


class UntrackedObjective(tuning.Objective):
    """The tuning objective with the same pruning callback, training without an MLflow run."""

    def run_trial(self, trial, config: TrainConfig, tags) -> dict[str, list[float]]:
        return train(config, self.data, callbacks=[tuning.PruningCallback(trial)], verbose=0).history


def _print_trial(study, trial) -> None:
    print(f"  {study.study_name}: trial {trial.number} {trial.state.name.lower()} after "
          f"{len(trial.intermediate_values)} epoch(s)", flush=True)


def run_study(pruner_name: str, base: TrainConfig, data: Mnist, n_trials: int, sampler_seed: int) -> dict:
    study = optuna.create_study(study_name=f"pruning-{pruner_name}", direction="maximize",
                                sampler=search_space.build_sampler("tpe", sampler_seed),
                                pruner=search_space.build_pruner(pruner_name, base.epochs))
    study.enqueue_trial(search_space.baseline_params(base), user_attrs={tuning.BASELINE_ATTR: True})
    start = time.perf_counter()
    study.optimize(UntrackedObjective(base, data, f"pruning-{pruner_name}", parent_run_id=""),
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

    base = BASELINE.replace(epochs=args.epochs, train_subset=args.train_subset)
    data = load_mnist(args.data_dir)
    load_before = os.getloadavg()
    results = [run_study(name, base, data, args.n_trials, args.sampler_seed) for name in (args.pruner, "none")]
    load_after = os.getloadavg()

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
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "load_average_before": load_before, "load_average_after": load_after},
        "epochs_saved_fraction": saved,
        "results": results,
    }, indent=2))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
