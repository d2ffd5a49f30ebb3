"""Arguments shared by the commands, turning them into a config, and running a command's main."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import signal
import sys
from collections.abc import Callable

# Quiet TensorFlow's C++ start-up chatter before anything imports it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

from mnist_ablation import defaults  # noqa: E402
from mnist_ablation.config import BASELINE, TrainConfig, parse_set_arguments, with_overrides  # noqa: E402
from mnist_ablation.data import DATA_DIR_ENV  # noqa: E402
from mnist_ablation.errors import UserError  # noqa: E402


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="override any config field (repeatable), e.g. --set batch_norm=false")
    parser.add_argument("--epochs", type=int, help="number of epochs (config field epochs; seed: 15)")
    parser.add_argument("--train-subset", type=int, metavar="N",
                        help="train on N images (stratified), for quick runs")


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default=None,
                        help=f"directory with the MNIST IDX files or mnist.npz (also ${DATA_DIR_ENV}); "
                             "unset: Keras downloads MNIST")


def add_tracking_arguments(parser: argparse.ArgumentParser, runs: bool = False) -> None:
    """--tracking-uri; with ``runs`` (commands that train), also --system-metrics."""
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (also $MLFLOW_TRACKING_URI); default sqlite:///mlruns/mlflow.db")
    if not runs:
        return
    parser.add_argument("--system-metrics", action="store_true",
                        help="record CPU, memory, disk, network (and GPU) use as system/* metrics of every run "
                             "(MLflow's system metrics; also MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=true)")


def add_equivalence_margin_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--equivalence-margin", type=float, default=defaults.EQUIVALENCE_MARGIN, metavar="M",
                        help="margin of the report's equivalence test (TOST), a fraction (default: %(default)s, "
                             "i.e. +-0.1 points)")


def add_smallest_effect_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--smallest-effect", type=float, default=None, metavar="E",
                        help="the smallest difference worth detecting, a fraction (default: the equivalence margin); "
                             "the report's \"about N seeds\" is the number that detects it with "
                             f"{round(100 * defaults.POWER)}%% power")


def check_smallest_effect(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.smallest_effect is not None:
        check_value(parser, defaults.check_smallest_effect, args.smallest_effect, "--smallest-effect")


def check_equivalence_margin(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    check_value(parser, defaults.check_equivalence_margin, args.equivalence_margin, "--equivalence-margin")


def check_value(parser: argparse.ArgumentParser, check: Callable, value, flag: str) -> None:
    """Check a flag's value with the library's own check (the one the library applies when it receives it), now,
    before anything runs; a bad value is a usage error naming the flag."""
    try:
        check(value, flag)
    except UserError as error:
        parser.error(str(error))


def apply_tracking_arguments(args: argparse.Namespace) -> None:
    """Process-wide tracking switches from the command line (worker processes inherit them)."""
    if getattr(args, "system_metrics", False):
        from mnist_ablation import tracking

        tracking.enable_system_metrics()


def config_from_arguments(args: argparse.Namespace, base: TrainConfig = BASELINE) -> TrainConfig:
    """``base`` with --set overrides, then the dedicated flags (which win)."""
    overrides = parse_set_arguments(args.overrides)
    for flag, field in (("epochs", "epochs"), ("seed", "seed"), ("train_subset", "train_subset")):
        value = getattr(args, flag, None)
        if value is not None:
            overrides[field] = value
    return with_overrides(base, overrides)


def check_output_directory(path: str | os.PathLike | None, flag: str = "--output") -> None:
    """Create ``path`` and prove a file can be written there, before any training (not after every cell)."""
    if path is None:
        return
    from pathlib import Path

    directory = Path(path)
    probe = directory / ".mnist_ablation-write-test"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise UserError(f"{flag} {str(path)!r} cannot be written ({error.strerror or error}); pass a directory you "
                        "can write to.") from None


def _quiet_libraries() -> None:
    """The commands print one line per cell or trial themselves; Optuna's INFO lines would repeat them.

    Optuna may be absent (a GPU machine that only trains --offline cells): then there is nothing to quiet.
    """
    if importlib.util.find_spec("optuna") is None:
        return
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)


class _BelowWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING


def show_library_lines() -> None:
    """The library reports progress through ``logging`` (``mnist_ablation.*``): a command prints its INFO lines
    as they come on stdout, its warnings on stderr, each as the bare message."""
    library = logging.getLogger("mnist_ablation")
    if any(getattr(handler, "_command_handler", False) for handler in library.handlers):
        return
    lines, warnings = logging.StreamHandler(sys.stdout), logging.StreamHandler(sys.stderr)
    lines.addFilter(_BelowWarning())
    warnings.setLevel(logging.WARNING)
    for handler in (lines, warnings):
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._command_handler = True
        library.addHandler(handler)
    library.setLevel(logging.INFO)
    library.propagate = False


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


# Set (to 1) to see the traceback under a tracking server's failure, which otherwise prints as one line.
TRACEBACK_ENV = "MNIST_ABLATION_TRACEBACK"


def _tracking_server_failure(error: Exception) -> str | None:
    """The library's one line for a request the tracking server failed, or None (then it is a bug)."""
    if "mlflow" not in sys.modules:  # nothing has talked to a tracking server
        return None
    try:
        from mnist_ablation.tracking import server_failure

        return server_failure(error)
    except Exception:  # noqa: BLE001 - explaining must never hide the error: its traceback prints instead
        return None


def run_command(main: Callable[[], int]) -> None:
    """Run a command's main; user errors print one clear line and exit 2, a request the MLflow tracking server
    failed (an error answer, no answer) one line and exit 1 (with its traceback too when $MNIST_ABLATION_TRACEBACK
    is 1), anything else is a bug (traceback, exit 1). Whatever is printed has its credentials hidden: the secrets
    of every URL on the command line and in the tracking environment variables are remembered first, so even a
    traceback quoting one shows ``***``."""
    import traceback

    from mnist_ablation.redaction import redact, remember_secret, remember_secrets

    remember_secrets(*sys.argv[1:], os.environ.get("MLFLOW_TRACKING_URI"))
    remember_secret(os.environ.get("MLFLOW_TRACKING_PASSWORD"))
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    _quiet_libraries()
    show_library_lines()
    try:
        sys.exit(main())
    except UserError as error:
        print(f"error: {redact(str(error))}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        # SIGINT or SIGTERM: the run in progress has been marked KILLED (never FINISHED) on the way out.
        print("\ninterrupted: the current run was marked KILLED in MLflow; rerun the same command to resume.",
              file=sys.stderr)
        sys.exit(130)
    except Exception as error:  # a bug, or a library failing in a way it does not explain: the traceback, redacted
        failure = _tracking_server_failure(error)
        show_traceback = os.environ.get(TRACEBACK_ENV, "").strip().lower() in ("1", "true", "yes")
        if failure is None or show_traceback:
            print(redact(traceback.format_exc()), file=sys.stderr, end="")
        if failure is not None:
            hint = "" if show_traceback else f" ({TRACEBACK_ENV}=1 shows the traceback)"
            print(f"error: {redact(failure)}{hint}", file=sys.stderr)
        sys.exit(1)
