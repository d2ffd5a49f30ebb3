"""``python -m experiments.serve``: the model explorer, a web page and JSON API over runs in MLflow.

Offers one or more runs (``--run-id``, repeatable; the first is the default) or the runs of an ablation study
(``--study``: the best seed of each arm by final validation accuracy, or every cell's latest finished run
with ``--all-runs``). Listens on 127.0.0.1 by default and answers only requests whose Host header is 127.0.0.1,
localhost, the ``--host`` given or an ``--allowed-host``. Reference: docs/explorer.md.

    python -m experiments.serve --study leave-one-out
    python -m experiments.serve --run-id RUN_A --run-id RUN_B --port 8001
"""

from __future__ import annotations

import argparse

from experiments.cli import add_data_arguments, add_tracking_arguments, run_command
from mnist_ablation.naming import DEFAULT_MLFLOW_UI_URL

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--run-id", action="append", metavar="ID",
                       help="MLflow run to serve (repeatable: the first is the default, the others can be compared)")
    which.add_argument("--study", metavar="NAME",
                       help="serve the runs of the ablation study NAME (experiment ablation/NAME)")
    parser.add_argument("--all-runs", action="store_true",
                        help="with --study: offer every cell's latest finished run, not only the best seed per arm")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    parser.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                        help="also answer requests for Host NAME (repeatable), e.g. the machine's name when "
                             "listening on 0.0.0.0; 127.0.0.1, localhost and --host are always allowed")
    add_tracking_arguments(parser)
    add_data_arguments(parser)
    parser.add_argument("--mlflow-ui-url", default=DEFAULT_MLFLOW_UI_URL,
                        help="base URL of the MLflow UI for the run links (default: %(default)s)")
    parser.add_argument("--log-level", default="info", choices=LOG_LEVELS,
                        help="uvicorn log level (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.all_runs and not args.study:
        parser.error("--all-runs applies to --study NAME only")
    if not 1 <= args.port <= 65535:
        parser.error(f"--port {args.port} is not a TCP port; use 1..65535")
    return args


def describe_offered(runs) -> str:
    """``label [run id], ...`` of the offered runs; labels come from the store, so control characters are escaped."""
    from mnist_ablation.redaction import printable

    return ", ".join(f"{printable(run.label)} [{run.run_id}]" for run in runs)


def main(argv=None) -> int:
    args = parse_args(argv)
    from mnist_ablation import serve
    from mnist_ablation.explorer import open_explorer
    from mnist_ablation.redaction import printable

    explorer = open_explorer(study=args.study, run_ids=args.run_id, all_runs=args.all_runs,
                             tracking_uri=args.tracking_uri, data_dir=args.data_dir, mlflow_ui_url=args.mlflow_ui_url)
    print(f"serving {describe_offered(explorer.runs.values())} at http://{args.host}:{args.port}/", flush=True)
    for reason in explorer.refused.values():
        print(f"note: {printable(reason)}; that run answers 503.", flush=True)
    if args.host in ("0.0.0.0", "::") and not args.allowed_host:
        print(f"note: listening on {args.host}, but only requests for Host 127.0.0.1 or localhost are answered; "
              "pass --allowed-host NAME for each name clients use to reach this machine.", flush=True)
    serve.run_server(explorer, host=args.host, port=args.port, allowed_hosts=args.allowed_host,
                     log_level=args.log_level)
    return 0


if __name__ == "__main__":
    run_command(main)
