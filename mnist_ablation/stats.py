"""The statistics of an ablation study: pure functions on arrays and DataFrames (no MLflow here).

Everything rests on SciPy and statsmodels; this module only decides what is compared with what:

* an arm's mean test accuracy over seeds gets a Student-t interval;
* an arm is compared with the baseline *paired by seed* (same seed, same data order and initial
  weights where the arms allow it): mean difference with a t interval, the paired t-test, the Wilcoxon
  signed-rank test as a non-parametric check, and Cohen's d_z (mean difference / its standard deviation);
* McNemar's exact test uses the per-example test predictions. Seeds are pooled by **summing the
  discordant counts** over the seed pairs (baseline right & arm wrong, and the reverse) and running one
  exact binomial test on the sums. It asks "do these trained models err on different test images in one
  direction more than chance?"; it treats the 10,000 x seeds image pairs as independent and so ignores
  seed-to-seed variance - the paired t-test over seeds is the primary test, McNemar the per-example check;
* the paired t-test p-values (and separately the McNemar ones) are corrected with Holm over the arms
  whose test could be computed;
* the factorial study's main effects and two-way interactions come from an OLS fit with the components
  coded -1/2 (off) and +1/2 (on), so a main-effect coefficient is "on minus off", averaged over the other
  components, and an interaction coefficient is how much one component's effect changes when the other
  is switched on.

With fewer than two seeds (or paired seeds) intervals and seed-level tests are not computable and come
back as NaN, never as a number that looks like one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import multipletests

DEFAULT_CONFIDENCE = 0.95
FACTORIAL_COMPONENTS = ("augmentation", "batch_norm", "dropout", "step_lr")
FACTORIAL_FORMULA = "test_accuracy ~ (augmentation + batch_norm + dropout + step_lr)**2"
SUMMARY_COLUMNS = [
    "arm", "n_seeds", "test_accuracy_mean", "test_accuracy_ci_low", "test_accuracy_ci_high",
    "delta_vs_baseline", "delta_ci_low", "delta_ci_high", "p_value", "p_value_holm", "mcnemar_p_value",
]
EXTRA_SUMMARY_COLUMNS = [
    "test_error_mean", "test_error_ci_low", "test_error_ci_high", "test_accuracy_std", "n_pairs",
    "wilcoxon_p_value", "effect_size", "mcnemar_baseline_only_correct", "mcnemar_arm_only_correct",
    "mcnemar_p_value_holm", "n_planned_seeds", "n_failed", "n_running", "status",
]


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence {confidence!r}: expected a level strictly between 0 and 1, e.g. 0.95.")


@dataclass(frozen=True)
class MeanInterval:
    """Mean of repeated measurements and its Student-t confidence interval (NaN with n < 2)."""

    n: int
    mean: float
    low: float
    high: float
    std: float


def mean_confidence_interval(values, confidence: float = DEFAULT_CONFIDENCE) -> MeanInterval:
    """Mean with the t interval ``mean +- t(1 - alpha/2, n - 1) * s / sqrt(n)``; NaN bounds below two values."""
    _check_confidence(confidence)
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    n = len(values)
    if n == 0:
        return MeanInterval(0, np.nan, np.nan, np.nan, np.nan)
    mean = float(values.mean())
    if n < 2:
        return MeanInterval(1, mean, np.nan, np.nan, np.nan)
    std = float(values.std(ddof=1))
    if std == 0:
        return MeanInterval(n, mean, mean, mean, 0.0)
    low, high = scipy_stats.t.interval(confidence, df=n - 1, loc=mean, scale=scipy_stats.sem(values))
    return MeanInterval(n, mean, float(low), float(high), std)


@dataclass(frozen=True)
class PairedComparison:
    """``arm - baseline`` over paired seeds: mean, interval, t-test, Wilcoxon and Cohen's d_z."""

    n_pairs: int
    mean_difference: float
    ci_low: float
    ci_high: float
    t_statistic: float
    p_value: float
    wilcoxon_p_value: float
    effect_size: float


def paired_comparison(baseline, arm, confidence: float = DEFAULT_CONFIDENCE) -> PairedComparison:
    """Compare ``arm`` with ``baseline``, element i of each being the same seed.

    The interval and t-test come from ``scipy.stats.ttest_rel``, the non-parametric check from
    ``scipy.stats.wilcoxon`` (exact for small n). Fewer than two pairs, or differences with no spread
    at all (identical on every seed), leave the interval, the tests and d_z undefined (NaN): a t-test
    divides by the spread.
    """
    _check_confidence(confidence)
    baseline, arm = np.asarray(baseline, dtype=float), np.asarray(arm, dtype=float)
    if baseline.shape != arm.shape:
        raise ValueError(f"paired comparison needs one baseline value per arm value; got {baseline.shape} "
                         f"and {arm.shape}. Pair the runs by seed first.")
    differences = arm - baseline
    n = len(differences)
    nan = float("nan")
    if n == 0:
        return PairedComparison(0, nan, nan, nan, nan, nan, nan, nan)
    mean = float(differences.mean())
    if n < 2 or differences.std(ddof=1) == 0:
        return PairedComparison(n, mean, nan, nan, nan, nan, nan, nan)
    result = scipy_stats.ttest_rel(arm, baseline)
    interval = result.confidence_interval(confidence_level=confidence)
    wilcoxon = scipy_stats.wilcoxon(arm, baseline) if np.any(differences != 0) else None
    return PairedComparison(
        n_pairs=n,
        mean_difference=mean,
        ci_low=float(interval.low),
        ci_high=float(interval.high),
        t_statistic=float(result.statistic),
        p_value=float(result.pvalue),
        wilcoxon_p_value=float(wilcoxon.pvalue) if wilcoxon is not None else nan,
        effect_size=cohens_dz(differences),
    )


def cohens_dz(differences) -> float:
    """Cohen's d_z for paired data: mean difference divided by the differences' standard deviation."""
    differences = np.asarray(differences, dtype=float)
    if len(differences) < 2 or differences.std(ddof=1) == 0:
        return float("nan")
    return float(differences.mean() / differences.std(ddof=1))


@dataclass(frozen=True)
class McNemarResult:
    """Discordant counts (pooled over seed pairs) and the exact McNemar p-value."""

    baseline_only_correct: int
    arm_only_correct: int
    p_value: float


def mcnemar_counts(baseline_correct, arm_correct) -> tuple[int, int]:
    """(baseline right and arm wrong, arm right and baseline wrong) for one pair of prediction vectors."""
    baseline_correct = np.asarray(baseline_correct, dtype=bool)
    arm_correct = np.asarray(arm_correct, dtype=bool)
    if baseline_correct.shape != arm_correct.shape:
        raise ValueError(f"McNemar needs predictions on the same test examples; got {baseline_correct.shape} "
                         f"and {arm_correct.shape} examples.")
    return int(np.sum(baseline_correct & ~arm_correct)), int(np.sum(~baseline_correct & arm_correct))


def mcnemar_exact(baseline_only_correct: int, arm_only_correct: int) -> float:
    """Exact (binomial) McNemar p-value from the two discordant counts (1.0 when there are none)."""
    if baseline_only_correct + arm_only_correct == 0:
        return 1.0
    table = [[0, baseline_only_correct], [arm_only_correct, 0]]
    return float(mcnemar(table, exact=True).pvalue)


def pooled_mcnemar(pairs) -> McNemarResult:
    """McNemar over several seeds: ``pairs`` of (baseline_correct, arm_correct) vectors, discordant counts summed."""
    baseline_only, arm_only, any_pair = 0, 0, False
    for baseline_correct, arm_correct in pairs:
        b, c = mcnemar_counts(baseline_correct, arm_correct)
        baseline_only, arm_only, any_pair = baseline_only + b, arm_only + c, True
    if not any_pair:
        return McNemarResult(0, 0, float("nan"))
    return McNemarResult(baseline_only, arm_only, mcnemar_exact(baseline_only, arm_only))


def holm(p_values) -> np.ndarray:
    """Holm-adjusted p-values; NaN entries stay NaN and do not count towards the number of tests."""
    p_values = np.asarray(p_values, dtype=float)
    adjusted = np.full_like(p_values, np.nan)
    present = ~np.isnan(p_values)
    if present.any():
        adjusted[present] = multipletests(p_values[present], method="holm")[1]
    return adjusted


def latest_finished(runs: pd.DataFrame) -> pd.DataFrame:
    """One FINISHED run per (arm, seed): the latest, should a cell have been run twice."""
    finished = runs[runs["status"] == "FINISHED"] if "status" in runs else runs
    if "start_time" in finished:
        finished = finished.sort_values("start_time", kind="stable")
    return finished.drop_duplicates(["arm", "seed"], keep="last")


def ablation_table(runs: pd.DataFrame, correct_by_run: dict | None = None, baseline: str = "baseline",
                   confidence: float = DEFAULT_CONFIDENCE, planned: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per arm against ``baseline``: the columns of ``SUMMARY_COLUMNS`` then ``EXTRA_SUMMARY_COLUMNS``.

    ``runs`` has one row per run with at least arm, seed, test_accuracy (and status and run_id; runs
    that are not FINISHED count as failed or running, never as results). ``correct_by_run`` maps a
    run_id to a boolean vector "this test example was classified correctly", for McNemar. ``planned``
    (arm, seed) lists the cells the study meant to run, so arms that never produced a run still appear.
    Arms keep the order in which they first appear (planned cells first).
    """
    _check_confidence(confidence)
    for column in ("arm", "seed", "test_accuracy"):
        if column not in runs:
            raise ValueError(f"runs frame has no column {column!r}; expected one row per run with arm, seed, "
                             f"test_accuracy (and status, run_id) as returned by compare.study_runs.")
    runs = runs.copy()
    if "status" not in runs:
        runs["status"] = "FINISHED"
    finished = latest_finished(runs)
    finished_cells = set(zip(finished["arm"], finished["seed"]))
    unfinished = runs[[(a, s) not in finished_cells for a, s in zip(runs["arm"], runs["seed"])]]
    unfinished = unfinished.drop_duplicates(["arm", "seed"], keep="last")
    arms = list(dict.fromkeys([*(planned["arm"] if planned is not None else []), *runs["arm"]]))
    planned_seeds = planned.groupby("arm")["seed"].nunique() if planned is not None else pd.Series(dtype=int)
    base_runs = finished[finished["arm"] == baseline].set_index("seed")

    rows = []
    for arm in arms:
        arm_runs = finished[finished["arm"] == arm].set_index("seed")
        accuracy = mean_confidence_interval(arm_runs["test_accuracy"], confidence)
        error = mean_confidence_interval(1 - arm_runs["test_accuracy"], confidence)
        row = {
            "arm": arm, "n_seeds": len(arm_runs),
            "test_accuracy_mean": accuracy.mean, "test_accuracy_ci_low": accuracy.low,
            "test_accuracy_ci_high": accuracy.high,
            "test_error_mean": error.mean, "test_error_ci_low": error.low, "test_error_ci_high": error.high,
            "test_accuracy_std": accuracy.std,
            "n_planned_seeds": int(planned_seeds.get(arm, 0)) if planned is not None else np.nan,
            "n_failed": int(((unfinished["arm"] == arm) & unfinished["status"].isin(["FAILED", "KILLED"])).sum()),
            "n_running": int(((unfinished["arm"] == arm) & (unfinished["status"] == "RUNNING")).sum()),
        }
        seeds = sorted(set(arm_runs.index) & set(base_runs.index))
        if arm == baseline and len(arm_runs):
            row.update(delta_vs_baseline=0.0, n_pairs=len(arm_runs))
        elif len(base_runs):
            paired = paired_comparison(base_runs.loc[seeds, "test_accuracy"], arm_runs.loc[seeds, "test_accuracy"],
                                       confidence)
            row.update(delta_vs_baseline=paired.mean_difference, delta_ci_low=paired.ci_low,
                       delta_ci_high=paired.ci_high, p_value=paired.p_value, n_pairs=paired.n_pairs,
                       wilcoxon_p_value=paired.wilcoxon_p_value, effect_size=paired.effect_size)
            if correct_by_run is not None and seeds and "run_id" in arm_runs:
                pooled = pooled_mcnemar(
                    (correct_by_run[base_runs.loc[s, "run_id"]], correct_by_run[arm_runs.loc[s, "run_id"]])
                    for s in seeds
                )
                row.update(mcnemar_p_value=pooled.p_value,
                           mcnemar_baseline_only_correct=pooled.baseline_only_correct,
                           mcnemar_arm_only_correct=pooled.arm_only_correct)
        row["status"] = _arm_status(arm, baseline, row, len(base_runs))
        rows.append(row)

    table = pd.DataFrame(rows).reindex(columns=SUMMARY_COLUMNS + EXTRA_SUMMARY_COLUMNS)
    compared = table["arm"] != baseline
    table.loc[compared, "p_value_holm"] = holm(table.loc[compared, "p_value"])
    table.loc[compared, "mcnemar_p_value_holm"] = holm(table.loc[compared, "mcnemar_p_value"])
    for column in ("n_seeds", "n_failed", "n_running"):
        table[column] = table[column].astype(int)
    return table


def _arm_status(arm: str, baseline: str, row: dict, n_baseline: int) -> str:
    n, failed, running = row["n_seeds"], row["n_failed"], row["n_running"]
    if n == 0:
        return "failed" if failed else ("running" if running else "not run")
    notes = []
    if failed:
        notes.append(f"{failed} seed(s) failed")
    if running:
        notes.append(f"{running} seed(s) still running")
    if arm != baseline and n_baseline == 0:
        notes.append("no finished baseline to compare with")
    elif n < 2 or (arm != baseline and row.get("n_pairs", 0) < 2):
        notes.append("fewer than 2 seeds: no intervals")
    head = "baseline" if arm == baseline else "ok"
    return head if not notes else f"{head}; " + "; ".join(notes)


def factorial_design(runs: pd.DataFrame) -> pd.DataFrame:
    """The factorial study's runs as a regression frame: test_accuracy and each component coded -0.5 / +0.5.

    ``step_lr`` is on when ``lr_schedule == "step"`` (the seed's schedule), off for any other schedule.
    """
    missing = [c for c in ("augmentation", "batch_norm", "dropout", "lr_schedule", "test_accuracy") if c not in runs]
    if missing:
        raise ValueError(f"factorial analysis needs the config columns {missing} in the runs frame "
                         f"(compare.study_runs returns them); got columns {list(runs.columns)}.")
    on = {
        "augmentation": runs["augmentation"].astype(bool),
        "batch_norm": runs["batch_norm"].astype(bool),
        "dropout": runs["dropout"].astype(bool),
        "step_lr": runs["lr_schedule"] == "step",
    }
    design = pd.DataFrame({name: np.where(values, 0.5, -0.5) for name, values in on.items()}, index=runs.index)
    design.insert(0, "test_accuracy", runs["test_accuracy"].astype(float))
    for column in ("arm", "seed"):
        if column in runs:
            design.insert(0, column, runs[column])
    return design


def factorial_effects(runs: pd.DataFrame, confidence: float = DEFAULT_CONFIDENCE) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Main effects and two-way interactions of the four components: (effects table, ANOVA table).

    OLS (statsmodels) of ``FACTORIAL_FORMULA`` on the -0.5/+0.5 coded design. The effects table has one row
    per term (without the intercept): term, effect, ci_low, ci_high, std_error, t_statistic, p_value,
    p_value_holm (over the 10 terms). The ANOVA table is ``anova_lm(typ=2)`` (for a balanced design all
    types agree). Raises ValueError if the runs cannot support the fit (a component never varied, or no
    residual degrees of freedom).
    """
    import statsmodels.api as sm
    import statsmodels.formula.api as smf

    _check_confidence(confidence)
    design = factorial_design(runs)
    constant = [c for c in FACTORIAL_COMPONENTS if design[c].nunique() < 2]
    n_terms = 1 + len(FACTORIAL_COMPONENTS) + len(FACTORIAL_COMPONENTS) * (len(FACTORIAL_COMPONENTS) - 1) // 2
    if constant or len(design) <= n_terms:
        raise ValueError(
            f"the factorial model {FACTORIAL_FORMULA!r} has {n_terms} coefficients and needs more runs than that, "
            f"with every component both on and off; got {len(design)} runs"
            + (f" and components that never vary: {constant}" if constant else "")
            + ". Run all 16 arms of the factorial study (python -m experiments.ablate --study factorial)."
        )
    model = smf.ols(FACTORIAL_FORMULA, data=design).fit()
    interval = model.conf_int(alpha=1 - confidence)
    effects = pd.DataFrame({
        "term": model.params.index,
        "effect": model.params.to_numpy(),
        "ci_low": interval[0].to_numpy(),
        "ci_high": interval[1].to_numpy(),
        "std_error": model.bse.to_numpy(),
        "t_statistic": model.tvalues.to_numpy(),
        "p_value": model.pvalues.to_numpy(),
    })
    effects = effects[effects["term"] != "Intercept"].reset_index(drop=True)
    effects["p_value_holm"] = holm(effects["p_value"])
    effects.insert(1, "kind", np.where(effects["term"].str.contains(":"), "interaction", "main effect"))
    anova = sm.stats.anova_lm(model, typ=2).reset_index().rename(columns={"index": "term"})
    return effects, anova


def learning_curve_table(histories: pd.DataFrame, threshold: float = 0.99) -> pd.DataFrame:
    """Per run, from per-epoch metrics (run_id, arm, seed, epoch, accuracy, val_accuracy; epoch from 0).

    epochs_to_threshold: first epoch (counting from 1) whose validation accuracy reaches ``threshold``
    (NaN if never); best_epoch and best_val_accuracy: the epoch of the highest validation accuracy;
    final_gap: training minus validation accuracy at the last epoch (positive = overfitting, negative is
    usual with augmentation and dropout, which handicap the training pass).
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold {threshold!r}: expected a validation accuracy in (0, 1], e.g. 0.99.")
    rows = []
    for (arm, seed, run_id), history in histories.groupby(["arm", "seed", "run_id"], sort=False):
        history = history.sort_values("epoch")
        validation = history["val_accuracy"].to_numpy(dtype=float)
        reached = np.flatnonzero(validation >= threshold)
        best = int(np.nanargmax(validation)) if np.isfinite(validation).any() else None
        last = history.iloc[-1]
        rows.append({
            "arm": arm, "seed": seed, "run_id": run_id, "epochs": len(history),
            "epochs_to_threshold": float(history["epoch"].iloc[reached[0]] + 1) if len(reached) else np.nan,
            "best_epoch": float(history["epoch"].iloc[best] + 1) if best is not None else np.nan,
            "best_val_accuracy": float(validation[best]) if best is not None else np.nan,
            "final_val_accuracy": float(last["val_accuracy"]),
            "final_gap": float(last["accuracy"] - last["val_accuracy"]),
        })
    return pd.DataFrame(rows, columns=["arm", "seed", "run_id", "epochs", "epochs_to_threshold", "best_epoch",
                                       "best_val_accuracy", "final_val_accuracy", "final_gap"])


def learning_curve_summary(per_run: pd.DataFrame, threshold: float = 0.99) -> pd.DataFrame:
    """Per arm, the mean over seeds of ``learning_curve_table``'s columns and how many seeds reached ``threshold``."""
    grouped = per_run.groupby("arm", sort=False)
    summary = pd.DataFrame({
        "n_seeds": grouped.size(),
        "threshold": threshold,
        "n_reached_threshold": grouped["epochs_to_threshold"].count(),
        # Mean over the seeds that got there; n_reached_threshold says how many that is.
        "epochs_to_threshold_mean": grouped["epochs_to_threshold"].mean(),
        "best_epoch_mean": grouped["best_epoch"].mean(),
        "best_val_accuracy_mean": grouped["best_val_accuracy"].mean(),
        "final_val_accuracy_mean": grouped["final_val_accuracy"].mean(),
        "final_gap_mean": grouped["final_gap"].mean(),
    }).reset_index()
    return summary


def mean_curves(histories: pd.DataFrame, metric: str = "val_accuracy",
                confidence: float = DEFAULT_CONFIDENCE) -> pd.DataFrame:
    """Per arm and epoch: the mean of ``metric`` over seeds with its t interval (NaN bounds with one seed)."""
    rows = []
    for (arm, epoch), group in histories.groupby(["arm", "epoch"], sort=False):
        interval = mean_confidence_interval(group[metric], confidence)
        rows.append({"arm": arm, "epoch": epoch, "n": interval.n, "mean": interval.mean,
                     "ci_low": interval.low, "ci_high": interval.high})
    return pd.DataFrame(rows, columns=["arm", "epoch", "n", "mean", "ci_low", "ci_high"])
