"""``python -m experiments.tune``: tune the seed's recipe with Optuna on the validation split, logged to MLflow.

Run it again with the same --study-name to add trials to the same study. Run it in several processes or
on several machines with the same --storage postgresql://... and --tracking-uri http://... to share one
study; when the last worker is done, the best config is retrained once and tested once.
"""

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
from mnist_ablation.config import ConfigError
from mnist_ablation.search_space import PRUNERS, SAMPLERS  # noqa: E402 - import-light: no Optuna or TensorFlow


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.tune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-trials", type=int, default=20,
                        help="trials this worker runs (default: %(default)s); 0 only writes the final report")
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help="stop starting new trials after this many seconds")
    parser.add_argument("--study-name", default="mnist", help="Optuna study; also MLflow experiment tune/NAME "
                                                              "(default: %(default)s)")
    parser.add_argument("--storage", default=None, metavar="URL",
                        help="Optuna storage, any SQLAlchemy URL, e.g. postgresql://user@host:5432/optuna "
                             "(password from ~/.pgpass or PGPASSWORD) "
                             "(default: sqlite:///mlruns/optuna.db beside a local MLflow store)")
    add_config_arguments(parser)
    parser.add_argument("--sampler", default="tpe", choices=SAMPLERS.names, help="default: %(default)s")
    parser.add_argument("--sampler-seed", type=int, default=None,
                        help="seed of the sampler; leave unset when several workers share a study, or they "
                             "propose the same trials")
    parser.add_argument("--pruner", default="median", choices=PRUNERS.names, help="default: %(default)s")
    parser.add_argument("--heartbeat-interval", type=int, default=60, metavar="SECONDS",
                        help="how often a running trial proves its worker alive (default: %(default)s)")
    parser.add_argument("--grace-period", type=int, default=180, metavar="SECONDS",
                        help="a trial silent this long is marked failed and retried (default: %(default)s)")
    parser.add_argument("--max-retry", type=int, default=3, help="retries of a lost trial (default: %(default)s)")
    parser.add_argument("--retrain-epochs", type=int, default=None,
                        help="epochs of the final retrain of the best config (default: the trials' epochs)")
    parser.add_argument("--retrain-subset", type=int, default=None, metavar="N",
                        help="train the final retrain on N images (default: the full training split)")
    parser.add_argument("--no-final", action="store_true",
                        help="skip the final report and retrain (e.g. for all workers but one)")
    parser.add_argument("--verbose", type=int, default=0, choices=(0, 1, 2), help="Keras verbosity of trials")
    add_data_arguments(parser)
    add_tracking_arguments(parser, runs=True)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    base = config_from_arguments(args)  # bad config fails here, before data, storage or store
    if args.n_trials < 0:
        raise ConfigError(f"--n-trials {args.n_trials} is negative; pass 0 or more.")
    from mnist_ablation import naming, search_space, tracking, tuning
    from mnist_ablation.data import load_mnist
    from mnist_ablation.redaction import redact
    from mnist_ablation.storage import default_storage_url

    search_space.check_base_config(base)
    uri = tracking.use_tracking_uri(args.tracking_uri)
    apply_tracking_arguments(args)
    storage_url = args.storage or default_storage_url(tracking.local_state_directory(uri))
    storage = tuning.open_storage(storage_url, heartbeat_interval=args.heartbeat_interval,
                                  grace_period=args.grace_period, max_retry=args.max_retry)
    data = load_mnist(args.data_dir)
    study = tuning.open_study(args.study_name, storage, base,
                              sampler=search_space.build_sampler(args.sampler, args.sampler_seed),
                              pruner=search_space.build_pruner(args.pruner, base.epochs),
                              storage_label=redact(storage_url))
    print(f"study {study.name!r} ({'created' if study.created else 'joined'}) in {redact(storage_url)}; "
          f"MLflow experiment {naming.tuning_experiment(study.name)!r}, parent run {study.parent_run_id}, "
          f"at {redact(uri)}", flush=True)
    if args.n_trials:
        tuning.optimize(study, data, n_trials=args.n_trials, timeout=args.timeout, verbose=args.verbose)
    if args.no_final:
        return 0
    in_flight = tuning.other_trials_in_flight(study.study)
    if in_flight:
        # The last worker to finish writes the report; a late one would report on a study still moving.
        print(f"{in_flight} trial(s) still running or queued in other workers: the last worker to finish writes "
              "the final report (or run this command with --n-trials 0 afterwards).")
        return 0
    summary = tuning.finalize(study, data, retrain_epochs=args.retrain_epochs, retrain_subset=args.retrain_subset,
                              verbose=2 if args.verbose else 0)
    print(tuning.describe_summary(summary))
    return 0


if __name__ == "__main__":
    run_command(main)
