"""``python -m experiments.doctor``: check a store for stuck runs, missing cells and failures; fix stale runs.

Exit status 0 when the store is healthy, 1 when something needs attention.
"""

from __future__ import annotations

import argparse
import os

from experiments.cli import add_tracking_arguments, run_command


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.doctor", description=__doc__)
    add_tracking_arguments(parser)
    parser.add_argument("--storage", default=None,
                        help="the cell queue's Optuna storage "
                             "(default: sqlite:///mlruns/optuna.db beside a local store)")
    parser.add_argument("--stale-after", type=float, default=1800.0,
                        help="a RUNNING run with no queue heartbeat is stale after this many seconds without a "
                             "metric (default: %(default)s)")
    parser.add_argument("--grace-period", type=int, default=60,
                        help="seconds without a heartbeat after which a queue trial's worker counts as dead; "
                             "match the workers' (default: %(default)s)")
    parser.add_argument("--mark-stale", action="store_true",
                        help="mark stale runs KILLED and their queue trials failed, so a rerun retries them")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from mnist_ablation import doctor, tracking
    from mnist_ablation.redaction import printable, redact
    from mnist_ablation.storage import default_storage_url

    uri = tracking.use_tracking_uri(args.tracking_uri)
    storage_url = args.storage or default_storage_url(tracking.local_state_directory(uri))
    if storage_url.startswith("sqlite:///") and not os.path.exists(storage_url[len("sqlite:///"):]):
        storage_url = None  # no study ever ran a queue here
    diagnosis = doctor.diagnose(storage_url, stale_after=args.stale_after, grace_period=args.grace_period)
    print(f"store: {redact(uri)}")
    print(f"queue: {redact(storage_url) if storage_url else '(none)'}")
    print(f"running and alive: {len(diagnosis.alive)}")
    print(f"stale runs (RUNNING, but their process is gone): {len(diagnosis.stale)}")
    for stale in diagnosis.stale:
        print(f"  {printable(stale.experiment)} / {printable(stale.run_name)} ({stale.run_id}): "
              f"{printable(redact(stale.reason))}")
    print(f"stale queue trials: {diagnosis.stale_trials}")
    print(f"failed or killed runs: {len(diagnosis.failed)}")
    for experiment, name, status, reason in diagnosis.failed:
        print(f"  {printable(experiment)} / {printable(name)}: {status}: "
              f"{printable(redact(reason.splitlines()[0][:200] if reason else ''))}")
    for study, missing in diagnosis.missing_cells.items():
        print(f"study {printable(study)!r}: {len(missing)} cell(s) without a finished run: "
              f"{printable(', '.join(missing))}")
        print(f"  rerun the study's command to run them (e.g. python -m experiments.ablate --study {study} ...)")
    if diagnosis.stale or diagnosis.stale_trials:
        if args.mark_stale:
            marked = doctor.mark_stale(diagnosis, storage_url, grace_period=args.grace_period)
            print(f"marked {marked} stale run(s) KILLED and failed the stale queue trials; rerun to retry them")
        else:
            print("rerun with --mark-stale to mark them KILLED (a rerun of the study then retries them)")
    print("healthy" if diagnosis.healthy else "needs attention")
    return 0 if diagnosis.healthy else 1


if __name__ == "__main__":
    run_command(main)
