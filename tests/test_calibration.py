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

A second family, ``AuditModel``, is unlike the first (heavy-tailed difficulty, arms that swap which images are
hard, seeds that scale how often hard images are missed, rare bad seeds). The checks cover 2, 3, 5 and 10 seeds,
families of 4 null arms under Holm, unpaired arms, the precision rule (Stein's two stages) from 2 and 3 seeds with
targets at and above the test-set floor, power at the report's smallest visible effect, the pooled 2^4 factorial
at 2 seeds, and TOST at the margin.

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


@dataclass(frozen=True)
class AuditModel:
    """A second family of simulated studies, unlike ``StudyModel`` (after the issue-21 audit):

    * heavy-tailed image difficulty: 2% of images are hard, with a logit of being right ~ 2 + 1.5 t(3);
    * arms that change *which* images are hard without changing the mean: each arm swaps the difficulties of a
      random 10% of the hard images among themselves (so arms are exchangeable and the null is exactly zero);
    * seeds that scale how often the hard images are missed: every run gets its own odds multiplier of missing,
      exp(N(0, 0.5^2)), and no seed effect shared by the arms (nothing for pairing to cancel);
    * optionally, rare bad seeds in one arm: with probability ``bad_seed_rate`` a run misclassifies 30 more
      (otherwise easy) images, and its other runs are shifted so that its population mean is the baseline's.
    """

    n_images: int = 10_000
    n_hard: int = 200
    difficulty_centre: float = 2.0
    difficulty_scale: float = 1.5
    difficulty_tail_df: float = 3.0
    swap_fraction: float = 0.1
    run_scale_sd: float = 0.5
    bad_seed_errors: int = 30

    def simulate(self, rng: np.random.Generator, n_seeds: int, arm_effects=(0.0, 0.0), bad_seed_rate: float = 0.0):
        """correct[arm, seed, image]; with ``bad_seed_rate`` the last arm has rare bad seeds (mean unchanged)."""
        n_arms = len(arm_effects)
        base = self.difficulty_centre + self.difficulty_scale * rng.standard_t(self.difficulty_tail_df, self.n_hard)
        difficulty = np.empty((n_arms, 1, self.n_hard))
        for arm in range(n_arms):
            order = np.arange(self.n_hard)
            swapped = np.flatnonzero(rng.random(self.n_hard) < self.swap_fraction)
            order[swapped] = rng.permutation(swapped)
            difficulty[arm, 0] = base[order]
        effects = np.asarray(arm_effects, dtype=float)[:, None, None] * np.ones((1, n_seeds, 1))
        bad = np.zeros(n_seeds, dtype=bool)
        if bad_seed_rate:
            bad = rng.random(n_seeds) < bad_seed_rate
            effects[-1, ~bad] += _compensating_shift(self, bad_seed_rate)
        logits = difficulty - rng.normal(0, self.run_scale_sd, (n_arms, n_seeds, 1)) + effects
        correct = np.ones((n_arms, n_seeds, self.n_images), dtype=bool)
        correct[:, :, :self.n_hard] = rng.random((n_arms, n_seeds, self.n_hard)) < special.expit(logits)
        for seed in np.flatnonzero(bad):
            correct[-1, seed, self.n_hard + rng.choice(self.n_images - self.n_hard, self.bad_seed_errors,
                                                        replace=False)] = False
        return correct, bad

    def compensating_shift(self, bad_seed_rate: float) -> float:
        """Logit shift of the good runs that makes an arm with rare bad seeds as accurate as the baseline on average
        (Monte Carlo over the hard images' logits, fixed seed)."""
        rng = np.random.default_rng(99)
        x = (self.difficulty_centre + self.difficulty_scale * rng.standard_t(self.difficulty_tail_df, 400_000)
             - rng.normal(0, self.run_scale_sd, 400_000))
        loss = bad_seed_rate * self.bad_seed_errors / self.n_images
        gain = lambda shift: (1 - bad_seed_rate) * self.n_hard / self.n_images * np.mean(  # noqa: E731
            special.expit(x + shift) - special.expit(x))
        return optimize.brentq(lambda shift: gain(shift) - loss, 0, 5, xtol=1e-8)


@cache
def _compensating_shift(model: AuditModel, bad_seed_rate: float) -> float:
    return model.compensating_shift(bad_seed_rate)


class _AuditStudies:
    """``AuditModel`` with the ``simulate(rng, n_seeds, arm_effects)`` of ``StudyModel`` (no bad seeds)."""

    def __init__(self, model: AuditModel):
        self.model = model

    def simulate(self, rng, n_seeds, arm_effects=(0.0, 0.0)):
        return self.model.simulate(rng, n_seeds, arm_effects)[0]


AUDIT_MODEL = AuditModel()
MODELS = {"project": MODEL, "audit": _AuditStudies(AUDIT_MODEL)}
N_FAMILY = 1500  # studies with 4 null arms, per family and seed count
N_PRECISION = 1500  # precision-rule studies per case
N_POWER = 600
N_FACTORIAL = 400
N_PLANS = 300  # studies whose smallest visible effect is solved for (a root search each)
N_BAD_SEEDS = 1000
FAMILY_CASES = (("project", 2), ("project", 3), ("audit", 2), ("audit", 3))
PRECISION_CASES = (("project", 2, 0.0013), ("project", 2, 0.003), ("project", 3, 0.003),
                   ("audit", 2, 0.003), ("audit", 3, 0.003))
POWER_SEEDS = (2, 3)


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


def _precision_study(correct: np.ndarray, start: int, target_width: float, max_seeds: int):
    """One arm under the precision rule (Stein's two stages): the first ``start`` seeds decide how many seeds
    the arm gets; the final test is the two-stage estimate on all of them."""
    first = _estimate(correct[:, :start])
    planned, reason = stats.precision_seeds(first, target_width, max_seeds)
    final = stats.two_stage_estimate(first, _estimate(correct[:, :planned]))
    return planned, reason.split(" to ")[0], final


@cache
def stopped_studies(model_name: str = "project", start: int = STOPPING_RULE["start"],
                    target_width: float = STOPPING_RULE["target_width"]) -> pd.DataFrame:
    """Studies with no real difference run under the precision rule, from ``start`` seeds up to 10."""
    model = MODELS[model_name]
    rng = np.random.default_rng(4000 + 10 * start + int(target_width * 1e5))
    rows = []
    default = (model_name, start, target_width) == ("project", STOPPING_RULE["start"], STOPPING_RULE["target_width"])
    for _ in range(N_STOPPING if default else N_PRECISION):
        correct = model.simulate(rng, STOPPING_RULE["max_seeds"])  # seeds are revealed as the rule asks
        n_seeds, reason, final = _precision_study(correct, start, target_width, STOPPING_RULE["max_seeds"])
        low, high = final.interval()
        rows.append({"n_seeds": n_seeds, "reason": reason, "p_value": final.p_value, "covered": low <= 0 <= high})
    return pd.DataFrame(rows)


def _array(correct: np.ndarray, seeds=None, present=None) -> stats.CorrectnessArray:
    n_arms, n_seeds, n_images = correct.shape
    arms = ("baseline", *(f"arm{a}" for a in range(1, n_arms)))
    return stats.CorrectnessArray(arms, np.arange(n_seeds) if seeds is None else seeds, np.arange(n_images), correct,
                                  np.ones((n_arms, n_seeds), dtype=bool) if present is None else present)


@cache
def null_families(model_name: str, n_seeds: int) -> pd.DataFrame:
    """N_FAMILY studies of a baseline and 4 arms, none different: one arm's test and interval, Holm's family-wise
    error over the 4, and an unpaired comparison (the arm on n other seeds than the baseline's)."""
    model = MODELS[model_name]
    rng = np.random.default_rng(6000 + n_seeds + (500 if model_name == "audit" else 0))
    rows = []
    for study in range(N_FAMILY):
        # 2n seeds: the first n for the paired family, arm2's first n against the baseline's last n (unpaired).
        both = model.simulate(rng, 2 * n_seeds, (0.0,) * 5)
        correct = both[:, :n_seeds]
        estimates = stats.contrasts_to_baseline(_array(correct))
        p_values = [estimate.p_value for estimate in estimates.values()]
        low, high = estimates["arm1"].interval()
        unpaired = stats.unpaired_contrast(both[2, :n_seeds], both[0, n_seeds:])
        unpaired_low, unpaired_high = unpaired.interval()
        rows.append({"p_value": p_values[0], "covered": low <= 0 <= high,
                     "family_rejects": bool((stats.holm(p_values) < ALPHA).any()),
                     "mde": estimates["arm1"].minimum_detectable_effect(ALPHA / 4) if study < N_PLANS else np.nan,
                     "p_value_unpaired": unpaired.p_value, "unpaired_covered": unpaired_low <= 0 <= unpaired_high})
    return pd.DataFrame(rows)


@cache
def visible_effect_power(n_seeds: int) -> tuple[float, float]:
    """Power after Holm over 4 arms at the median smallest visible effect the null studies report."""
    effect = float(null_families("project", n_seeds)["mde"].median())
    shift = MODEL.effect_for(effect)
    rng = np.random.default_rng(7000 + n_seeds)
    found = 0
    for _ in range(N_POWER):
        correct = MODEL.simulate(rng, n_seeds, (0.0, shift, 0.0, 0.0, 0.0))
        p_values = [estimate.p_value for estimate in stats.contrasts_to_baseline(_array(correct)).values()]
        found += stats.holm(p_values)[0] < ALPHA
    return found / N_POWER, effect


@cache
def factorial_studies() -> pd.DataFrame:
    """2^4 factorials at 2 seeds with no real effect (16 exchangeable cells of the project's model)."""
    import itertools

    cells = list(itertools.product((False, True), repeat=4))
    design = pd.DataFrame([{"arm": arm, **dict(zip("abcd", cell))}
                           for arm, cell in zip(("baseline", *(f"arm{a}" for a in range(1, 16))), cells)])
    rng = np.random.default_rng(8000)
    rows = []
    for _ in range(N_FACTORIAL):
        result = stats.factorial_contrasts(_array(MODEL.simulate(rng, 2, (0.0,) * 16)), design)
        leading = result.effects[result.effects["holm_family"] == stats.LEADING_FAMILY]
        main = result.effects[result.effects["order"] == 1]
        rows.append({"family_rejects": bool((leading["p_value_holm"] < ALPHA).any()),
                     "covered": bool(((main["ci_low"] <= 0) & (main["ci_high"] >= 0)).iloc[0]),
                     "pooled": result.pooled,
                     "main_half_width": float((main["ci_high"] - main["ci_low"]).median() / 2)})
    return pd.DataFrame(rows)


@cache
def bad_seed_studies(n_seeds: int = 5, rate: float = 0.1) -> pd.DataFrame:
    rng = np.random.default_rng(9000 + n_seeds)
    rows = []
    for _ in range(N_BAD_SEEDS):
        correct, bad = AUDIT_MODEL.simulate(rng, n_seeds, (0.0, 0.0), bad_seed_rate=rate)
        array = _array(correct)
        per_seed = stats.per_seed_differences(array)
        rows.append({"p_value": stats.contrasts_to_baseline(array)["arm1"].p_value, "bad_seeds": int(bad.sum()),
                     "worst_seed_delta": float(per_seed["delta"].min())})
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


@pytest.mark.parametrize(("model_name", "start", "target_width"), PRECISION_CASES)
def test_precision_rule_from_2_and_3_seeds_keeps_its_level_and_coverage(model_name, start, target_width):
    """Targets near the test-set floor (0.13 points) and well above it (0.3), both simulated families."""
    studies = stopped_studies(model_name, start, target_width)
    rate = _rate(studies["p_value"])
    assert rate <= ALPHA + mc_tolerance(ALPHA, N_PRECISION), f"{rate:.3f} false positives"
    assert studies["covered"].mean() >= 0.93
    if target_width > 0.002:  # well above the floor: most arms stop on the target, not on the floor
        assert (studies["reason"] == "test set limits this difference").mean() < 0.5


# -- 2 seeds, families of arms, a second family of simulated studies ------------------------------------------------


@pytest.mark.parametrize(("model_name", "n_seeds"), FAMILY_CASES)
def test_fixed_seeds_false_positives_coverage_and_family_wise_error(model_name, n_seeds):
    studies = null_families(model_name, n_seeds)
    tolerance = mc_tolerance(ALPHA, N_FAMILY)
    assert _rate(studies["p_value"]) <= ALPHA + tolerance, "one arm's false positives"
    assert studies["covered"].mean() >= 0.93
    assert studies["family_rejects"].mean() <= ALPHA + tolerance, "family-wise error over 4 null arms (Holm)"


@pytest.mark.parametrize("n_seeds", (2, 3))
def test_unpaired_arms_keep_their_level(n_seeds):
    studies = null_families("project", n_seeds)
    assert _rate(studies["p_value_unpaired"]) <= ALPHA + mc_tolerance(ALPHA, N_FAMILY)
    assert studies["unpaired_covered"].mean() >= 0.93


@pytest.mark.parametrize("n_seeds", (2, 5))
def test_equivalence_at_the_margin_with_few_seeds(n_seeds):
    rate = _rate(margin_studies(n_seeds)["equivalence_p_value"])
    assert rate <= ALPHA + mc_tolerance(ALPHA, N_EQUIVALENCE), f"{n_seeds} seeds: {rate:.3f} false equivalence"


@pytest.mark.parametrize("n_seeds", POWER_SEEDS)
def test_the_smallest_visible_effect_is_seen_with_the_power_it_promises(n_seeds):
    """The report's smallest visible effect (mde at alpha / 4, 80% power) really is detected >= 78% of the time
    after Holm over 4 arms, the other 3 null."""
    power, effect = visible_effect_power(n_seeds)
    assert power >= 0.78 - mc_tolerance(0.8, N_POWER), f"{n_seeds} seeds: power {power:.3f} at {100 * effect:.3f} pt"


def test_pooled_factorial_is_usable_at_2_seeds_and_keeps_the_family_wise_error():
    studies = factorial_studies()
    tolerance = mc_tolerance(ALPHA, N_FACTORIAL)
    assert studies["family_rejects"].mean() <= ALPHA + tolerance, "main effects + two-way interactions, Holm"
    assert studies["covered"].mean() >= 0.93
    assert studies["pooled"].mean() >= 0.9  # the homogeneity check rarely refuses a homogeneous design
    # A main effect's interval at 2 seeds: tenths of a point, not +-8.
    assert studies["main_half_width"].median() < 0.004


def test_rare_bad_seeds_are_a_limit_the_report_states():
    """An arm with a bad seed 1 time in 10 (30 extra errors, mean unchanged): with 5 seeds most studies draw no
    bad seed, and the test rejects more often than 5% (no test can see what was not drawn). Measured, bounded,
    and the worst seed is visible where one was drawn."""
    studies = bad_seed_studies()
    assert _rate(studies["p_value"]) <= 0.15
    drawn = studies["bad_seeds"] > 0
    assert studies.loc[drawn, "worst_seed_delta"].median() < studies.loc[~drawn, "worst_seed_delta"].median() - 0.001
    assert 0.3 < drawn.mean() < 0.5  # 1 - 0.9^5 = 41% of 5-seed studies draw a bad seed


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
    print(f"\nFixed seeds, a baseline and 4 null arms, N = {N_FAMILY} studies per row")
    print("| family | seeds | false positives (one arm) | 95% coverage | family-wise error, Holm over 4 | "
          "unpaired: false positives | unpaired coverage |")
    for model_name, n in FAMILY_CASES:
        f = null_families(model_name, n)
        print(f"| {model_name} | {n} | {percent(_rate(f['p_value']))} | {percent(f['covered'].mean())} | "
              f"{percent(f['family_rejects'].mean())} | {percent(_rate(f['p_value_unpaired']))} | "
              f"{percent(f['unpaired_covered'].mean())} |")
    print(f"\nPrecision rule (Stein's two stages, up to {STOPPING_RULE['max_seeds']} seeds), N = {N_PRECISION} "
          f"studies per row (project, start 3, W = 0.13: N = {N_STOPPING})")
    print("| family | start | target width | false positives | 95% coverage | mean seeds | stopped: target / max / "
          "test set |")
    for model_name, start, width in (("project", 3, STOPPING_RULE["target_width"]), *PRECISION_CASES):
        p = stopped_studies(model_name, start, width)
        reasons = Counter(p["reason"])
        print(f"| {model_name} | {start} | {100 * width:.2f} pt | {percent(_rate(p['p_value']))} | "
              f"{percent(p['covered'].mean())} | {p['n_seeds'].mean():.1f} | {reasons[stats.TARGET_REACHED]} / "
              f"{reasons[stats.MAX_SEEDS_REACHED]} / {reasons['test set limits this difference']} |")
    print(f"\nEquivalence at the margin (N = {N_EQUIVALENCE}): " + ", ".join(
        f"{n} seeds {percent(_rate(margin_studies(n)['equivalence_p_value']))}" for n in (2, 3, 5, 10)))
    print(f"\nPower after Holm over 4 arms at the median reported smallest visible effect (N = {N_POWER}): "
          + ", ".join(f"{n} seeds: {percent(visible_effect_power(n)[0])} at {100 * visible_effect_power(n)[1]:.3f} pt"
        for n in POWER_SEEDS))
    f = factorial_studies()
    print(f"\nPooled 2^4 factorial at 2 seeds, no real effect (N = {N_FACTORIAL}): family-wise error (10 terms, Holm) "
          f"{percent(f['family_rejects'].mean())}, main-effect coverage {percent(f['covered'].mean())}, pooled in "
          f"{percent(f['pooled'].mean())}, median main-effect half-width {100 * f['main_half_width'].median():.3f} pt")
    b = bad_seed_studies()
    print(f"\nRare bad seeds (1 in 10, audit family, 5 seeds, N = {N_BAD_SEEDS}): false positives "
          f"{percent(_rate(b['p_value']))}; studies that drew a bad seed {percent((b['bad_seeds'] > 0).mean())}")


if __name__ == "__main__":
    main()
