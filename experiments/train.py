"""``python -m experiments.train``: train one run of the seed's recipe (or a variant) and log it to MLflow."""

from __future__ import annotations

import argparse

from experiments.cli import (
    add_config_arguments,
    add_data_arguments,
    add_tracking_arguments,
    apply_tracking_arguments,
    config_from_arguments,
    run_command,
)
from mnist_ablation.naming import DEFAULT_EXPERIMENT


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.train", description=__doc__)
    add_config_arguments(parser)
    parser.add_argument("--seed", type=int, help="random seed (config field seed; default 0)")
    parser.add_argument("--experiment-name", default=DEFAULT_EXPERIMENT,
                        help="MLflow experiment (default: %(default)s)")
    parser.add_argument("--run-name", default=None, help="MLflow run name (default: generated)")
    add_data_arguments(parser)
    add_tracking_arguments(parser, runs=True)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    config = config_from_arguments(args)  # bad config fails here, before data, store or model
    from mnist_ablation import tracking
    from mnist_ablation.data import load_mnist
    from mnist_ablation.redaction import redact

    uri = tracking.use_tracking_uri(args.tracking_uri)
    apply_tracking_arguments(args)
    data = load_mnist(args.data_dir)
    checkpoint_dir = tracking.local_state_directory(uri) / "checkpoints" / config.hash(data.checksums)
    print(f"training {config.epochs} epochs on {'all' if config.train_subset is None else config.train_subset} "
          f"images (validation={config.validation}); tracking at {redact(uri)}")
    tracked = tracking.run_training(config, data, experiment_name=args.experiment_name, run_name=args.run_name,
                                    checkpoint_dir=checkpoint_dir)
    print(f"test accuracy: {tracked.result.test_accuracy:.4f}  test loss: {tracked.result.test_loss:.4f}")
    print(f"MLflow run id: {tracked.run_id}")
    return 0


if __name__ == "__main__":
    run_command(main)
