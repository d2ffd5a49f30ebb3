"""``python -m experiments.report``: the statistical report of an ablation study.

Per arm against the baseline: mean test accuracy with a 95% interval, the paired difference (same
seeds) with its interval, paired t-test and Wilcoxon, McNemar on the per-example predictions, Holm over
the arms, Cohen's d_z; for the factorial study main effects and interactions; learning-curve summaries.
Writes ablation_summary.csv, figures, report.html (self-contained) and report.md to --output, and logs
them to the study's parent run under report/. ``python -m experiments.ablate`` runs this at its end.
"""

from __future__ import annotations

import argparse

from experiments.cli import add_data_arguments, add_tracking_arguments, run_command
from mnist_ablation.studies import DEFAULT_STUDY


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", default=DEFAULT_STUDY, help="study name (default: %(default)s)")
    parser.add_argument("--output", default=None, help="directory for the report (default reports/<study>)")
    parser.add_argument("--threshold", type=float, default=0.99,
                        help="validation accuracy for 'epochs to reach' in the learning-curve summary "
                             "(default: %(default)s)")
    parser.add_argument("--confidence", type=float, default=0.95,
                        help="confidence level of the intervals (default: %(default)s)")
    parser.add_argument("--no-mlflow-log", action="store_true",
                        help="write the files only; do not log them to the study's parent run")
    add_data_arguments(parser)
    add_tracking_arguments(parser)
    args = parser.parse_args(argv)
    if not 0 < args.threshold <= 1:
        parser.error(f"--threshold {args.threshold}: expected a validation accuracy in (0, 1], e.g. 0.99")
    if not 0 < args.confidence < 1:
        parser.error(f"--confidence {args.confidence}: expected a level between 0 and 1, e.g. 0.95")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from mnist_ablation import report, tracking

    tracking.use_tracking_uri(args.tracking_uri)
    result = report.write_study_report(
        args.study, output_dir=args.output, data_dir=args.data_dir, threshold=args.threshold,
        confidence=args.confidence, log_to_mlflow=not args.no_mlflow_log,
    )
    columns = ["arm", "n_seeds", "test_accuracy_mean", "delta_vs_baseline", "delta_ci_low", "delta_ci_high",
               "p_value_holm", "mcnemar_p_value", "status"]
    print(f"Study {args.study!r}: each arm against the baseline")
    print(result.summary[columns].to_string(index=False, float_format=lambda v: f"{v:.4f}", na_rep="n/a"))
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
