"""The report's statistics glue: gathered study data -> the summary table, verdicts and sentences.

Every number comes from ``mnist_ablation.stats`` (seeds and test images random); this module decides which
comparison each arm gets, what it is called, and how it is said in words. Nothing here draws or renders.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .. import stats
from ..config import from_dict
from ..studies import COMPONENTS, describe_identical, identical_arms
from ..sweep import PrecisionRule, failure_counts
from .gather import StudyData, failure_reasons

SIGNIFICANCE_LEVEL = 0.05
INTERVALS_COVER = "training seeds and test images (a claim about the recipe)"
THIS_TEST_SET = "training seeds only, on these 10,000 test images"

# ablation_summary.csv: the documented columns first (their meaning unchanged), then the rest.
SUMMARY_COLUMNS = [
    "arm", "n_seeds", "test_accuracy_mean", "test_accuracy_ci_low", "test_accuracy_ci_high",
    "delta_vs_baseline", "delta_ci_low", "delta_ci_high", "p_value", "p_value_holm", "n_pairs", "mde",
]
EXTRA_SUMMARY_COLUMNS = [
    "verdict", "equivalence_margin", "equivalence_p_value", "equivalence_p_value_holm", "seeds_needed",
    "ci_width_floor", "baseline_accuracy_paired", "arm_accuracy_paired",
    "delta_ci_low_this_test_set", "delta_ci_high_this_test_set", "p_value_this_test_set", "wilcoxon_p_value",
    "effect_size", "seed_variance", "image_variance", "residual_variance", "n_planned_seeds", "n_failed",
    "n_running", "identical_to_baseline", "stop_reason", "status", "intervals_cover",
    "smallest_effect", "df", "comparison", "worst_seed", "worst_seed_delta",
]
# Verdicts, in the order a reader cares about.
BASELINE, MATTERS, NEGLIGIBLE, INCONCLUSIVE, IDENTICAL, TOO_FEW, FAILED = (
    "baseline", "matters", "negligible", "inconclusive", "identical", "too few seeds", "failed")


def points(value: float, signed: bool = False) -> str:
    """A fraction of accuracy as percentage points: 0.0012 -> '0.12' (or '+0.12')."""
    return f"{100 * value:+.2f}" if signed else f"{100 * value:.2f}"


def format_p(p: float) -> str:
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "n/a"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def p_phrase(p: float) -> str:
    """'p = 0.021', 'p < 0.001' or 'p n/a'."""
    text = format_p(p)
    return f"p {text}" if text.startswith("<") or text == "n/a" else f"p = {text}"


def identical_groups(data: StudyData) -> list[list[str]]:
    """Arms that train exactly the same thing at the study's budget (recorded by ablate, else recomputed)."""
    if data.definition and "identical_arms" in data.definition:
        return data.definition["identical_arms"]
    configs = {arm: from_dict(config) for arm, config in data.configs().items()}
    return identical_arms(configs) if configs else []


def identical_notes(data: StudyData) -> list[str]:
    """One note on the arms that are the same training run at this budget (one group, or all groups at once)."""
    configs = {arm: from_dict(config) for arm, config in data.configs().items()}
    groups = [group for group in identical_groups(data) if all(arm in configs for arm in group)]
    if len(groups) <= 2:
        return [describe_identical(configs, group) + "." for group in groups]
    return [f"{len(groups)} groups of arms are the same training run at this budget (settings that change nothing, "
            "e.g. a schedule step after the last epoch), so they can differ only by chance: "
            + "; ".join(" = ".join(group) for group in groups) + "."]


def summary_table(data: StudyData, confidence: float = stats.DEFAULT_CONFIDENCE,
                  equivalence_margin: float = stats.DEFAULT_EQUIVALENCE_MARGIN,
                  smallest_effect: float | None = None) -> pd.DataFrame:
    """One row per arm: ``SUMMARY_COLUMNS`` then ``EXTRA_SUMMARY_COLUMNS`` (fractions, not points).

    An arm's accuracy and its interval use all its finished seeds; its difference from the baseline, the
    paired accuracies and every test use the seeds both have (``n_pairs``). Intervals cover training seeds and
    test images (``intervals_cover``); the ``*_this_test_set`` columns only seeds. ``seeds_needed`` is for
    ``smallest_effect`` (default: the equivalence margin), stated in advance, never the observed difference;
    ``worst_seed`` / ``worst_seed_delta``: the paired seed with the lowest arm-minus-baseline accuracy.
    """
    arms = data.arms
    smallest_effect = stats.check_smallest_effect(equivalence_margin if smallest_effect is None else smallest_effect)
    rows = {arm: dict.fromkeys(SUMMARY_COLUMNS + EXTRA_SUMMARY_COLUMNS, np.nan) for arm in arms}
    for arm in arms:
        rows[arm].update(arm=arm, n_seeds=0, n_pairs=0, intervals_cover=INTERVALS_COVER,
                         equivalence_margin=equivalence_margin, smallest_effect=smallest_effect)
    array = data.correctness
    rule = PrecisionRule.from_dict((data.definition or {}).get("precision"))  # the sweep's, from study.json
    if array is not None:
        for row in stats.accuracy_table(array, confidence).itertuples():
            rows[row.arm].update(n_seeds=row.n_seeds, test_accuracy_mean=row.test_accuracy_mean,
                                 test_accuracy_ci_low=row.test_accuracy_ci_low,
                                 test_accuracy_ci_high=row.test_accuracy_ci_high)
        if data.baseline in array.arms:
            comparison = stats.compare_to_baseline(array, data.baseline, confidence, equivalence_margin,
                                                   smallest_effect=smallest_effect,
                                                   first_stage_seeds=rule.first_stage_seeds if rule else None)
            for row in comparison.itertuples():
                rows[row.arm].update(
                    delta_vs_baseline=row.delta, delta_ci_low=row.delta_ci_low, delta_ci_high=row.delta_ci_high,
                    p_value=row.p_value, p_value_holm=row.p_value_holm, n_pairs=row.n_pairs, mde=row.mde,
                    equivalence_p_value=row.equivalence_p_value,
                    equivalence_p_value_holm=row.equivalence_p_value_holm, seeds_needed=row.seeds_needed,
                    ci_width_floor=row.ci_width_floor, baseline_accuracy_paired=row.baseline_accuracy,
                    arm_accuracy_paired=row.arm_accuracy, delta_ci_low_this_test_set=row.delta_ci_low_this_test_set,
                    delta_ci_high_this_test_set=row.delta_ci_high_this_test_set,
                    p_value_this_test_set=row.p_value_this_test_set, wilcoxon_p_value=row.wilcoxon_p_value,
                    effect_size=row.effect_size, seed_variance=row.seed_variance, image_variance=row.image_variance,
                    residual_variance=row.residual_variance, df=row.df, comparison=row.comparison)
            per_seed = stats.per_seed_differences(array, data.baseline)
            for arm, seeds in per_seed.groupby("arm", sort=False):
                worst = seeds.loc[seeds["delta"].idxmin()]
                rows[arm].update(worst_seed=worst["seed"], worst_seed_delta=worst["delta"])
            base = rows[data.baseline]
            base.update(delta_vs_baseline=0.0, n_pairs=base["n_seeds"])
    planned = data.planned.groupby("arm")["seed"].nunique() if data.planned is not None else None
    failures = failure_counts(data.runs, data.finished).set_index("arm") if len(data.runs) else None
    identical = {arm for group in identical_groups(data) if data.baseline in group for arm in group}
    for arm, row in rows.items():
        row["n_planned_seeds"] = int(planned.get(arm, 0)) if planned is not None else np.nan
        mine = failures.loc[arm] if failures is not None and arm in failures.index else None
        row["n_failed"] = int(mine["n_failed"]) if mine is not None else 0
        row["n_running"] = int(mine["n_running"]) if mine is not None else 0
        row["identical_to_baseline"] = arm != data.baseline and arm in identical
    for arm, reason in precision_stop_reasons(data, rows, rule).items():
        rows[arm]["stop_reason"] = reason or "still adding seeds"
    for row in rows.values():
        row["verdict"] = verdict(row, data.baseline, 1 - confidence)
        row["status"] = status(row, data.baseline, bool(rows.get(data.baseline, {}).get("n_seeds")))
    table = pd.DataFrame(list(rows.values()), columns=SUMMARY_COLUMNS + EXTRA_SUMMARY_COLUMNS)
    for column in ("n_seeds", "n_pairs", "n_failed", "n_running"):
        table[column] = table[column].astype(int)
    table["worst_seed"] = table["worst_seed"].astype("Int64")  # a seed number, missing for the baseline
    return table


def precision_stop_reasons(data: StudyData, rows: dict[str, dict],
                           rule: PrecisionRule | None) -> dict[str, str | None]:
    """Per compared arm with finished seeds, why the sweep's precision ``rule`` (recorded in study.json) stopped
    adding seeds to it (None: still adding), decided by ``sweep.PrecisionRule.decide`` as the sweep did."""
    array = data.correctness
    if rule is None or array is None or data.baseline not in array.arms:
        return {}
    attempted = {arm: int(row["n_planned_seeds"] if not pd.isna(row["n_planned_seeds"]) else row["n_seeds"])
                 for arm, row in rows.items()}
    decisions = rule.decide(array, data.baseline, attempted)
    return {arm: decision.stop_reason for arm, decision in decisions.items()
            if arm != data.baseline and rows.get(arm, {}).get("n_seeds")}


def verdict(row: dict, baseline: str, alpha: float = SIGNIFICANCE_LEVEL) -> str:
    """What the data can say about one arm: matters, negligible, inconclusive (or why nothing can be said)."""
    if row["arm"] == baseline:
        return BASELINE if row["n_seeds"] else FAILED
    if not row["n_seeds"]:
        return FAILED
    if (row["n_pairs"] < 2 and row.get("comparison") != stats.UNPAIRED) or pd.isna(row["p_value"]):
        return IDENTICAL if row["identical_to_baseline"] else TOO_FEW
    if row["p_value_holm"] < alpha:
        return MATTERS
    if row["equivalence_p_value_holm"] < alpha:
        return NEGLIGIBLE
    return IDENTICAL if row["identical_to_baseline"] else INCONCLUSIVE


def status(row: dict, baseline: str, baseline_finished: bool) -> str:
    n, failed, running = row["n_seeds"], row["n_failed"], row["n_running"]
    if n == 0:
        return "failed" if failed else ("running" if running else "not run")
    notes = []
    if failed:
        notes.append(f"{failed} seed(s) failed")
    if running:
        notes.append(f"{running} seed(s) still running")
    if row["arm"] != baseline and not baseline_finished:
        notes.append("no finished baseline to compare with")
    elif row["arm"] != baseline and row["n_pairs"] < 2:
        notes.append("fewer than 2 paired seeds: no intervals")
    head = "baseline" if row["arm"] == baseline else "ok"
    return head if not notes else f"{head}; " + "; ".join(notes)


# -- words ---------------------------------------------------------------------------------------------


def config_changes(data: StudyData, arm: str) -> dict[str, tuple]:
    """Config fields where ``arm`` differs from the baseline: field -> (baseline value, arm value)."""
    configs = data.configs()
    base, other = configs.get(data.baseline), configs.get(arm)
    if base is None or other is None:
        return {}
    return {k: (base.get(k), v) for k, v in other.items() if k != "seed" and base.get(k) != v}


def describe_change(data: StudyData, arm: str) -> str:
    """'removing batch norm', 'setting lr_schedule=constant', ... ; the arm's name if nothing is known."""
    phrases = []
    for name, (before, after) in config_changes(data, arm).items():
        if before is True and after is False:
            phrases.append(f"removing {name.replace('_', ' ')}")
        elif before is False and after is True:
            phrases.append(f"adding {name.replace('_', ' ')}")
        else:
            phrases.append(f"setting {name}={after} (baseline {before})")
    if not phrases:
        return f"arm {arm}"
    if len(phrases) > 3:
        phrases = phrases[:3] + [f"{len(phrases) - 3} more changes"]
    return (", ".join(phrases[:-1]) + " and " + phrases[-1]) if len(phrases) > 1 else phrases[0]


def _interval(low: float, high: float, level: str) -> str:
    return f"{level} CI [{points(low, signed=True)}, {points(high, signed=True)}]"


def possible_range(row) -> tuple[float, float]:
    """The differences arm - baseline that accuracy allows, given the baseline's accuracy on the paired seeds."""
    base = row["baseline_accuracy_paired"]
    return (-1.0, 1.0) if pd.isna(base) else (-float(base), 1 - float(base))


def shown_difference_interval(row, low_column: str = "delta_ci_low", high_column: str = "delta_ci_high"):
    """(low, high, clipped): a difference interval as the page shows it, never beyond what accuracy allows (a
    t interval with 1-2 df can reach past it; the CSV keeps the unclipped bounds)."""
    low, high = row[low_column], row[high_column]
    if pd.isna(low):
        return low, high, False
    floor, ceiling = possible_range(row)
    return max(low, floor), min(high, ceiling), low < floor or high > ceiling


def largest_possible_difference(row) -> float:
    """The largest |arm - baseline| accuracy difference there can be, given the baseline's accuracy."""
    return max(abs(bound) for bound in possible_range(row))


def visible_beyond_range(row) -> bool:
    """Whether an arm's smallest visible effect is past every difference accuracy allows (shown as such)."""
    return bool(not pd.isna(row["mde"]) and row["mde"] >= largest_possible_difference(row))


def visible_phrase(mde: float, limit: float) -> str:
    """'effects smaller than X points cannot be seen here', never with an X beyond the metric's range."""
    if pd.isna(mde):
        return ""
    if mde >= limit:
        return "no difference accuracy could show (not even ±100 points) would be seen reliably here"
    return f"effects smaller than {points(mde)} points cannot be seen here"


def seeds_phrase(row, n_images: int, n_compared: int) -> str:
    """Planning for the stated smallest effect (``smallest_effect``), never for the observed difference."""
    needed, effect = row["seeds_needed"], row["smallest_effect"]
    if pd.isna(needed) or pd.isna(effect) or row["identical_to_baseline"]:
        return ""
    target = (f"a difference of {points(effect)} points (--smallest-effect) with 80% power after Holm over "
              f"{n_compared} arm(s)")
    if math.isinf(needed):
        return (f" No number of seeds would detect {target}: the {n_images:,}-image test set alone limits this "
                f"comparison to ±{points(row['ci_width_floor'] / 2)} points.")
    if needed <= row["n_pairs"]:
        return f" These {int(row['n_pairs'])} seeds already detect {target}, so a real effect is likely smaller."
    return f" About {int(math.ceil(needed))} seeds per arm would detect {target}."


def two_seed_phrase(row) -> str:
    """What 2 seeds can and cannot see, said plainly."""
    if row["n_pairs"] != 2:
        return ""
    return (" With 2 seeds the seed-to-seed variation is estimated from one difference (1 degree of freedom): "
            "only large effects can be told from chance, and a failure that shows in 1 seed of 3 is missed most "
            "of the time; run 3 or more seeds for anything finer.")


def arm_sentence(data: StudyData, row: pd.Series, n_compared: int, confidence: float) -> str:
    """The plain-language finding for one arm of the summary table."""
    level = f"{round(100 * confidence)}%"
    arm = row["arm"]
    if row["verdict"] == FAILED:
        reasons = failure_reasons(data, arm)
        why = f" ({reasons[0]})" if reasons else ""
        state = {"failed": "failed", "running": "is still running", "not run": "has not been run"}.get(
            row["status"], str(row["status"]))
        what = "the baseline" if arm == data.baseline else f"Arm {arm}"
        return (f"{what} {state}{why}: with no finished run it cannot be compared. Rerun the study command to "
                "retry it.")
    failed = ("" if not row["n_failed"] else " 1 seed failed and is left out." if row["n_failed"] == 1
              else f" {row['n_failed']} seeds failed and are left out.")
    n_images = len(data.correctness.images) if data.correctness is not None else 0
    if row["verdict"] == BASELINE:
        text = f"The baseline reaches {points(row['test_accuracy_mean'])}% test accuracy"
        if row["n_seeds"] >= 2 and not pd.isna(row["test_accuracy_ci_low"]):
            return (text + f", {level} CI [{points(row['test_accuracy_ci_low'])}, "
                    f"{points(row['test_accuracy_ci_high'])}]% over {row['n_seeds']} seeds (seeds and test images "
                    f"random).{failed}")
        return text + f" on its single seed; with one seed no interval can be computed.{failed}"
    change = describe_change(data, arm)
    subject = f"{change[0].upper()}{change[1:]}"
    delta = row["delta_vs_baseline"]
    verb = "costs" if delta < 0 else "gains"
    n_pairs = int(row["n_pairs"])
    unpaired = row.get("comparison") == stats.UNPAIRED
    paired = ""
    if unpaired:
        n_pairs = int(row["n_seeds"])
        paired = (f" (an unpaired comparison: no seed in common with the baseline, so its {n_pairs} seed(s) are "
                  "compared with the baseline's, and seed effects the arms share do not cancel)")
    elif n_pairs != row["n_seeds"]:
        paired = (f" (on the {n_pairs} seed(s) both arms finished: {points(row['arm_accuracy_paired'])}% against "
                  f"the baseline's {points(row['baseline_accuracy_paired'])}%)")
    if row["verdict"] in (TOO_FEW, IDENTICAL) and ((n_pairs < 2 and not unpaired) or pd.isna(row["p_value"])):
        identical = (" It is the same training run as the baseline at this budget (flagged before training), so "
                     "any difference is chance." if row["identical_to_baseline"] else "")
        if n_pairs == 0:
            return f"{subject}: no finished baseline run with the same seed, so no paired comparison can be made."
        return (f"{subject} {verb} {points(abs(delta))} points of test accuracy{paired} with {n_pairs} paired "
                f"seed(s); with fewer than two seeds, or no spread between them, no interval or test can be "
                f"computed (run --seeds 3 or more).{identical}{failed}")
    low, high, clipped = shown_difference_interval(row)
    interval = _interval(low, high, level) + (" (cut at the differences accuracy allows)" if clipped else "")
    holm = f"after Holm over {n_compared} arm(s)"
    if not pd.isna(row.get("worst_seed_delta", np.nan)):
        failed = (f" Per seed (arm minus baseline), the worst is seed {row['worst_seed']} at "
                  f"{points(row['worst_seed_delta'], signed=True)} points.{failed}")
    if row["verdict"] == MATTERS:
        return (f"{subject} matters: it {verb} {points(abs(delta))} points of test accuracy{paired}, {interval} "
                f"(training seeds and test images random), {p_phrase(row['p_value_holm'])} {holm}.{failed}")
    if row["verdict"] == NEGLIGIBLE:
        return (f"{subject} is negligible: within ±{points(row['equivalence_margin'])} points of the baseline "
                f"(TOST {p_phrase(row['equivalence_p_value_holm'])} {holm}); the difference is "
                f"{points(delta, signed=True)} points{paired}, {interval}.{failed}")
    identical = (" It is the same training run as the baseline at this budget (flagged before training); the "
                 "difference is chance." if row["verdict"] == IDENTICAL else "")
    return (f"{subject} is inconclusive with {n_pairs} seeds: it {verb} {points(abs(delta))} points{paired}, "
            f"{interval}, {p_phrase(row['p_value_holm'])} {holm}; "
            f"{visible_phrase(row['mde'], largest_possible_difference(row))}."
            f"{seeds_phrase(row, n_images, n_compared)}{two_seed_phrase(row)}{identical}{failed}")


def findings(data: StudyData, summary: pd.DataFrame, confidence: float) -> list[dict]:
    """One finding per arm: {arm, kind (the verdict, as a CSS class), text}."""
    n_compared = int((summary["arm"] != data.baseline).sum())
    return [{"arm": row["arm"], "kind": row["verdict"].replace(" ", "-"),
             "text": arm_sentence(data, row, n_compared, confidence)} for _, row in summary.iterrows()]


def seeds_plan(data: StudyData, target_width: float, confidence: float = stats.DEFAULT_CONFIDENCE) -> pd.DataFrame:
    """Per compared arm: how many seeds would make its difference interval at most ``target_width`` wide with 80%
    probability (from the variance components, not from the observed difference)."""
    array = data.correctness
    estimates = stats.contrasts_to_baseline(array, data.baseline) if array is not None else {}
    rows = []
    for arm, estimate in estimates.items():
        width = floor = needed = float("nan")
        if estimate is not None and estimate.estimable:
            low, high = estimate.interval(confidence)
            width, floor = high - low, estimate.floor_width(confidence)
            needed = estimate.seeds_for_width(target_width, confidence, probability=stats.DEFAULT_POWER)
        rows.append({"arm": arm, "n_pairs": 0 if estimate is None else estimate.n_seeds, "ci_width": width,
                     "ci_width_floor": floor, "target_ci_width": target_width, "seeds_needed": needed})
    return pd.DataFrame(rows, columns=["arm", "n_pairs", "ci_width", "ci_width_floor", "target_ci_width",
                                       "seeds_needed"])


def notes(data: StudyData, summary: pd.DataFrame, confidence: float) -> list[str]:
    """Warnings a reader must see before the findings."""
    notes = []
    few = summary.loc[(summary["n_seeds"] < 2) & (summary["n_seeds"] > 0), "arm"]
    if len(few):
        notes.append(f"Fewer than two finished seeds for {', '.join(few)}: confidence intervals and seed-level tests "
                     "cannot be computed for them (shown as “no CI” / n/a, NaN in the CSV). Run more seeds "
                     "(--seeds 3 or more) for intervals.")
    if not (summary.loc[summary["arm"] == data.baseline, "n_seeds"] > 0).any():
        notes.append(f"The baseline arm {data.baseline!r} has no finished run: no arm can be compared with it.")
    if len(data.unusable):
        notes.append(f"{len(data.unusable)} run(s) FINISHED without a finite test accuracy; they count as failed "
                     "cells and are left out of every statistic.")
    notes += [f"Identical by construction: {note}" for note in identical_notes(data)]
    # Arms identical to the baseline by construction differ by exactly zero: their "visible effect" says nothing.
    compared = summary[(summary["arm"] != data.baseline) & (summary["n_pairs"] >= 2) & summary["mde"].notna()
                       & ~summary["identical_to_baseline"].astype(bool)]
    if len(compared):
        n = int(compared["n_pairs"].min())
        median = float(compared["mde"].median())
        limit = float(compared.apply(largest_possible_difference, axis=1).min())
        seen = (f"differences smaller than the “smallest visible effect” column (median {points(median)} points) "
                "cannot be told from chance here" if median < limit else
                "even the largest difference accuracy allows would not be told from chance reliably here")
        notes.append(f"With {n} paired seed(s), {seen} (80% power after Holm); "
                     "“inconclusive” means exactly that, not “no effect”."
                     + (" Two seeds estimate the seed-to-seed variation from a single difference: they can show "
                        "only large effects; run 3 or more seeds for anything finer." if n == 2 else ""))
    if summary["worst_seed_delta"].notna().any():
        n = int(summary.loc[summary["worst_seed_delta"].notna(), "n_pairs"].max())
        notes.append(f"Each arm's per-seed differences and its worst seed are shown below. A failure rarer than about "
                     f"1 in {max(n, 1)} seeds (an arm that is fine on most seeds and breaks on a few) cannot be seen "
                     f"with {n} seeds: most studies of that size never draw it.")
    return notes


# -- the factorial study --------------------------------------------------------------------------------

def _term_name(term: str) -> str:
    """'batch norm × dropout': each component's label from the study definitions (its own name otherwise)."""
    return " × ".join(COMPONENTS.get(part, {}).get("label", part.replace("_", " ")) for part in term.split(":"))


def factorial_section(data: StudyData, confidence: float) -> dict | None:
    """Main effects and interactions of a factorial study (None for other studies), with sentences.

    Effects are crossed contrasts (seeds paired across cells, images random), Holm over the main effects and
    two-way interactions; the run-level OLS with seed blocks (this test set only) comes along as a check.
    """
    factors = data.factors
    array = data.correctness
    if not factors or array is None:
        return None
    level = f"{round(100 * confidence)}%"
    present = set(array.arms)
    design = pd.DataFrame([{"arm": arm, **on} for arm, on in factors.items() if arm in present])
    components = [c for c in design.columns if c != "arm"]  # the study's own (its factors), built-in or a file's
    section: dict = {"notes": [], "warnings": []}
    try:
        contrasts = stats.factorial_contrasts(array, design, confidence, components=components)
    except ValueError as error:
        section["notes"].append(f"Factorial analysis not possible yet: {error}")
        section["effects"] = None
        return section
    if contrasts.note:
        section["notes"].append(contrasts.note)
    effects = contrasts.effects
    section["effects"] = effects
    leading = effects[effects["holm_family"] == stats.LEADING_FAMILY]
    alpha = 1 - confidence
    section["findings"] = []
    for row in leading.itertuples():
        name = _term_name(row.term)
        what = "on minus off, averaged over the other components" if row.kind == "main effect" else \
            "how much the first component's effect changes when the other is on"
        if pd.isna(row.ci_low):
            text = (f"{points(row.effect, signed=True)} points ({what}); no interval with {row.n_seeds} complete "
                    "seed(s).")
            kind = TOO_FEW
        else:
            kind = MATTERS if row.p_value_holm < alpha else INCONCLUSIVE
            verdict_text = "matters" if kind == MATTERS else f"inconclusive with {row.n_seeds} seeds"
            text = (f"{verdict_text}: {points(row.effect, signed=True)} points ({what}), "
                    f"{_interval(row.ci_low, row.ci_high, level)}, {p_phrase(row.p_value_holm)} after Holm over "
                    f"the {len(leading)} main effects and two-way interactions.")
        section["findings"].append({"term": name[0].upper() + name[1:], "kind": kind.replace(" ", "-"),
                                    "text": text})
    k = contrasts.pooled_terms
    zero = (f"; the other {len(effects) - k}, between cells that are the same training run, are exactly zero"
            if k < len(effects) else "")
    pooled = (f" The seed-to-seed variation is pooled over the {k} orthogonal terms (the standard factorial "
              f"analysis: {k} x {contrasts.n_seeds - 1} degrees of freedom instead of {contrasts.n_seeds - 1} per "
              f"term; Cochran's test p = {contrasts.homogeneity_p_value:.2f} finds no term that varies more than the "
              f"others{zero})." if contrasts.pooled else "")
    section["lead"] = (f"{contrasts.n_seeds} seed(s) with all {len(design)} cells. Each effect is a contrast "
                       "over the cells, paired by seed, with training seeds and test images random; three- and "
                       f"four-way interactions are in the table below (their own Holm family).{pooled}")
    try:
        ols = stats.factorial_block_ols(data.finished, design, confidence, components=components)
    except ValueError as error:
        section["notes"].append(f"The run-level block model is not shown: {error}")
        section["anova"] = None
    else:
        section["anova"] = ols.anova
        section["formula"] = ols.formula
        if ols.warning:
            section["warnings"].append(ols.warning)
    if identical_groups(data):
        section["notes"].append("Because some cells are identical by construction (above), the terms of the "
                                "component that makes them differ estimate zero up to chance.")
    return section
