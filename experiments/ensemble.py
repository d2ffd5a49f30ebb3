"""``python -m experiments.ensemble``: combine finished runs of a study into an ensemble, tracked in MLflow.

Averages the test probabilities the runs already logged (no retraining, no re-inference). Members are
chosen by final validation accuracy only: ``--top-k K`` takes the K best runs of the study, ``--arm ARM``
takes every seed of one arm (both: the K best of that arm), ``--seed S`` restricts to one seed so that
ensembles over disjoint members can be repeated and averaged. The ensemble is logged as a child run of
the study's parent run (tag ``mnist_ablation.role=ensemble``, ``member_run_ids``); running the same command
again reuses it while its members are unchanged.

    python -m experiments.ensemble --study architecture --top-k 5
    python -m experiments.ensemble --study architecture --arm extra_block
"""

from __future__ import annotations

import argparse
import sys

from experiments.cli import add_tracking_arguments, run_command


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.ensemble", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", required=True, help="the study whose finished runs to combine")
    parser.add_argument("--top-k", type=int, default=None, metavar="K",
                        help="the K runs with the highest final val_accuracy")
    parser.add_argument("--arm", default=None, help="only runs of this arm (all its seeds unless --top-k)")
    parser.add_argument("--seed", type=int, default=None, help="only runs of this seed (one repeat of the ensemble)")
    add_tracking_arguments(parser)
    args = parser.parse_args(argv)
    if args.top_k is None and args.arm is None:
        parser.error("choose members with --top-k K, --arm ARM or both")
    if args.top_k is not None and args.top_k < 1:
        parser.error(f"--top-k {args.top_k}: expected an integer >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from mnist_ablation import ensemble
    from mnist_ablation.redaction import printable

    logged = ensemble.log_study_ensemble(args.study, top_k=args.top_k, arm=args.arm, seed=args.seed,
                                         tracking_uri=args.tracking_uri, command=sys.argv)
    result = logged.result
    columns = [c for c in ("run_name", "arm", "seed", "val_accuracy", "test_accuracy") if c in result.members]
    print(f"Ensemble {result.run_name!r} of study {args.study!r}: {len(result.members)} members chosen by val_accuracy")
    print(printable(result.members[columns].to_string(index=False, float_format=lambda v: f"{v:.4f}"), lines=True))
    print()
    for key in ("test_accuracy", "test_loss", "members_test_accuracy_mean", "test_accuracy_tta"):
        if key in result.metrics:
            print(f"  {key:28s} {result.metrics[key]:.4f}")
    print("  val_accuracy                 n/a (members' validation predictions are not logged)")
    print()
    verb = "already logged as" if logged.reused else "logged as"
    print(f"MLflow: {verb} run {logged.run_id} in experiment 'ablation/{args.study}'")
    print(f"  pandas: from mnist_ablation import ensemble; ensemble.ensemble_runs({args.study!r})")
    return 0


if __name__ == "__main__":
    run_command(main)
