"""``python -m experiments.ablate``: run a named ablation study (arms x seeds), tracked in MLflow.

Every (arm, seed) cell is a nested MLflow run under one parent run per study. Running the same command
again skips finished cells, reruns failed or interrupted ones, and never overwrites earlier runs.
Cells are handed out through an Optuna RDB storage, so several workers (``--workers N`` on this
machine, or the same command on several machines with a shared ``--storage`` and ``--tracking-uri``)
run each cell exactly once.

On a machine without the tracking stack (a GPU box with JAX and no TensorFlow or MLflow, say),
``--offline DIR`` trains the cells with the same trainer into one folder each; ``--import-offline DIR``
then logs them into the study from a machine that has the store.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from experiments.cli import (
    add_config_arguments,
    add_data_arguments,
    add_equivalence_margin_argument,
    add_smallest_effect_argument,
    add_tracking_arguments,
    apply_tracking_arguments,
    check_equivalence_margin,
    check_output_directory,
    check_smallest_effect,
    run_command,
)
from mnist_ablation import defaults
from mnist_ablation.config import TrainConfig, parse_set_arguments, with_overrides
from mnist_ablation.redaction import printable, redact, redact_argv
from mnist_ablation.studies import DEFAULT_STUDY, STUDIES, Study, describe_identical, identical_arms

# Batch norm's moving statistics (momentum 0.99) lag the fast-changing early network: measured here, a
# baseline run of 6,000 images x 2 epochs (376 steps) trains to 87% but scores 26% at test time (its
# validation accuracy after 375 steps of the next preset is 16%); 12,000 x 2 (750 steps) scores 98%.
QUICK_PRESET = {"train_subset": 12000, "epochs": 2, "seeds": 2}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.ablate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", default=None,
                        help=f"study name (default: {DEFAULT_STUDY}); see --list. A study first run from a "
                             "--study-file is found by its name in the tracking store")
    parser.add_argument("--study-file", metavar="FILE", default=None,
                        help="run the study a TOML file of your own defines (name, question, [baseline], "
                             "[arms.NAME]; docs/studies.md); it is recorded with the study")
    parser.add_argument("--arms", default=None, help="comma-separated subset of the study's arms (default: all)")
    parser.add_argument("--seeds", type=int, default=None, help="run seeds 0..N-1 per arm (default 3)")
    parser.add_argument("--target-ci-width", type=float, default=None, metavar="W",
                        help="precision-driven seeding (Stein's two-stage rule): from each arm's first --seeds "
                             "alone, decide once how many seeds make its "
                             f"{100 * defaults.CONFIDENCE:.0f}%% interval of the difference from the baseline at most "
                             "W wide (0.001 = 0.1 points), capped at --max-seeds and stopped where the test set "
                             "limits it; the final interval keeps the first stage's seed variance")
    parser.add_argument("--max-seeds", type=int, default=None, metavar="M",
                        help=f"with --target-ci-width: at most M seeds per arm (default: {defaults.MAX_SEEDS})")
    add_equivalence_margin_argument(parser)
    add_smallest_effect_argument(parser)
    add_config_arguments(parser)
    parser.add_argument("--quick", action="store_true",
                        help=f"a first look in minutes: {QUICK_PRESET} (explicit flags win)")
    parser.add_argument("--list", action="store_true", help="print the studies and their arms, then exit")
    parser.add_argument("--workers", type=int, default=1,
                        help="run N worker processes on this machine, sharing the cores (default 1)")
    parser.add_argument("--pack", type=int, default=1, metavar="K",
                        help="train up to K claimed cells that share a model structure together in one process, one "
                             "compiled step per batch (Keras on JAX, selected for this command's processes); "
                             "1 = one cell at a time, the default trainer (see docs/ablate.md#packing)")
    parser.add_argument("--storage", default=None,
                        help="Optuna RDB storage URL for the cell queue (default sqlite:///mlruns/optuna.db; "
                             "postgresql://... to share a study between machines)")
    parser.add_argument("--no-report", action="store_true", help="do not write the statistical report at the end")
    parser.add_argument("--output", default=None, help="directory for the report (default reports/<study>)")
    parser.add_argument("--heartbeat-interval", type=int, default=10,
                        help="seconds between a worker's heartbeats in the queue (default: %(default)s)")
    parser.add_argument("--grace-period", type=int, default=60,
                        help="seconds without a heartbeat before a worker counts as dead and its cell is retried "
                             "(default: %(default)s)")
    parser.add_argument("--worker-only", action="store_true",
                        help="only run cells; skip the summary and the report (for extra workers)")
    parser.add_argument("--offline", metavar="DIR", default=None,
                        help="train the cells without MLflow or Optuna (any Keras backend, e.g. KERAS_BACKEND=jax), "
                             "one folder per cell in DIR, --workers at a time (with --pack K, packs of up to K "
                             "cells); rerunning skips saved cells")
    parser.add_argument("--import-offline", metavar="DIR", default=None,
                        help="log the cells saved by --offline in DIR into this study (same --study, --seeds, "
                             "--epochs, --train-subset, --set), then summarise as usual")
    add_data_arguments(parser)
    add_tracking_arguments(parser, runs=True)
    args = parser.parse_args(argv)
    if args.study and args.study_file:
        parser.error("--study and --study-file: choose one (the file names its study)")
    if not args.study_file:
        args.study = args.study or DEFAULT_STUDY
    if args.offline and args.import_offline:
        parser.error("--offline and --import-offline: choose one (train offline, then import on the tracking machine)")
    if args.quick:
        for key, value in QUICK_PRESET.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
    if args.seeds is None:
        args.seeds = 3
    check_equivalence_margin(parser, args)
    check_smallest_effect(parser, args)
    if args.workers < 1:
        parser.error(f"--workers {args.workers}: expected an integer >= 1")
    if args.pack < 1:
        parser.error(f"--pack {args.pack}: expected an integer >= 1 (1 = no packing)")
    if args.pack > 1 and importlib.util.find_spec("jax") is None:
        parser.error(f"--pack {args.pack} needs JAX (Keras' JAX backend), which is not installed: "
                     'pip install -e ".[test]" (or ".[jax]") installs it; or use --pack 1')
    return args


def list_studies(studies) -> str:
    lines = []
    for study in studies:
        lines.append(f"{study.name}: {study.description}")
        for arm in study.arms:
            diff = study.overrides(arm)
            lines.append(f"    {arm:32s} {json.dumps(diff) if diff else '(the study baseline)'}")
    return "\n".join(lines)


def recorded_study(name: str, tracking_uri: str | None) -> Study:
    """The study a ``--study-file`` recorded in the tracking store under ``name`` (reads the store: MLflow)."""
    from mnist_ablation import store, tracking

    tracking.ensure_tracking_uri(tracking_uri)
    return store.get_study(name)


def study_configs(study: Study, args: argparse.Namespace, paired: bool = False) -> dict[str, TrainConfig]:
    """Each selected arm's config with the command line's overrides applied (validated here, before any run).

    ``paired`` (a precision rule): the baseline arm is always run, since every added seed is paired with it.
    """
    overrides = parse_set_arguments(args.overrides)
    for flag in ("epochs", "train_subset"):
        if getattr(args, flag) is not None:
            overrides[flag] = getattr(args, flag)
    arms = list(study.arms) if not args.arms else [a.strip() for a in args.arms.split(",") if a.strip()]
    if paired and study.baseline_arm not in arms:
        arms.insert(0, study.baseline_arm)
    return {arm: with_overrides(study.arm(arm), overrides) for arm in arms}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.pack > 1:
        select_jax_backend()
    if args.study_file:
        from mnist_ablation.study_file import load_study_file

        study = load_study_file(args.study_file)  # checked before anything runs
        args.study = study.name
    if args.list:
        print(list_studies([study] if args.study_file else STUDIES.values()))
        return 0
    from mnist_ablation import sweep

    if not args.study_file:
        study = STUDIES[args.study] if args.study in STUDIES else recorded_study(args.study, args.tracking_uri)
    precision = sweep.PrecisionRule.from_options(args.target_ci_width, args.max_seeds)
    configs = study_configs(study, args, paired=precision is not None)
    for group in identical_arms(configs):
        print(f"note: {describe_identical(configs, group)}.", flush=True)
    if args.offline:
        return run_offline(study, configs, args)
    if not args.no_report and not args.worker_only:
        check_output_directory(args.output)  # a report that cannot be written fails now, not after every cell
    from mnist_ablation import ablation

    apply_tracking_arguments(args)
    # Opening the runner checks the stores and the data, and creates the MLflow and queue databases, so
    # that workers started next never race to create the same tables.
    runner = ablation.StudyRunner.open(
        study, configs, seeds=range(args.seeds), data_dir=args.data_dir, tracking_uri=args.tracking_uri,
        storage_url=args.storage, heartbeat_interval=args.heartbeat_interval, grace_period=args.grace_period,
        command=recorded_command(args, argv), precision=precision, observer=ProgressObserver(), pack=args.pack,
    )
    if args.import_offline:
        from mnist_ablation.offline_import import import_offline

        imported, skipped, problems = import_offline(runner, args.import_offline)
        print(f"imported {imported} cell(s) from {args.import_offline}, {skipped} already in the study")
        for problem in problems:
            print(f"not imported: {problem}", file=sys.stderr)
        return max(finish(runner, args, failed=0), 1 if problems else 0)
    if args.workers > 1 and not args.worker_only:
        codes = launch_workers(runner, args, argv if argv is not None else sys.argv[1:])
        return finish(runner, args, failed=sum(1 for code in codes if code != 0))
    outcome = runner.run_worker()
    if args.worker_only:
        return 1 if outcome.failed else 0
    return finish(runner, args, failed=outcome.failed)


def select_jax_backend() -> None:
    """Packing trains on Keras' JAX backend: select it for this process (and the workers it starts, which inherit
    the environment) before Keras is imported."""
    if "keras" in sys.modules and sys.modules["keras"].backend.backend() != "jax":
        raise SystemExit("--pack needs Keras on JAX, but Keras was already imported on another backend in this "
                         "process; run the command in a fresh process (python -m experiments.ablate ...).")
    os.environ["KERAS_BACKEND"] = "jax"


def run_offline(study: Study, configs: dict[str, TrainConfig], args: argparse.Namespace) -> int:
    """``--offline DIR``: train the cells into folders, with no tracking store."""
    from mnist_ablation import offline

    started = time.perf_counter()
    trained, skipped, failures = offline.run_offline(study, configs, range(args.seeds), args.data_dir, args.offline,
                                                     workers=args.workers, report=_print_flushed, pack=args.pack)
    print(f"trained {trained} cell(s) in {time.perf_counter() - started:.0f} s ({skipped} already saved) into "
          f"{args.offline}; log them with: python -m experiments.ablate {study_flag(args)} --seeds {args.seeds} "
          f"--import-offline {args.offline} (plus the same --epochs/--train-subset/--set)")
    for failure in failures:
        print(f"FAILED {failure}", file=sys.stderr)
    return 1 if failures else 0


def study_flag(args: argparse.Namespace) -> str:
    """How a follow-up command names this study: its file when it came from one (the store may not have it yet)."""
    return f"--study-file {args.study_file}" if args.study_file else f"--study {args.study}"


def launch_workers(runner, args: argparse.Namespace, argv: list[str]) -> list[int]:
    """Run ``--workers`` copies of this command as worker processes, splitting the cores between them.

    Each worker writes its own progress to a log file; this process shows one line for the whole sweep.
    """
    threads = max(1, (os.cpu_count() or 1) // args.workers)
    log_dir = worker_log_directory(runner)
    command = [sys.executable, "-m", "experiments.ablate", *argv, "--worker-only", "--set", f"threads={threads}"]
    print(f"starting {args.workers} workers with {threads} thread(s) each; their logs: {log_dir}", flush=True)
    processes = []
    for index in range(args.workers):
        with open(log_dir / f"worker-{index}.log", "w") as handle:  # the worker keeps its own copy
            processes.append(subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT))
    try:
        watch(runner, processes)
        return [process.wait() for process in processes]
    except KeyboardInterrupt:
        # Workers got the same SIGINT: they mark their runs KILLED and exit; wait for that.
        for process in processes:
            process.wait()
        raise


def worker_log_directory(runner) -> Path:
    """Where the worker processes of this sweep on this machine write their output (beside the store)."""
    from mnist_ablation.tracking import local_state_directory

    directory = local_state_directory(runner.tracking_uri) / "logs" / runner.study.name / runner.plan.digest
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def _print_flushed(text: str) -> None:
    print(text, flush=True)


class ProgressObserver:
    """Draws a worker's sweep: a progress bar per queue round, the running cell's epoch, and the runner's lines."""

    def __init__(self):
        self.bar = None

    def line(self, text: str) -> None:
        if self.bar is not None:
            tqdm.write(text)
        else:
            print(text, flush=True)

    def round_started(self, label: str, total: int, settled: int) -> None:
        self.bar = tqdm(total=total, desc=label, unit="cell", dynamic_ncols=True, file=sys.stdout, smoothing=0)
        self.bar.update(settled)

    def cell_started(self, label: str) -> None:
        self.bar.set_postfix_str(f"{label} starting")

    def epoch_ended(self, label: str, epoch: int, epochs: int, logs) -> None:
        self.bar.set_postfix_str(f"{label} epoch {epoch + 1}/{epochs} loss {logs.get('loss', float('nan')):.3f} "
                                 f"val_acc {logs.get('val_accuracy', float('nan')):.4f}")

    def cell_settled(self) -> None:
        self.bar.update(1)

    def round_ended(self) -> None:
        self.bar.close()
        self.bar = None


def watch(runner, processes: list[subprocess.Popen], poll_seconds: float = 2.0) -> None:
    """One progress line for the whole sweep while ``processes`` run: per round, done / total, running, ETA."""
    bar, current, shown = None, None, None
    # On a terminal the line redraws in place; in a log file, a new line only every half minute.
    interval = 0.5 if sys.stdout.isatty() else 30.0
    try:
        while any(process.poll() is None for process in processes):
            round_study = runner.queue.latest_round()
            if round_study is not None:
                label, progress = runner.round_label(round_study), runner.queue.progress(round_study)
                if label != current:
                    if bar is not None:
                        bar.close()
                        still_open = sorted({c.arm for c in progress.cells} - {runner.plan.baseline})
                        print(f"precision round {label.rsplit(' ', 1)[-1]}: arms still open: {', '.join(still_open)}",
                              flush=True)
                    current = label
                    bar = tqdm(total=len(progress.cells), unit="cell", dynamic_ncols=True, desc=label,
                               file=sys.stdout, mininterval=interval, smoothing=0)  # ETA from the round's throughput
                if bar.total != len(progress.cells):  # the round's creator may still be publishing its cells
                    bar.total = len(progress.cells)
                bar.update(progress.settled - bar.n)
                running = progress.running
                text = f"running {len(running)}: {', '.join(c.key for c in running)}" + (
                    f"; {progress.failed} failed" if progress.failed else "")
                if text != shown:
                    bar.set_postfix_str(text, refresh=False)
                    shown = text
            time.sleep(poll_seconds)
    finally:
        if bar is not None:
            bar.close()


def recorded_command(args: argparse.Namespace, argv=None) -> list[str]:
    """This command as it reproduces the study from anywhere: module form, with the study and the store named."""
    command = ["python", "-m", "experiments.ablate",
               *[a for a in (sys.argv[1:] if argv is None else argv) if a != "--worker-only"]]
    if "--study" not in command and "--study-file" not in command:
        command += ["--study", args.study]
    if "--tracking-uri" not in command:
        from mnist_ablation.tracking import resolve_tracking_uri

        command += ["--tracking-uri", resolve_tracking_uri(args.tracking_uri)]
    return command


def finish(runner, args: argparse.Namespace, failed: int) -> int:
    """Summary table, summary.csv on the parent run, the report, and where to look."""
    from mnist_ablation import compare, tracking

    summary = compare.study_summary(runner.study.name, runner.plan.baseline)
    tracking.log_study_summary(runner.parent_run_id, summary)
    print()
    print(f"Study {runner.study.name!r}: test accuracy per arm over seeds (finished runs)")
    print(printable(summary.to_string(index=False, float_format=lambda v: f"{v:.4f}"), lines=True))
    if not args.no_report:
        report_command = ["python", "-m", "experiments.report", "--study", args.study,
                          "--tracking-uri", runner.tracking_uri, "--equivalence-margin", str(args.equivalence_margin)]
        if args.smallest_effect is not None:
            report_command += ["--smallest-effect", str(args.smallest_effect)]
        from mnist_ablation.report import write_study_report

        report = write_study_report(runner.study.name, output_dir=args.output, parent_run_id=runner.parent_run_id,
                                    equivalence_margin=args.equivalence_margin,
                                    report_command=redact_argv(report_command), smallest_effect=args.smallest_effect)
        print(f"report: {report.html_path} (also under report/ on the parent run)")
    print()
    print(f"MLflow: experiment {runner.experiment_name!r}, parent run {runner.parent_run_id}")
    print(f"  browse: mlflow ui --backend-store-uri {redact(runner.tracking_uri)}")
    print(f"  pandas: from mnist_ablation import compare; compare.study_runs({runner.study.name!r})")
    if failed:
        print(f"{failed} cell(s) failed; their reasons are in MLflow (tag failure_reason). "
              "Rerun the same command to retry them.")
    return 1 if failed else 0


if __name__ == "__main__":
    run_command(main)
