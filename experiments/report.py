"""``python -m experiments.report``: the statistical report of an ablation study.

Per arm against the baseline, with training seeds and test images both random: mean test accuracy with its
interval, the paired difference with its interval, Holm-corrected p-values, the equivalence test (TOST) at
--equivalence-margin, the smallest effect the design can see and the seeds a clearer answer would take; for
the factorial study its main effects and interactions; learning-curve summaries. Writes
ablation_summary.csv, figures, report.html (self-contained) and report.md to --output, and logs them to the
study's parent run under report/. ``python -m experiments.ablate`` runs this at its end.
"""

from __future__ import annotations

import argparse
import sys

from experiments.cli import (
    add_data_arguments,
    add_equivalence_margin_argument,
    add_smallest_effect_argument,
    add_tracking_arguments,
    check_equivalence_margin,
    check_smallest_effect,
    check_value,
    run_command,
)
from mnist_ablation import defaults
from mnist_ablation.studies import DEFAULT_STUDY

COLUMNS = ["arm", "n_seeds", "n_pairs", "test_accuracy_mean", "delta_vs_baseline", "delta_ci_low", "delta_ci_high",
           "p_value_holm", "equivalence_p_value_holm", "mde", "verdict"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", default=DEFAULT_STUDY, help="study name (default: %(default)s)")
    parser.add_argument("--output", default=None, help="directory for the report (default reports/<study>)")
    parser.add_argument("--threshold", type=float, default=defaults.LEARNING_CURVE_THRESHOLD,
                        help="validation accuracy for 'epochs to reach' in the learning-curve summary "
                             "(default: %(default)s)")
    parser.add_argument("--confidence", type=float, default=defaults.CONFIDENCE,
                        help="confidence level of the intervals (default: %(default)s)")
    add_equivalence_margin_argument(parser)
    add_smallest_effect_argument(parser)
    parser.add_argument("--target-ci-width", type=float, default=None, metavar="W",
                        help="also print, per arm, about how many seeds would make its difference interval at most "
                             "W wide (a fraction: 0.001 = 0.1 points), to plan before spending compute")
    parser.add_argument("--no-mlflow-log", action="store_true",
                        help="write the files only; do not log them to the study's parent run")
    add_data_arguments(parser)
    add_tracking_arguments(parser)
    args = parser.parse_args(argv)
    check_value(parser, defaults.check_threshold, args.threshold, "--threshold")
    check_value(parser, defaults.check_confidence, args.confidence, "--confidence")
    check_equivalence_margin(parser, args)
    check_smallest_effect(parser, args)
    if args.target_ci_width is not None:
        check_value(parser, defaults.check_target_ci_width, args.target_ci_width, "--target-ci-width")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from mnist_ablation import report, tracking
    from mnist_ablation.redaction import printable, redact, redact_argv

    uri = tracking.use_tracking_uri(args.tracking_uri)
    command = ["python", "-m", "experiments.report", *(sys.argv[1:] if argv is None else argv)]
    if "--tracking-uri" not in command:
        command += ["--tracking-uri", redact(uri)]
    result = report.write_study_report(
        args.study, output_dir=args.output, data_dir=args.data_dir, threshold=args.threshold,
        confidence=args.confidence, log_to_mlflow=not args.no_mlflow_log,
        equivalence_margin=args.equivalence_margin, report_command=redact_argv(command),
        smallest_effect=args.smallest_effect,
    )
    print(f"Study {args.study!r}: each arm against the baseline (fractions; intervals with seeds and test images "
          "random)")
    shown = result.summary[COLUMNS].astype({"mde": object})
    beyond = result.summary.apply(report.visible_beyond_range, axis=1)
    shown.loc[beyond, "mde"] = "beyond range"  # no number past what accuracy allows
    print(printable(shown.to_string(index=False, float_format=lambda v: f"{v:.4f}", na_rep="n/a"),
                    lines=True))  # arm names come from the store
    if args.target_ci_width is not None:
        plan = report.seeds_plan(result.data, args.target_ci_width, args.confidence)
        print(f"\nSeeds per arm for a {round(100 * args.confidence)}% difference interval at most "
              f"{100 * args.target_ci_width:.2f} points wide with 80% probability (from the variance components; "
              "inf: the test set's own floor is wider):")
        print(plan.to_string(index=False, float_format=lambda v: f"{v:.4f}", na_rep="n/a"))
    for note in result.notes:
        print(f"note: {note}")
    print(f"report: {result.html_path.resolve()}")
    print(f"        {(result.output_dir / 'report.md').resolve()}, "
          f"{(result.output_dir / 'ablation_summary.csv').resolve()}")
    if not args.no_mlflow_log:
        print(f"logged under {report.REPORT_ARTIFACT_DIR}/ on the study's parent run")
    return 0


if __name__ == "__main__":
    run_command(main)
