"""The report of an ablation study: which differences from the baseline are real, as tables, figures and a page.

    from mnist_ablation import ablation_summary, factorial_analysis, learning_curves, write_study_report
    ablation_summary("leave-one-out")        # one row per arm: accuracy, paired difference, intervals, verdict
    write_study_report("leave-one-out")      # reports/leave-one-out/{ablation_summary.csv, report.html, report.md}

Data -> statistics -> figures -> templates, one module each: ``gather`` reads the study from the store,
``analysis`` turns it into the summary table and sentences (numbers from ``mnist_ablation.stats``),
``figures`` draws, ``render`` fills the Jinja2 templates (HTML and Markdown, autoescaped) and this module
writes the files and logs them under ``report/`` on the study's parent run.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .. import stats, tracking
from ..naming import REPORT_ARTIFACT_DIR
from . import analysis, figures, render
from .analysis import SUMMARY_COLUMNS, seeds_plan, summary_table, visible_beyond_range
from .gather import StudyData, failure_reasons, gather_study, load_test_images

DEFAULT_REPORT_ROOT = Path("reports")
DEFAULT_THRESHOLD = stats.DEFAULT_THRESHOLD

__all__ = ["Report", "SUMMARY_COLUMNS", "StudyData", "ablation_summary", "build_report", "factorial_analysis",
           "gather_study", "learning_curves", "seeds_needed", "seeds_plan", "summary_table", "visible_beyond_range",
           "write_study_report"]


def ablation_summary(study: str, tracking_uri: str | None = None, confidence: float = stats.DEFAULT_CONFIDENCE,
                     equivalence_margin: float = stats.DEFAULT_EQUIVALENCE_MARGIN,
                     smallest_effect: float | None = None) -> pd.DataFrame:
    """One row per arm of ``study`` against its baseline (the columns of ablation_summary.csv)."""
    return summary_table(gather_study(study, tracking_uri, histories=False), confidence, equivalence_margin,
                         smallest_effect)


def factorial_analysis(study: str = "factorial", tracking_uri: str | None = None,
                       confidence: float = stats.DEFAULT_CONFIDENCE) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(effects, ANOVA): every factorial term with seeds and images random, and the block model's ANOVA."""
    section = analysis.factorial_section(gather_study(study, tracking_uri, histories=False), confidence)
    if section is None or section.get("effects") is None:
        reason = "; ".join(section["notes"]) if section else f"study {study!r} is not a factorial study"
        raise ValueError(f"no factorial analysis for study {study!r}: {reason}")
    return section["effects"], section.get("anova")


def learning_curves(study: str, tracking_uri: str | None = None, threshold: float = DEFAULT_THRESHOLD,
                    per_run: bool = False) -> pd.DataFrame:
    """Per arm (or per run): epochs to reach ``threshold`` validation accuracy, best epoch, final train-val gap."""
    data = gather_study(study, tracking_uri, predictions=False)
    table = stats.learning_curve_table(data.histories, threshold)
    return table if per_run else stats.learning_curve_summary(table, threshold)


def seeds_needed(study: str, target_ci_width: float, tracking_uri: str | None = None,
                 confidence: float = stats.DEFAULT_CONFIDENCE) -> pd.DataFrame:
    """Per compared arm: its interval's width now, the test set's floor, and the seeds that would reach the target."""
    return analysis.seeds_plan(gather_study(study, tracking_uri, histories=False), target_ci_width, confidence)


@dataclass
class Report:
    """What ``write_study_report`` produced."""

    output_dir: Path
    summary: pd.DataFrame
    files: list[Path]
    notes: list[str]
    data: StudyData  # what the report was computed from (``seeds_plan`` reads it without a second gather)

    @property
    def html_path(self) -> Path:
        return self.output_dir / "report.html"


def method_paragraphs(confidence: float, threshold: float, margin: float) -> list[str]:
    level = f"{round(100 * confidence)}%"
    return [
        "The unit of inference is the recipe, not one trained model and not this test set: a finding such as "
        "“batch norm is worth 0.1 points” is about training with new seeds and testing on new images. Every run "
        "is scored on the same 10,000 test images, so training seeds and test images are crossed, and both are "
        "random in every interval and test here (a two-way random-effects analysis, as in multi-reader "
        "multi-case studies; Bouthillier et al. 2021 on seeds and test sets, Dietterich 1998 on comparing "
        "learners). docs/statistics.md has the method and its calibration.",
        f"Each arm is compared with the baseline on the seeds both finished (paired by seed). Δ is the arm's "
        f"accuracy minus the baseline's in percentage points, with its {level} interval; p-values are corrected "
        "with Holm over every compared arm. “Matters” means Holm p < 0.05. “Negligible” means the two one-sided "
        f"tests (TOST) place the difference within ±{100 * margin:.2f} points (Holm-corrected). Anything else is "
        "“inconclusive”: the data cannot tell, which is not the same as “no effect”.",
        "Power: the smallest visible effect is the difference this design detects with 80% power at the "
        "Holm-corrected level (checked by simulation; never more than accuracy's range: beyond it the report says "
        "no difference would be seen); smaller effects cannot be seen with these seeds. “About N seeds” is for the "
        "effect stated with --smallest-effect (default: the equivalence margin), from the variance components, "
        "never from the observed difference; “the test set limits” it only where infinitely many seeds would "
        "still miss that effect. More seeds shrink only the seed part of an interval; the test set's own "
        "sampling error is a floor no number of seeds removes.",
        "Few seeds: the seed part of every interval is never taken below what the runs' own per-image noise "
        "implies (with 2-3 seeds the seed variance is often small by chance, which made intervals too narrow), "
        "and an interval that cannot be computed is shown as such, never as zero width. With 2 seeds only large "
        "effects can be seen. The per-seed figure shows every paired seed's difference and the worst one: a "
        "failure rarer than about 1 in n seeds cannot be seen with n seeds, by this report or any test. An arm "
        "that shares no seed with the baseline gets an unpaired comparison, labelled as such.",
        "The “this test set only” columns treat the 10,000 images as fixed (a paired t-test over seeds): they "
        "describe these trained models on these images, are narrower, and do not support claims about the "
        "recipe. An arm's accuracy interval is built on the logit scale, so it stays within 0–100%.",
        f"Learning curves: epochs to reach {threshold:.2%} validation accuracy (first epoch at or above it, "
        "averaged over the seeds that reach it), the best epoch by validation accuracy, and the final gap between "
        "training and validation accuracy (negative when augmentation and dropout make the training pass harder).",
    ]


def write_study_report(study_name: str, output_dir: str | os.PathLike | None = None,
                       parent_run_id: str | None = None, *, tracking_uri: str | None = None,
                       data_dir: str | os.PathLike | None = None, threshold: float = DEFAULT_THRESHOLD,
                       confidence: float = stats.DEFAULT_CONFIDENCE, log_to_mlflow: bool = True,
                       equivalence_margin: float = stats.DEFAULT_EQUIVALENCE_MARGIN,
                       report_command: Sequence[str] | None = None, smallest_effect: float | None = None) -> Report:
    """Compute the study's statistics, write CSVs, figures, report.html and report.md, log them under ``report/``.

    ``output_dir`` None means ``reports/<study>``; ``parent_run_id`` None means the study's parent run;
    ``report_command`` is the command that regenerates this report, shown under "Reproduce";
    ``smallest_effect`` (a fraction; default the equivalence margin) is the effect the planning sentences are for.
    """
    if smallest_effect is not None:
        stats.check_smallest_effect(smallest_effect)
    data = gather_study(study_name, tracking_uri)
    if parent_run_id is not None:
        data.parent_run_id = parent_run_id
    output = Path(output_dir) if output_dir is not None else DEFAULT_REPORT_ROOT / study_name
    report = build_report(data, output, data_dir=data_dir, threshold=threshold, confidence=confidence,
                          equivalence_margin=equivalence_margin, report_command=report_command,
                          smallest_effect=smallest_effect)
    if log_to_mlflow and data.parent_run_id:
        tracking.log_files(data.parent_run_id, [
            (path, REPORT_ARTIFACT_DIR if path.parent == output else f"{REPORT_ARTIFACT_DIR}/{path.parent.name}")
            for path in report.files])
    return report


def build_report(data: StudyData, output: Path, *, data_dir=None, threshold: float = DEFAULT_THRESHOLD,
                 confidence: float = stats.DEFAULT_CONFIDENCE,
                 equivalence_margin: float = stats.DEFAULT_EQUIVALENCE_MARGIN,
                 report_command: Sequence[str] | None = None, smallest_effect: float | None = None) -> Report:
    """The report's files for gathered ``data`` in ``output`` (no tracking store needed)."""
    (output / "figures").mkdir(parents=True, exist_ok=True)
    files: list[Path] = []

    def save_csv(frame: pd.DataFrame, name: str) -> None:
        path = output / name
        frame.to_csv(path, index=False)
        files.append(path)

    summary = summary_table(data, confidence, equivalence_margin, smallest_effect)
    save_csv(summary, "ablation_summary.csv")
    arms = list(summary["arm"])
    notes = analysis.notes(data, summary, confidence)

    curves = None
    if not data.histories.empty:
        per_run = stats.learning_curve_table(data.histories, threshold)
        curves = stats.learning_curve_summary(per_run, threshold)
        curves = curves.set_index("arm").reindex([a for a in arms if a in set(curves["arm"])]).reset_index()
        save_csv(curves, "learning_curves.csv")
        save_csv(per_run, "learning_curves_per_run.csv")

    factorial = analysis.factorial_section(data, confidence)
    if factorial is not None:
        notes += factorial["notes"]
        if factorial.get("effects") is not None:
            save_csv(factorial["effects"], "factorial_effects.csv")
        if factorial.get("anova") is not None:
            save_csv(factorial["anova"], "factorial_anova.csv")

    drawn: list[dict] = []

    def add_figure(name: str, figure, caption: str) -> None:
        if figure is None:
            return
        png = figures.png(figure)
        path = output / "figures" / name
        path.write_bytes(png)
        files.append(path)
        drawn.append({"name": name, "data_uri": render.data_uri(png), "caption": caption})

    level = f"{round(100 * confidence)}%"
    if factorial is not None and factorial.get("effects") is not None:
        add_figure("factorial_effects.png", figures.factorial_figure(factorial["effects"], confidence),
                   f"Main effects (on minus off, averaged over the other components) and interactions, with "
                   f"{level} intervals; training seeds and test images random.")
    if len(data.finished):
        add_figure("differences.png", figures.difference_figure(summary, data.baseline, confidence),
                   f"Each arm minus the baseline on paired seeds, {level} intervals: orange with seeds and test "
                   "images random (a claim about the recipe), grey for this test set only; the green band is the "
                   "equivalence margin.")
        if data.correctness is not None and data.baseline in data.correctness.arms:
            add_figure("per_seed_differences.png",
                       figures.per_seed_figure(stats.per_seed_differences(data.correctness, data.baseline),
                                               summary, data.baseline),
                       "Each arm minus the baseline on every paired seed (dots, points of test accuracy); the ring "
                       "marks the worst seed and the bar the mean. With n seeds, a failure rarer than about 1 in n "
                       "seeds is usually not drawn at all, so it cannot show here.")
        add_figure("test_error.png", figures.error_figure(summary, data.finished, data.baseline, confidence),
                   f"Test error per arm: mean over seeds with its {level} interval (seeds and test images random, "
                   "within 0–100%); dots are single seeds; the dashed line is the baseline's mean.")
    if not data.histories.empty:
        add_figure("learning_curves.png", figures.learning_curves_figure(data.histories, arms, data.baseline,
                                                                         confidence),
                   f"Mean validation accuracy (and loss) per epoch over seeds, with the {level} interval over seeds "
                   "(clipped to the metric's range).")
    if data.predicted_by_run:
        add_figure("confusion_differences.png", figures.confusion_difference_figure(data, arms),
                   "Left: the baseline's off-diagonal confusions (mean count per seed). Then, for the arms that "
                   "differ most, their mean confusion counts minus the baseline's: red cells are mistakes the arm "
                   "makes more often.")
        images, why_not = load_test_images(data, data_dir)
        if images is None:
            notes.append(why_not)
        else:
            add_figure("worse_examples.png", figures.examples_figure(data, arms, images),
                       "Test images each arm gets wrong while the baseline, trained with the same seed, gets them "
                       "right; most consistent over seeds first. Titles: true→predicted (seeds where it happens).")

    context = _context(data, summary, notes, drawn, curves, factorial, confidence, threshold, equivalence_margin,
                       report_command)
    html_path, markdown_path = output / "report.html", output / "report.md"
    html_path.write_text(render.render_html(context), encoding="utf-8")
    markdown_path.write_text(render.render_markdown(context), encoding="utf-8")
    files += [html_path, markdown_path]
    return Report(output, summary, files, notes, data)


def _context(data: StudyData, summary: pd.DataFrame, notes: list[str], drawn: list[dict], curves, factorial,
             confidence: float, threshold: float, margin: float, report_command) -> dict:
    definition = data.definition or {}
    precision = definition.get("precision")
    precision_context = None
    if precision:
        rows = summary[summary["arm"] != data.baseline]
        precision_context = {
            "rule": (f"Stein's two-stage rule: each arm's first {precision.get('first_stage_seeds', 2)} paired "
                     "seeds decided, once, how many seeds it gets (the fewest whose "
                     f"{round(100 * confidence)}% difference interval is at most "
                     f"{100 * precision['target_ci_width']:.2f} points wide, up to {precision['max_seeds']}); its "
                     "final interval keeps that first stage's seed variance and degrees of freedom. No decision "
                     "reads a variance that enters the final test, an estimate or a p-value, so stopping cannot "
                     "pick a variance that is small by chance (which adding seeds until an interval happened to be "
                     "narrow did: 9-12% false positives in simulations); an interval of zero width never counts as "
                     "the target reached."),
            "table": render.table(pd.DataFrame({
                "arm": rows["arm"], "seeds": rows["n_pairs"],
                "interval width now (points)": [analysis.points(h - lo) if pd.notna(h) else "—"
                                                for lo, h in zip(rows["delta_ci_low"], rows["delta_ci_high"])],
                "floor from the test set (points)": [analysis.points(f) if pd.notna(f) else "—"
                                                     for f in rows["ci_width_floor"]],
                "why it stopped": rows["stop_reason"].fillna("—"),
            })),
        }
    factorial_context = None
    if factorial is not None and factorial.get("effects") is not None:
        factorial_context = {
            "lead": factorial["lead"], "findings": factorial["findings"],
            "effects": render.effects_display(factorial["effects"], confidence),
            "covers": f"Intervals: {round(100 * confidence)}%, {analysis.INTERVALS_COVER}.",
            "anova": render.rounded(factorial["anova"]) if factorial.get("anova") is not None else None,
            "anova_intro": (f"Run-level OLS of {factorial.get('formula', 'the block model')} (seed as a block, "
                            "saturated model), "
                            "type II ANOVA: test images fixed, a check on the effects above."),
            "warnings": factorial["warnings"],
        }
    commands = [" ".join(definition.get("command") or [])] if definition.get("command") else []
    if report_command:
        commands.append(" ".join(report_command))
    return {
        "study": data.study, "description": definition.get("description", ""), "baseline": data.baseline,
        "n_runs": len(data.finished), "parent_run_id": data.parent_run_id, "store": data.tracking_uri,
        "generated": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "notes": notes, "factorial": factorial_context,
        "findings": analysis.findings(data, summary, confidence),
        "summary": render.summary_display(summary, data.baseline, confidence),
        "summary_note": (f"Intervals are {round(100 * confidence)}% and cover {analysis.INTERVALS_COVER}, except "
                         f"the last interval column ({analysis.THIS_TEST_SET}). Holm and TOST p-values are "
                         "corrected over every compared arm. ablation_summary.csv has the unrounded numbers as "
                         "fractions."),
        "precision": precision_context,
        "failures": [r for arm in summary["arm"] for r in failure_reasons(data, arm)],
        "figures": drawn,
        "curves": render.curves_display(curves) if curves is not None else None,
        "method": method_paragraphs(confidence, threshold, margin),
        "configuration": render.configuration_tables(data.configs(), data.baseline, data.planned,
                                                     lambda arm: analysis.config_changes(data, arm)),
        "environment": render.environment_display(data.environment),
        "commands": commands,
    }
