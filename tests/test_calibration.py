"""Calibration of the statistical core: simulate whole studies, check error rates, coverage and power.

Each simulated study draws a fresh test set from an image population and trains fresh seeds, so "the truth" is
the recipe-level difference over the image population, never this sample's. The population:

* per-image difficulty shared by all runs: 99% of images are right in every run, the other 1% ("hard") have a
  logit of being right ~ N(-1, 5^2);
* image-level arm preferences that average to zero: each arm has its own logit preference on every hard image,
  ~ N(0, 2.5^2), so the two arms prefer different images;
* run-to-run shifts: every run (arm, seed) gets its own logit offset ~ N(0, 0.3^2);
* a seed effect shared across arms: the same seed shifts both arms' logits by the same ~ N(0, 0.3^2);
* a real effect, where there is one, is a logit shift of one arm on the hard images; its population size is
  integrated exactly over the population (Gauss-Hermite quadrature), and the null is exactly zero.

These give what this project measures on MNIST (checked in the first test): accuracy about 99.4%, per-seed
accuracy standard deviation about 0.03 points, and a test-set sampling error of a recipe difference (about 0.03
points) larger than the seed error of a 3-seed mean difference (about 0.02 points). Studies keep the full
10,000 images; the easy 99% cost nothing to simulate (always right), so the noise structure and its ratios are
this project's own.

Monte-Carlo tolerance: a rate measured on N studies is compared with its target with the half-width of a 99%
normal interval, 2.576 * sqrt(target * (1 - target) / N). Every random draw comes from a fixed seed.
Run ``python tests/test_calibration.py`` to print every figure (the table in docs/statistics.md).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from functools import cache

import numpy as np
import pandas as pd
import pytest
from scipy import optimize, special
from scipy import stats as scipy_stats

from mnist_ablation import stats

ALPHA = 0.05
SEED_COUNTS = (3, 5, 10)
N_NULL = 2000  # studies per seed count with no real difference
N_EFFECT = 1500  # studies per seed count and effect size
N_EQUIVALENCE = 3000  # studies at the equivalence margin, per seed count
N_STOPPING = 2000
EQUIVALENCE_MARGIN = 0.001  # +-0.1 points, the library's default
Z_99 = 2.5758293035489004


def mc_tolerance(rate: float, n_studies: int) -> float:
    """Half-width of a 99% interval for a rate measured on ``n_studies`` studies."""
    return Z_99 * math.sqrt(rate * (1 - rate) / n_studies)


@dataclass(frozen=True)
class StudyModel:
    """The image population and the training noise of simulated studies (logit scale; see the module docstring)."""

    n_images: int = 10_000
    hard_fraction: float = 0.01
    difficulty_mean: float = -1.0
    difficulty_sd: float = 5.0
    preference_sd: float = 2.5
    run_shift_sd: float = 0.3
    seed_shift_sd: float = 0.3

    def simulate(self, rng: np.random.Generator, n_seeds: int, arm_effects=(0.0, 0.0)) -> np.ndarray:
        """correct[arm, seed, image] for one study: a fresh test set and fresh seeds for every arm."""
        n_hard = rng.binomial(self.n_images, self.hard_fraction)
        n_arms = len(arm_effects)
        difficulty = rng.normal(self.difficulty_mean, self.difficulty_sd, n_hard)
        preference = rng.normal(0, self.preference_sd, (n_arms, 1, n_hard))
        run_shift = rng.normal(0, self.run_shift_sd, (n_arms, n_seeds, 1))
        seed_shift = rng.normal(0, self.seed_shift_sd, (1, n_seeds, 1))
        logits = difficulty + preference + run_shift + seed_shift + np.asarray(arm_effects)[:, None, None]
        correct = np.ones((n_arms, n_seeds, self.n_images), dtype=bool)
        correct[:, :, :n_hard] = rng.random((n_arms, n_seeds, n_hard)) < special.expit(logits)
        return correct

    def _population_mean(self, function) -> float:
        """E[function(x)] over a hard image's logit x in one run: all four terms are normal, so x ~ N(mean, the
        sum of the variances); Gauss-Hermite quadrature integrates it exactly for this smooth integrand."""
        nodes, weights = np.polynomial.hermite_e.hermegauss(201)
        sd = math.sqrt(self.difficulty_sd ** 2 + self.preference_sd ** 2 + self.run_shift_sd ** 2
                       + self.seed_shift_sd ** 2)
        return float(np.sum(weights * function(self.difficulty_mean + sd * nodes)) / math.sqrt(2 * math.pi))

    def true_difference(self, effect: float) -> float:
        """Population difference: the arm with logit shift ``effect`` minus the other, over all images and seeds.

        On a hard image both arms' logits are normal with the same spread (the arms are exchangeable but for
        ``effect``), so the difference is hard_fraction * E[expit(x + effect) - expit(x)].
        """
        return self.hard_fraction * self._population_mean(lambda x: special.expit(x + effect) - special.expit(x))

    def true_accuracy(self) -> float:
        return 1 - self.hard_fraction * self._population_mean(lambda x: special.expit(-x))

    def effect_for(self, difference: float) -> float:
        """The logit shift whose population difference is ``difference``."""
        return optimize.brentq(lambda effect: self.true_difference(effect) - difference, -20, 20, xtol=1e-10)


MODEL = StudyModel()


def _estimate(correct: np.ndarray) -> stats.ContrastEstimate:
    """arm 1 minus arm 0 through the public path of compare_to_baseline (contrasts_to_baseline)."""
    n_seeds = correct.shape[1]
    array = stats.CorrectnessArray(("baseline", "arm"), np.arange(n_seeds), np.arange(correct.shape[2]), correct,
                                   np.ones((2, n_seeds), dtype=bool))
    return stats.contrasts_to_baseline(array)["arm"]


def _pooled_mcnemar_p(correct: np.ndarray) -> float:
    """The previous report's McNemar: discordant pairs summed over seeds, one exact binomial test (no longer used)."""
    from statsmodels.stats.contingency_tables import mcnemar

    baseline_only = int(np.sum(correct[0] & ~correct[1]))
    arm_only = int(np.sum(~correct[0] & correct[1]))
    if baseline_only + arm_only == 0:
        return 1.0
    return float(mcnemar([[0, baseline_only], [arm_only, 0]], exact=True).pvalue)


@cache
def null_studies(n_seeds: int) -> pd.DataFrame:
    """N_NULL studies with no recipe-level difference: the new and the old tests, and one arm's accuracy interval."""
    rng = np.random.default_rng(1000 + n_seeds)
    true_accuracy = MODEL.true_accuracy()
    rows = []
    for _ in range(N_NULL):
        correct = MODEL.simulate(rng, n_seeds)
        estimate = _estimate(correct)
        low, high = estimate.interval()
        low_fixed, high_fixed = estimate.interval_this_test_set()
        accuracy = stats.accuracy_interval(correct[0])
        per_seed = correct.mean(axis=2)
        rows.append({
            "p_value": estimate.p_value, "covered": low <= 0 <= high, "width": high - low,
            "covered_this_test_set": low_fixed <= 0 <= high_fixed,
            "p_value_this_test_set": estimate.p_value_this_test_set, "p_value_mcnemar": _pooled_mcnemar_p(correct),
            "equivalence_p_value": estimate.equivalence_p_value(EQUIVALENCE_MARGIN),
            "accuracy_covered": accuracy.low <= true_accuracy <= accuracy.high,
            "accuracy": per_seed[0].mean(), "accuracy_sd": per_seed[0].std(ddof=1),
            "seed_error": math.sqrt(estimate.seed_mean_variance / 3),
            "image_error": math.sqrt(estimate.image_variance / estimate.n_images),
        })
    return pd.DataFrame(rows)


EFFECT_SIZES = (0.001, 0.002)  # 0.1 and 0.2 points, arm better than the baseline


@cache
def effect_studies(n_seeds: int, difference: float) -> pd.DataFrame:
    rng = np.random.default_rng(2000 + n_seeds + int(difference * 1e5))
    effect = MODEL.effect_for(difference)
    rows = []
    for _ in range(N_EFFECT):
        correct = MODEL.simulate(rng, n_seeds, (0.0, effect))
        estimate = _estimate(correct)
        low, high = estimate.interval()
        low_fixed, high_fixed = estimate.interval_this_test_set()
        rows.append({"p_value": estimate.p_value, "covered": low <= difference <= high,
                     "covered_this_test_set": low_fixed <= difference <= high_fixed,
                     "p_value_this_test_set": estimate.p_value_this_test_set,
                     "p_value_mcnemar": _pooled_mcnemar_p(correct)})
    return pd.DataFrame(rows)


@cache
def margin_studies(n_seeds: int) -> pd.DataFrame:
    """Studies whose true difference is exactly the equivalence margin: "equivalent" would be a false claim."""
    rng = np.random.default_rng(3000 + n_seeds)
    effect = MODEL.effect_for(EQUIVALENCE_MARGIN)
    p_values = [_estimate(MODEL.simulate(rng, n_seeds, (0.0, effect))).equivalence_p_value(EQUIVALENCE_MARGIN)
                for _ in range(N_EQUIVALENCE)]
    return pd.DataFrame({"equivalence_p_value": p_values})


STOPPING_RULE = {"start": 3, "target_width": 0.0013, "max_seeds": 10}


@cache
def stopped_studies() -> pd.DataFrame:
    """Studies with no real difference run under the precision rule: start with 3 seeds, add one while the
    rule says so, then test once at the end."""
    rng = np.random.default_rng(4000)
    rows = []
    for _ in range(N_STOPPING):
        correct = MODEL.simulate(rng, STOPPING_RULE["max_seeds"])  # seeds are revealed one at a time
        n_seeds = STOPPING_RULE["start"]
        while True:
            estimate = _estimate(correct[:, :n_seeds])
            low, high = estimate.interval()
            reason = stats.precision_stop_reason(high - low, estimate.floor_width(), n_seeds,
                                                 STOPPING_RULE["target_width"], STOPPING_RULE["max_seeds"])
            if reason is not None:
                break
            n_seeds += 1
        rows.append({"n_seeds": n_seeds, "reason": reason.split(" to ")[0], "p_value": estimate.p_value})
    return pd.DataFrame(rows)


def _rate(p_values: pd.Series) -> float:
    return float((p_values < ALPHA).mean())


# -- the simulated studies are this project's ---------------------------------------------------------------


def test_simulated_studies_look_like_this_project():
    studies = null_studies(10)
    assert 0.990 <= studies["accuracy"].mean() <= 0.996
    assert 0.0002 <= studies["accuracy_sd"].mean() <= 0.0005  # 0.02 - 0.05 points per seed
    # The test set's own sampling error of a recipe difference is larger than a 3-seed mean's seed error.
    assert studies["image_error"].mean() > studies["seed_error"].mean()
    assert MODEL.true_difference(0.0) == 0.0 and MODEL.true_difference(MODEL.effect_for(0.002)) == pytest.approx(0.002)


# -- the new test: nominal false positives, coverage, power -------------------------------------------------


@pytest.mark.parametrize("n_seeds", SEED_COUNTS)
def test_false_positive_rate_is_at_most_nominal(n_seeds):
    rate = _rate(null_studies(n_seeds)["p_value"])
    assert rate <= ALPHA + mc_tolerance(ALPHA, N_NULL), f"{n_seeds} seeds: {rate:.3f} false positives"


@pytest.mark.parametrize("n_seeds", SEED_COUNTS)
def test_old_methods_reject_true_nulls_far_too_often(n_seeds):
    """Pooled McNemar and the seed-only paired t-test (the previous report's tests) fail the same check."""
    studies = null_studies(n_seeds)
    for column in ("p_value_mcnemar", "p_value_this_test_set"):
        rate = _rate(studies[column])
        assert rate - mc_tolerance(rate, N_NULL) > 1.5 * ALPHA, f"{column} at {n_seeds} seeds: {rate:.3f}"


@pytest.mark.parametrize("n_seeds", SEED_COUNTS)
@pytest.mark.parametrize("difference", (0.0, *EFFECT_SIZES))
def test_intervals_cover_the_population_difference(n_seeds, difference):
    studies = null_studies(n_seeds) if difference == 0 else effect_studies(n_seeds, difference)
    assert studies["covered"].mean() >= 0.93, f"{n_seeds} seeds, difference {difference}"


def test_real_effects_are_found():
    power = {(n, d): _rate(effect_studies(n, d)["p_value"]) for n in SEED_COUNTS for d in EFFECT_SIZES}
    assert power[5, 0.002] >= 0.9 and power[10, 0.002] >= 0.9  # 0.2 points
    assert power[10, 0.001] >= 0.5  # 0.1 points, ten seeds
    for difference in EFFECT_SIZES:  # more seeds, more power
        assert power[3, difference] <= power[5, difference] + 0.03 <= power[10, difference] + 0.06


def test_one_arms_accuracy_interval_covers_the_population_accuracy():
    for n_seeds in SEED_COUNTS:
        assert null_studies(n_seeds)["accuracy_covered"].mean() >= 0.93, n_seeds


# -- equivalence -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_seeds", (3, 10))
def test_equivalence_is_rarely_claimed_when_the_difference_is_the_margin(n_seeds):
    rate = _rate(margin_studies(n_seeds)["equivalence_p_value"])
    assert rate <= ALPHA + mc_tolerance(ALPHA, N_EQUIVALENCE), f"{n_seeds} seeds: {rate:.3f} false equivalence"


def test_equivalence_is_found_when_there_is_no_difference():
    assert _rate(null_studies(10)["equivalence_p_value"]) >= 0.5
    assert _rate(null_studies(3)["equivalence_p_value"]) < _rate(null_studies(10)["equivalence_p_value"])


# -- the precision stopping rule ------------------------------------------------------------------------------


def test_precision_stopping_rule_keeps_the_false_positive_rate():
    studies = stopped_studies()
    rate = _rate(studies["p_value"])
    assert rate <= ALPHA + mc_tolerance(ALPHA, N_STOPPING), f"{rate:.3f} false positives after stopping"
    reasons = Counter(studies["reason"])
    assert set(reasons) == {stats.TARGET_REACHED, stats.MAX_SEEDS_REACHED, "test set limits this difference"}
    assert min(reasons.values()) >= 50  # every branch of the rule is exercised
    assert 3 < studies["n_seeds"].mean() < 10


# -- the tidy-frame path gives the calibrated numbers ------------------------------------------------------------


def test_compare_to_baseline_reports_the_calibrated_estimates():
    rng = np.random.default_rng(5000)
    for n_seeds in (3, 5):
        correct = MODEL.simulate(rng, n_seeds, (0.0, MODEL.effect_for(0.001)))
        arms, seeds, images = np.meshgrid(["baseline", "arm"], np.arange(n_seeds), np.arange(MODEL.n_images),
                                          indexing="ij")
        frame = pd.DataFrame({"arm": arms.ravel(), "seed": seeds.ravel(), "image": images.ravel(),
                              "correct": correct.ravel()})
        row = stats.compare_to_baseline(frame).iloc[0]
        estimate = stats.crossed_contrast(correct[1].astype(float) - correct[0])
        low, high = estimate.interval()
        assert row["arm"] == "arm" and row["n_pairs"] == n_seeds
        assert row["p_value"] == pytest.approx(estimate.p_value, rel=1e-9)
        assert (row["delta_ci_low"], row["delta_ci_high"]) == pytest.approx((low, high), rel=1e-9)
        assert row["equivalence_p_value"] == pytest.approx(estimate.equivalence_p_value(), rel=1e-9)
        # The seed-only column is the previous report's paired t-test over per-seed accuracies.
        legacy = scipy_stats.ttest_rel(correct[1].mean(axis=1), correct[0].mean(axis=1))
        assert row["p_value_this_test_set"] == pytest.approx(legacy.pvalue, rel=1e-6)


# -- the figures for docs/statistics.md ---------------------------------------------------------------------------


def main() -> None:
    def percent(value):
        return f"{100 * value:.1f}%"

    print(f"image population: accuracy {100 * MODEL.true_accuracy():.2f}%; studies of {MODEL.n_images} images")
    print("\nNo real difference, N =", N_NULL, "studies per row")
    print("| seeds | false positives: crossed | seed-only paired t | pooled McNemar | coverage: crossed | seed-only "
          "| accuracy interval coverage | per-seed SD | seed error of the mean difference | image error |")
    for n in SEED_COUNTS:
        s = null_studies(n)
        print(f"| {n} | {percent(_rate(s['p_value']))} | {percent(_rate(s['p_value_this_test_set']))} | "
              f"{percent(_rate(s['p_value_mcnemar']))} | {percent(s['covered'].mean())} | "
              f"{percent(s['covered_this_test_set'].mean())} | {percent(s['accuracy_covered'].mean())} | "
              f"{100 * s['accuracy_sd'].mean():.3f} pt | {100 * s['seed_error'].mean() * math.sqrt(3 / n):.3f} pt | "
              f"{100 * s['image_error'].mean():.3f} pt |")
    print("\nA real difference, N =", N_EFFECT, "studies per row")
    print("| seeds | true difference | power: crossed | seed-only paired t | pooled McNemar | coverage: crossed | "
          "seed-only |")
    for difference in EFFECT_SIZES:
        for n in SEED_COUNTS:
            s = effect_studies(n, difference)
            print(f"| {n} | {100 * difference:.1f} pt | {percent(_rate(s['p_value']))} | "
                  f"{percent(_rate(s['p_value_this_test_set']))} | {percent(_rate(s['p_value_mcnemar']))} | "
                  f"{percent(s['covered'].mean())} | {percent(s['covered_this_test_set'].mean())} |")
    print("\nEquivalence (TOST, margin 0.1 pt), N =", N_EQUIVALENCE, "studies at the margin")
    print("| seeds | 'equivalent' when the difference is the margin | 'equivalent' when there is no difference |")
    for n in (3, 10):
        print(f"| {n} | {percent(_rate(margin_studies(n)['equivalence_p_value']))} | "
              f"{percent(_rate(null_studies(n)['equivalence_p_value']))} |")
    s = stopped_studies()
    print(f"\nstopping rule {STOPPING_RULE}, N = {N_STOPPING}: false positives {percent(_rate(s['p_value']))}, "
          f"mean seeds {s['n_seeds'].mean():.2f}, reasons {dict(Counter(s['reason']))}")


if __name__ == "__main__":
    main()
