"""The statistics of an ablation study: pure functions on arrays and DataFrames (no MLflow here).

The unit of inference is a *recipe* (a training configuration), not one trained model and not this one test
set: a claim such as "batch norm is worth 0.1 points" is about training with new seeds and testing on new
images from the same population. Every run (arm, training seed) of a study is scored on the same test images,
so seeds and images form a *crossed* design and both are random. docs/statistics.md explains every choice.

The crossed-design API (what the report and the precision rule use):

* ``crossed_contrast`` -> ``ContrastEstimate``: a contrast between arms (arm minus baseline, or a factorial
  effect) per (seed, image), a two-way random-effects analysis (seeds x images, no replication) with
  method-of-moments variance components as in multi-reader multi-case analysis (Obuchowski & Rockette 1995;
  Hillis 2007), its seed term never below the runs' own per-image noise: interval, p-value, TOST equivalence,
  power and planning for a stated effect (``power_at``, ``seeds_for_effect``, ``seeds_for_width``);
* ``compare_to_baseline``: one row per arm against the baseline from the tidy per-image frame, with Holm over
  every compared arm, the smallest visible effect, the seeds that detect ``smallest_effect``, the test-image
  floor, the "this test set only" seed-level columns, Wilcoxon on integer counts and Hedges-corrected d_z (an
  arm with no seed in common with the baseline: ``unpaired_contrast``); ``per_seed_differences``;
* ``accuracy_interval`` / ``accuracy_table``: one arm's accuracy, seeds and images random, on the logit scale
  (always within [0, 1]);
* ``factorial_contrasts`` (every term of the 2^k factorial through the same machinery, seeds paired across
  cells, the seed error pooled over the terms) and ``factorial_block_ols`` (run-level OLS with seed blocks,
  saturated model, imbalance warning); the components always come from the caller's design (the study);
* ``precision_seeds`` / ``precision_stop_reason`` / ``precision_decisions`` / ``two_stage_estimate``: Stein's
  two-stage rule for adding seeds (decided once from the first stage, whose seed variance the final test keeps);
* ``holm``: Holm's step-down adjustment in which a NaN p-value stays NaN but counts in the family;
* ``correct_frame`` / ``correctness_array``: the tidy per-image frame (arm, seed, image, correct) and its
  validated array form.

The report's earlier seed-only tests (a paired t-test over seeds with the test set fixed, McNemar with the
seeds' discordant pairs summed) are gone: their false-positive rates for recipe comparisons are far above
nominal, which tests/test_calibration.py still measures with reference implementations of them.

With fewer than two seeds (or paired seeds) seed variance cannot be estimated: intervals and tests come back
as NaN, never as a number that looks like one.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import optimize, special
from scipy import stats as scipy_stats

from .defaults import CONFIDENCE as DEFAULT_CONFIDENCE  # the defaults' one home, re-exported
from .defaults import EQUIVALENCE_MARGIN as DEFAULT_EQUIVALENCE_MARGIN
from .defaults import LEARNING_CURVE_THRESHOLD as DEFAULT_THRESHOLD
from .defaults import POWER as DEFAULT_POWER
from .defaults import check_confidence, check_equivalence_margin, check_smallest_effect, check_threshold

PLANNING_MARGIN = 1.2  # plans widen the standard error by this (see ContrastEstimate._planning_inflation)
SKEW_CORRECTION_MIN_DF = 8  # the equivalence test's skewness correction needs a well-estimated variance
WILCOXON_MIN_PAIRS = 6  # below this the two-sided signed-rank test cannot reach p < 0.05 (2 / 2**5 = 0.0625)
COMPARISON_COLUMNS = [
    "arm", "n_pairs", "baseline_accuracy", "arm_accuracy", "delta", "delta_ci_low", "delta_ci_high",
    "standard_error", "df", "p_value", "p_value_holm", "mde", "seeds_needed", "ci_width_floor",
    "seed_variance", "image_variance", "residual_variance",
    "delta_ci_low_this_test_set", "delta_ci_high_this_test_set", "p_value_this_test_set",
    "wilcoxon_p_value", "effect_size", "equivalence_margin", "equivalence_p_value", "equivalence_p_value_holm",
    "smallest_effect", "comparison",
]
PAIRED, UNPAIRED = "paired by seed", "unpaired (no seed in common with the baseline)"
ACCURACY_COLUMNS = [
    "arm", "n_seeds", "n_images", "test_accuracy_mean", "test_accuracy_ci_low", "test_accuracy_ci_high",
    "standard_error", "df",
]
FACTORIAL_EFFECT_COLUMNS = [
    "term", "kind", "order", "effect", "ci_low", "ci_high", "standard_error", "df", "p_value", "p_value_holm",
    "holm_family", "n_seeds", "seed_variance", "image_variance", "seed_error",
]
HOMOGENEITY_ALPHA = 0.05  # below this the terms' seed variances differ: no pooling
LEADING_FAMILY = "main effects and two-way interactions"
HIGHER_ORDER_FAMILY = "three-way and higher interactions"


def _check_probability(value: float, name: str) -> None:
    if not 0 < value < 1:
        raise ValueError(f"{name} {value!r}: expected a probability strictly between 0 and 1, e.g. 0.8.")


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
    check_confidence(confidence)
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


def holm(p_values) -> np.ndarray:
    """Holm-adjusted p-values over a family of tests; a NaN p-value stays NaN but still counts in the family.

    Every compared arm belongs to the family, including one whose test could not be computed (too few seeds, no
    spread): leaving it out would shrink the family and make the others look stronger. The adjustment is that of
    Holm (1979) with the family size k = len(p_values): the j-th smallest present p-value (j from 0) is multiplied
    by k - j, made monotone and capped at 1, which is what treating the NaN entries as p = 1 gives.
    """
    p_values = np.asarray(p_values, dtype=float)
    adjusted = np.full_like(p_values, np.nan)
    present = np.flatnonzero(~np.isnan(p_values))
    if len(present):
        order = present[np.argsort(p_values[present], kind="stable")]
        multipliers = len(p_values) - np.arange(len(order))
        adjusted[order] = np.minimum(np.maximum.accumulate(p_values[order] * multipliers), 1.0)
    return adjusted


def factorial_block_formula(components) -> str:
    """The run-level block model of a factorial over ``components``: seed blocks and the saturated factorial."""
    return "test_accuracy ~ C(seed) + " + " * ".join(components)


def factorial_design(runs: pd.DataFrame, design: pd.DataFrame, components=None) -> pd.DataFrame:
    """The factorial study's runs as a regression frame: test_accuracy and each component coded -0.5 / +0.5.

    ``runs`` has one row per run with ``arm`` and ``test_accuracy`` (and ``seed``, kept when present);
    ``design`` maps each arm to its components on/off (an ``arm`` column or index; bool, 0/1 or -0.5/+0.5), as
    for ``factorial_contrasts``: the components come from the study's definition, never from this module.
    """
    missing = [c for c in ("arm", "test_accuracy") if c not in runs]
    if missing:
        raise ValueError(f"factorial analysis needs the column(s) {missing} in the runs frame; got columns "
                         f"{list(runs.columns)}.")
    components, on = _factorial_cells(design, list(dict.fromkeys(runs["arm"])), components)
    coding = pd.DataFrame(np.where(on, 0.5, -0.5), columns=components, index=list(dict.fromkeys(runs["arm"])))
    frame = coding.loc[runs["arm"].to_numpy()].set_index(runs.index)
    frame.insert(0, "test_accuracy", runs["test_accuracy"].astype(float))
    for column in ("arm", "seed"):
        if column in runs:
            frame.insert(0, column, runs[column])
    return frame


def _t_quantile(probability: float, df: float) -> float:
    """Student-t quantile; ``special.stdtrit`` is the same function as ``scipy.stats.t.ppf``, 100x faster."""
    return float(special.stdtrit(df, probability))


def _t_interval(estimate: float, se: float, df: float, confidence: float) -> tuple[float, float]:
    """``estimate +- t(df) * se``: NaN where ``se`` is, zero width where it is 0."""
    if math.isnan(se):
        return float("nan"), float("nan")
    if se == 0:
        return estimate, estimate
    half_width = _t_quantile(0.5 + confidence / 2, df) * se
    return estimate - half_width, estimate + half_width


def _t_test_p(estimate: float, se: float, df: float) -> float:
    """Two-sided p-value of "the mean is zero": NaN where ``se`` is NaN or 0."""
    if math.isnan(se) or se == 0:
        return float("nan")
    return float(2 * special.stdtr(df, -abs(estimate / se)))


def _satterthwaite(parts) -> float:
    """Satterthwaite's degrees of freedom of a sum of independent variance terms, ``parts`` = [(term, its df)]:
    (sum of terms)^2 / sum(term^2 / df) over the terms above 0; NaN when every term is 0."""
    denominator = sum(part ** 2 / df for part, df in parts if part > 0)
    return sum(part for part, _ in parts) ** 2 / denominator if denominator > 0 else float("nan")


def _measured(se: float, estimate: float) -> float:
    """``se``, or NaN where it is 0 although ``estimate`` is not: a spread the design cannot measure is not an
    absence of spread, so it gives no interval rather than one of zero width."""
    return float("nan") if se == 0 and estimate != 0 else se


def _tost_p(estimate: float, se: float, df: float, margin: float, unskewed=None) -> float:
    """Two one-sided tests of "|mean| >= margin", the larger p-value; each statistic through ``unskewed``
    (a monotone transformation) when given. NaN where ``se`` is NaN or 0."""
    if math.isnan(se) or se == 0:
        return float("nan")
    unskewed = unskewed or (lambda statistic: statistic)
    above_lower = float(special.stdtr(df, -unskewed((estimate + margin) / se)))  # H0: <= -margin
    below_upper = float(special.stdtr(df, unskewed((estimate - margin) / se)))  # H0: >= +margin
    return max(above_lower, below_upper)


def _nonnegative(value: float) -> float:
    return float(np.maximum(value, 0.0))  # unlike max(), keeps NaN


class _TInference:
    """Student-t interval and test of ``estimate`` from its ``standard_error`` and ``df`` (both contrast kinds)."""

    def interval(self, confidence: float = DEFAULT_CONFIDENCE) -> tuple[float, float]:
        """Student-t interval ``estimate +- t(df) * standard_error`` (NaN with one seed or when it cannot be
        computed)."""
        check_confidence(confidence)
        return _t_interval(self.estimate, self.standard_error, self.df, confidence)

    @property
    def p_value(self) -> float:
        """Two-sided p-value for "the recipe-level contrast is zero" (NaN where it cannot be computed)."""
        return _t_test_p(self.estimate, self.standard_error, self.df)


@dataclass(frozen=True)
class ContrastEstimate(_TInference):
    """The mean of a contrast over a seeds x test-images design, with seeds and images both random.

    The model is two-way random effects without replication, ``d_si = mu + S_s + I_i + E_si``, for the contrast
    value ``d_si`` of seed s on image i. The variance of the mean ``estimate`` is estimated, as in multi-reader
    multi-case analysis (Obuchowski & Rockette 1995; Hillis 2007), by

        ``standard_error**2 = seed_mean_variance / n_seeds + image_variance / n_images``

    where ``seed_mean_variance = MS_seeds / n_images`` is the variance of the per-seed mean contrast over seeds
    (exactly what a paired t-test over seeds uses: the "this test set only" analysis) and ``image_variance =
    max(0, (MS_images - MS_residual) / n_seeds)`` the variance over images of the per-image expected contrast
    (what the finite test set adds). Degrees of freedom: Satterthwaite over the two terms, the seed term with
    ``n_seeds - 1`` and the image term with ``image_df``, its effective degrees of freedom measured from the
    spread of the per-image contributions (on MNIST only a few hundred images ever differ, so the image term is
    far less precise than its nominal ``n_images - 1``). With one seed the seed term cannot be estimated and
    every interval, p-value and plan is NaN.

    **The seed term never understates.** Its expectation is ``sigma_S^2 + sigma_E^2 / n_images``: never below
    the within-run (per-image Bernoulli) noise ``MS_residual / n_images``, which is estimated with far more
    degrees of freedom. With 2-3 seeds ``MS_seeds`` often falls below it by chance; the standard error then uses
    ``max(MS_seeds, MS_residual) / n_images`` (``seed_term_variance``), and the Satterthwaite df come from that
    floored term with the seed term's ``seed_df`` (``n_seeds - 1`` unless set: a pooled factorial error or a
    two-stage first stage sets it), so they cannot jump towards the image df by chance. A zero standard error with a
    non-zero estimate (every (seed, image) value equal, none zero) gives NaN, never a zero-width interval.

    ``skewness`` (the estimate's standardized third cumulant) and ``skew_covariance`` (the standardized
    covariance of the estimate with its own variance estimate) come from a jackknife over test images. Sparse
    per-image differences make the estimate skewed; two-sided intervals and tests are unaffected to first order
    (the Edgeworth terms cancel), one-sided tests are not, so the equivalence test corrects for them where the
    correction holds (``SKEW_CORRECTION_MIN_DF``).
    """

    estimate: float
    n_seeds: int
    n_images: int
    seed_mean_variance: float
    image_variance: float
    residual_variance: float
    image_df: float
    skewness: float = 0.0
    skew_covariance: float = 0.0
    seed_df: float = math.nan

    # -- variance components and precision ----------------------------------------------------------------

    @property
    def seed_variance(self) -> float:
        """Variance component of the seed effects, ``max(0, (MS_seeds - MS_residual) / n_images)``."""
        return _nonnegative(self.seed_mean_variance - self.residual_variance / self.n_images)

    @property
    def estimable(self) -> bool:
        """Whether the variance could be estimated (two seeds or more)."""
        return self.n_seeds >= 2 and not math.isnan(self.seed_mean_variance)

    @property
    def seed_term_variance(self) -> float:
        """Variance of the per-seed mean contrast used for the recipe-level analysis: ``MS_seeds / n_images``,
        never below the within-run noise ``MS_residual / n_images``."""
        return max(self.seed_mean_variance, self.residual_variance / self.n_images)

    @property
    def seed_term_floored(self) -> bool:
        """Whether the within-run noise floor replaced the seed mean square (it was smaller by chance)."""
        return self.residual_variance / self.n_images > self.seed_mean_variance

    def seed_df_at(self, n_seeds: float) -> float:
        """Degrees of freedom of the seed term with ``n_seeds`` seeds: ``n_seeds - 1``, or ``seed_df`` scaled.

        Also where the floor applies: the true seed term may be far above the within-run noise (seed x arm
        shifts), so the floor is a lower bound, not an estimate with the residual's many degrees of freedom; the
        simulations showed those df liberal (11.6% false positives at 2 seeds) and ``n - 1`` valid.
        """
        own = self.n_seeds - 1 if math.isnan(self.seed_df) else self.seed_df
        return own * (n_seeds - 1) / (self.n_seeds - 1)

    def variance_at(self, n_seeds: float) -> float:
        """Variance of the mean with ``n_seeds`` seeds on the same number of images, from the observed components."""
        if not self.estimable:
            return float("nan")
        return self.seed_term_variance / n_seeds + self.image_variance / self.n_images

    def standard_error_at(self, n_seeds: float) -> float:
        """Standard error of the mean with ``n_seeds`` seeds (``inf``: the test images' part alone)."""
        if math.isinf(n_seeds):
            return math.sqrt(self.image_variance / self.n_images) if self.estimable else float("nan")
        return math.sqrt(self.variance_at(n_seeds))

    def df_at(self, n_seeds: float) -> float:
        """Satterthwaite degrees of freedom with ``n_seeds`` seeds (``inf`` seeds: the image term's alone)."""
        if not self.estimable:
            return float("nan")
        image_part = self.image_variance / self.n_images
        if math.isinf(n_seeds):
            return self.image_df if image_part > 0 else float("nan")
        return _satterthwaite([(self.seed_term_variance / n_seeds, self.seed_df_at(n_seeds)),
                               (image_part, self.image_df)])

    @property
    def standard_error(self) -> float:
        """Standard error of ``estimate`` with seeds and images random (NaN with one seed, and NaN where it is 0
        although the contrast is not: a spread the design cannot measure is not an absence of spread)."""
        if not self.estimable:
            return float("nan")
        se = self.standard_error_at(self.n_seeds)
        return _measured(se, self.estimate)

    @property
    def df(self) -> float:
        """Satterthwaite degrees of freedom of ``standard_error``."""
        return self.df_at(self.n_seeds)

    # -- intervals and tests ------------------------------------------------------------------------------

    def equivalence_p_value(self, margin: float = DEFAULT_EQUIVALENCE_MARGIN) -> float:
        """Two one-sided tests (Schuirmann 1987) of "|contrast| >= margin"; small p: equivalent within +-margin.

        The larger of the two one-sided p-values, with the same standard error and degrees of freedom as the
        difference test. One-sided tests feel the estimate's skewness at first order (an effect carried by a few
        hundred images is skewed, and its variance estimate grows with it), so each statistic goes through Hall's
        (1992) monotone skewness-removing transformation, a form of Johnson's (1978) modified t, before the t
        distribution is applied. NaN where the difference test is.
        """
        check_equivalence_margin(margin, "equivalence margin")
        return _tost_p(self.estimate, self.standard_error, self.df, margin,
                       self._unskewed if self.skew_correction_holds else None)

    @property
    def skew_correction_holds(self) -> bool:
        """Whether the equivalence test applies the skewness correction: only where the variance is estimated
        with at least ``SKEW_CORRECTION_MIN_DF`` degrees of freedom. The Edgeworth expansion behind it treats the
        variance estimate as nearly exact; with a 1-3 df seed term it is not, and the correction made TOST
        liberal (7.8% false "negligible" at the margin with 2 seeds, plain TOST 4.4%)."""
        return self.df >= SKEW_CORRECTION_MIN_DF

    def _unskewed(self, statistic: float) -> float:
        """Hall's (1992) transformation g(T) = T + a T^2 + a^2 T^3 / 3 + b of the studentized statistic.

        To first order (Edgeworth), T = (estimate - true) / standard_error has mean -c/2 and third cumulant
        s - 3c, with s = ``skewness`` and c = ``skew_covariance``; with a = -(s - 3c) / 6 and b = (s - 3c) / 6 + c / 2
        the transformed statistic is symmetric, and g is monotone (g' = (1 + aT)^2).
        """
        third_cumulant = self.skewness - 3 * self.skew_covariance
        a = -third_cumulant / 6
        b = third_cumulant / 6 + self.skew_covariance / 2
        return statistic + a * statistic ** 2 + a ** 2 * statistic ** 3 / 3 + b

    # -- "this test set only": images fixed, seeds random ---------------------------------------------------

    @property
    def standard_error_this_test_set(self) -> float:
        """The paired t-test's standard error over seeds: what the estimate would vary by on these same images."""
        return math.sqrt(self.seed_mean_variance / self.n_seeds) if self.estimable else float("nan")

    def interval_this_test_set(self, confidence: float = DEFAULT_CONFIDENCE) -> tuple[float, float]:
        """Paired t interval over seeds (df = n_seeds - 1): about these test images only, not the recipe."""
        check_confidence(confidence)
        return _t_interval(self.estimate, self.standard_error_this_test_set, self.n_seeds - 1, confidence)

    @property
    def p_value_this_test_set(self) -> float:
        """Paired t-test over seeds (images fixed). Not a test of the recipe: it ignores the test set's sampling."""
        return _t_test_p(self.estimate, self.standard_error_this_test_set, self.n_seeds - 1)

    # -- power and planning ---------------------------------------------------------------------------------

    def width_at(self, n_seeds: float, confidence: float = DEFAULT_CONFIDENCE,
                 probability: float | None = None) -> float:
        """Full width of the interval with ``n_seeds`` seeds (same images), from the observed components.

        Without ``probability``: the width at the components' current values (about the median width). With
        ``probability`` (e.g. 0.8): the width that the interval stays within with that probability, the variance
        estimate being scaled chi-square with the Satterthwaite df (Kupper & Hafner 1989).
        """
        check_confidence(confidence)
        if n_seeds < 2 or not self.estimable:
            return float("nan")
        df = self.df_at(n_seeds)
        se = self.standard_error_at(n_seeds)
        if se == 0:
            return 0.0
        width = 2 * _t_quantile(0.5 + confidence / 2, df) * se
        if probability is not None:
            _check_probability(probability, "probability")
            width *= math.sqrt(scipy_stats.chi2.ppf(probability, df) / df) if not math.isinf(df) else 1.0
        return width

    def floor_width(self, confidence: float = DEFAULT_CONFIDENCE) -> float:
        """The interval width that infinitely many seeds would leave: the test set's own sampling (image term)."""
        return self.width_at(math.inf, confidence) if self.estimable else float("nan")

    def seeds_for_width(self, width: float, confidence: float = DEFAULT_CONFIDENCE,
                        probability: float | None = None) -> float:
        """Seeds per arm for an interval of full width ``width`` (with ``probability``: reached with that
        probability): a whole number, ``inf`` when the test-image floor is at or above ``width`` (no number of
        seeds gets there), NaN with fewer than two seeds or no measured spread."""
        if not width > 0:
            raise ValueError(f"target interval width {width!r}: expected a positive fraction, e.g. 0.001.")
        if not self.standard_error > 0:  # one seed, or no spread measured: nothing to plan from
            return float("nan")
        if self.floor_width(confidence) >= width:
            return math.inf
        return self._smallest_seeds(lambda n: self.width_at(n, confidence, probability) <= width)

    def power_at(self, effect: float, n_seeds: float, alpha: float = 1 - DEFAULT_CONFIDENCE) -> float:
        """Power of the two-sided level-``alpha`` test against a true contrast ``effect`` with ``n_seeds`` seeds.

        The noncentral t distribution with the Satterthwaite df and the standard error that the observed variance
        components give at ``n_seeds`` (``inf``: the test images' part alone). NaN where no variance is estimable.
        """
        if not 0 < alpha < 1:
            raise ValueError(f"alpha {alpha!r}: expected a level strictly between 0 and 1, e.g. 0.05.")
        if not self.estimable or math.isnan(effect):
            return float("nan")
        se, df = self.standard_error_at(n_seeds) * self._planning_inflation, self.df_at(n_seeds)
        if math.isnan(se) or math.isnan(df) or se == 0:  # no spread measured: nothing to plan from
            return float("nan")
        critical, noncentrality = _t_quantile(1 - alpha / 2, df), abs(effect) / se
        # nctdtr underflows to NaN far in a tail, where the probability is 0.
        below, beyond = (float(np.nan_to_num(special.nctdtr(df, noncentrality, t), nan=0.0))
                         for t in (critical, -critical))
        return 1 - below + beyond

    @property
    def _planning_inflation(self) -> float:
        """A plan from an estimated variance is short more often than not: the variance estimate, scaled
        chi-square with ``df`` degrees of freedom, is below the truth more than half the time (its median is
        ``chi2.ppf(0.5, df) / df`` of it: 0.69 with 2 df). Plans therefore use the median-unbiased variance, the
        estimate times ``df / chi2.ppf(0.5, df)``. And the power of a contrast carried by a few hundred images is
        below the noncentral t's: its variance grows with the effect and rises and falls with the estimate
        (skewness). Plans therefore also widen the standard error by ``PLANNING_MARGIN``; without both, realised
        power at the reported smallest visible effect was 67% at 3 seeds and 73-79% at 2, 5 and 10, not 80%."""
        df = self.df
        median_unbiased = 1.0 if math.isnan(df) or math.isinf(df) else math.sqrt(df / scipy_stats.chi2.ppf(0.5, df))
        return median_unbiased * PLANNING_MARGIN

    def minimum_detectable_effect(self, alpha: float = 1 - DEFAULT_CONFIDENCE, power: float = DEFAULT_POWER) -> float:
        """Smallest |contrast| a two-sided level-``alpha`` test detects with probability ``power`` in this design.

        Solved with the noncentral t (``power_at``) at the observed standard error, floored variance and
        degrees of freedom. A plan from 2-3 seeds is itself uncertain; the calibration suite checks that the
        power at this effect really is at least ``power`` less 2 points under Holm.
        """
        return self._detectable_at(self.n_seeds, alpha, power) if self.estimable else float("nan")

    def seeds_for_effect(self, effect: float, alpha: float = 1 - DEFAULT_CONFIDENCE,
                         power: float = DEFAULT_POWER) -> float:
        """Seeds per arm for a two-sided level-``alpha`` test to detect ``|effect|`` with probability ``power``.

        ``effect`` is an effect stated in advance (``smallest_effect``), never the observed one (that would be
        post-hoc power, which says nothing the p-value does not). A whole number; ``inf`` when the test-image
        floor alone keeps the power below ``power`` (or the effect is zero); NaN with fewer than two seeds.
        """
        _check_probability(power, "power")
        if not self.estimable or math.isnan(effect):
            return float("nan")
        effect = abs(effect)
        if effect == 0 or not self.power_at(effect, math.inf, alpha) >= power:
            return math.inf
        return self._smallest_seeds(lambda n: self.power_at(effect, n, alpha) >= power)

    def _detectable_at(self, n_seeds: float, alpha: float, power: float) -> float:
        if not (0 < alpha < 1 and 0 < power < 1):
            raise ValueError(f"alpha {alpha!r} and power {power!r}: expected both strictly between 0 and 1.")
        se, df = self.standard_error_at(n_seeds) * self._planning_inflation, self.df_at(n_seeds)
        if se == 0:
            return 0.0
        if math.isnan(se) or math.isnan(df):
            return float("nan")
        high = (_t_quantile(1 - alpha / 2, df) + _t_quantile(power, df)) * se
        while self.power_at(high, n_seeds, alpha) < power:
            high *= 2
        return float(optimize.brentq(lambda effect: self.power_at(effect, n_seeds, alpha) - power, 0.0, high,
                                     xtol=1e-12 + 1e-9 * high))

    @staticmethod
    def _smallest_seeds(reaches) -> float:
        """Smallest n >= 2 with ``reaches(n)``; the criteria here only get easier with more seeds."""
        if reaches(2):
            return 2.0
        low, high = 2, 4
        while not reaches(high):
            low, high = high, high * 2
            if high > 2 ** 40:
                return math.inf
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (low, middle) if reaches(middle) else (middle, high)
        return float(high)


def crossed_contrast(values, weights=None) -> ContrastEstimate:
    """Estimate the mean of a contrast over a crossed seeds x test-images design, both random.

    ``values`` is either a (seeds, images) array of per-(seed, image) contrast values ``d_si`` (for example
    ``arm_correct - baseline_correct``, 0/1 each), or, with ``weights`` (one per arm), an (arms, seeds, images)
    array of 0/1 correctness that is combined as ``d_si = sum_a weights[a] * values[a, s, i]``; every arm must
    then be present on every seed given (pair the seeds first). See ``ContrastEstimate`` for the estimator.
    """
    values = np.asarray(values)
    if values.dtype != bool and not np.issubdtype(values.dtype, np.number):
        raise ValueError(f"crossed_contrast needs numbers (or booleans); got an array of {values.dtype}.")
    if weights is not None:
        weights = np.asarray(weights, dtype=float)
        if values.ndim != 3 or weights.shape != (values.shape[0],):
            raise ValueError(f"with weights, values must be an (arms, seeds, images) array with one weight per arm; "
                             f"got values of shape {values.shape} and {weights.size} weight(s).")
        values = np.tensordot(weights, values, axes=1)
    if values.ndim != 2 or values.shape[0] < 1 or values.shape[1] < 2:
        raise ValueError(f"crossed_contrast needs a (seeds, images) array with at least one seed and two test "
                         f"images; got shape {values.shape}. Pass one row per seed, one column per test image.")
    if np.issubdtype(values.dtype, np.inexact) and not np.isfinite(values).all():
        raise ValueError("crossed_contrast got NaN or infinite values; every (seed, image) cell needs a value. "
                         "Drop the runs that have no predictions before forming the contrast.")
    n, m = values.shape
    # On MNIST 98-99% of the images are right in every run, so most columns of a contrast are all zero; they are
    # identical, so one zero column carries them all with a multiplicity (the same sums, a fraction of the work).
    multiplicity = np.ones(m)
    nonzero = np.flatnonzero(values.any(axis=0))
    if m - len(nonzero) > 1:
        values = np.concatenate([values[:, nonzero], np.zeros((n, 1), dtype=values.dtype)], axis=1)
        multiplicity = np.ones(len(nonzero) + 1)
        multiplicity[-1] = m - len(nonzero)
    # Sums only, accumulated in float64: no float copy of a (seeds, images) matrix of 0/1 values is ever made.
    row_sums, column_sums = values.sum(axis=1, dtype=float), values.sum(axis=0, dtype=float)
    grand = float(row_sums.sum()) / (n * m)
    if n == 1:
        nan = float("nan")
        return ContrastEstimate(grand, 1, m, nan, nan, nan, nan)
    # The sums of the centred values (d - grand), which change no sum of squares; the data are small integers
    # (or weighted sums of them), so the expansions below lose nothing to cancellation.
    column_squares = np.einsum("si,si->i", values, values, dtype=float)
    sums = _CrossedSums(
        n=n, m=m, row_sums=row_sums - m * grand, column_sums=column_sums - n * grand,
        column_squares=column_squares - 2 * grand * column_sums + n * grand ** 2, multiplicity=multiplicity,
    )
    # (centred row sums) . (column i) for every image i; as the centred row sums add up to 0, the raw values give
    # the same products as the centred ones. This one matrix-vector product serves the per-image residual sums
    # of squares and every leave-one-image-out row sum.
    sums_cross = np.einsum("s,si->i", sums.row_sums, values)
    seed_means, image_means = sums.row_sums / m, sums.column_sums / n
    # Residual sum of squares of image i: sum_s (d_si - r_s)^2 - n (c_i - g)^2, with g = 0 after centring.
    residual_by_image = (sums.column_squares - 2 * sums_cross / m + float(seed_means @ seed_means)
                         - n * image_means ** 2)
    ms_seeds = m * float(seed_means @ seed_means) / (n - 1)
    ms_images = n * float(multiplicity @ image_means ** 2) / (m - 1)
    ms_residual = max(float(multiplicity @ residual_by_image), 0.0) / ((n - 1) * (m - 1))
    image_variance = (ms_images - ms_residual) / n
    # Each image's contribution to the unbiased image-variance estimate; their spread gives the estimate's own
    # variance, hence the Satterthwaite degrees of freedom of the image term (2 * estimate^2 / its variance).
    contributions = image_means ** 2 - residual_by_image / (n * (n - 1))
    spread = float(multiplicity @ (contributions - float(multiplicity @ contributions) / m) ** 2) / (m - 1)
    image_df = 2 * image_variance ** 2 * m / spread if image_variance > 0 and spread > 0 else float(m - 1)
    estimate = ContrastEstimate(
        estimate=grand, n_seeds=n, n_images=m, seed_mean_variance=ms_seeds / m,
        image_variance=max(image_variance, 0.0), residual_variance=ms_residual, image_df=max(image_df, 1.0),
    )
    variance = estimate.standard_error ** 2
    if m < 3 or not variance > 0:
        return estimate
    third_moment, covariance = _image_jackknife(sums, sums_cross, image_means)
    return dataclasses.replace(estimate, skewness=third_moment / variance ** 1.5,
                               skew_covariance=covariance / variance ** 1.5)


@dataclass(frozen=True)
class _CrossedSums:
    """Row sums, column sums and column sums of squares of the centred (seeds, images) values; ``multiplicity``:
    how many images each column stands for (the all-zero images share one column)."""

    n: int
    m: int
    row_sums: np.ndarray
    column_sums: np.ndarray
    column_squares: np.ndarray
    multiplicity: np.ndarray


def _image_jackknife(sums: _CrossedSums, sums_cross: np.ndarray, image_means: np.ndarray) -> tuple[float, float]:
    """(third cumulant of the mean, covariance of the mean with its variance estimate), both over test images.

    Jackknife influences: leaving image i out moves the mean by (c_i - mean) / (m - 1) and the variance estimate
    by what the closed-form leave-one-out sums of squares below give (no loop over images; ``sums_cross`` is
    ``row_sums @ centred``, so row s loses d_si when image i leaves).
    """
    n, m, kept, weight = sums.n, sums.m, sums.m - 1, sums.multiplicity
    column_sums, column_squares = sums.column_sums, sums.column_squares
    grand_term = column_sums ** 2 / (n * kept)  # the centred total is 0, so the total left is -column_sums
    ss_seeds = (float(sums.row_sums @ sums.row_sums) - 2 * sums_cross + column_squares) / kept - grand_term
    ss_images = (float(weight @ column_sums ** 2) - column_sums ** 2) / n - grand_term
    ss_residual = (float(weight @ column_squares) - column_squares) - grand_term - ss_seeds - ss_images
    ms_images, ms_residual = ss_images / (kept - 1), ss_residual / ((n - 1) * (kept - 1))
    variance_left = (ss_seeds / (n - 1) + np.maximum(ms_images - ms_residual, 0.0)) / (n * kept)
    mean_influence = image_means - float(weight @ image_means) / m
    variance_influence = kept * (float(weight @ variance_left) / m - variance_left)
    return (float(weight @ (mean_influence * mean_influence * mean_influence)) / m ** 3,  # ** 3 is slow near 0
            float(weight @ (mean_influence * variance_influence)) / m ** 2)


# -- from the tidy per-image frame ------------------------------------------------------------------------

CORRECT_COLUMNS = ("arm", "seed", "image", "correct")


@dataclass(frozen=True)
class CorrectnessArray:
    """A study's per-image results as arrays: ``correct[a, s, i]`` for arm ``arms[a]``, seed ``seeds[s]`` and test
    image ``images[i]``; ``present[a, s]`` says whether that run was scored (``correct`` is False where not)."""

    arms: tuple
    seeds: np.ndarray
    images: np.ndarray
    correct: np.ndarray
    present: np.ndarray

    def arm_index(self, arm) -> int:
        if arm not in self.arms:
            raise ValueError(f"arm {arm!r} is not in the study's results; its arms are {list(self.arms)}. "
                             "Pass one of those (e.g. baseline='baseline').")
        return self.arms.index(arm)


def correct_frame(runs: pd.DataFrame, correct_by_run: dict) -> pd.DataFrame:
    """The tidy per-image frame (arm, seed, image, correct) from runs and their per-image correctness vectors.

    ``runs`` has one row per run to analyse, with columns arm, seed and run_id (e.g. the study's usable runs,
    ``sweep.usable_runs``, less those without predictions); ``correct_by_run`` maps a run_id to a boolean vector
    "test image i was classified correctly" (predicted == label), in the same image order for every run.
    """
    missing = [column for column in ("arm", "seed", "run_id") if column not in runs]
    if missing:
        raise ValueError(f"runs frame has no column(s) {missing}; expected one row per run with arm, seed and "
                         f"run_id; got columns {list(runs.columns)}.")
    absent = [run_id for run_id in runs["run_id"] if run_id not in correct_by_run]
    if absent:
        raise ValueError(f"no per-image results for {len(absent)} run(s), e.g. run {absent[0]!r}; leave runs without "
                         "logged predictions out of the frame (and report them as failed cells).")
    vectors = [np.asarray(correct_by_run[run_id], dtype=bool) for run_id in runs["run_id"]]
    lengths = {len(vector) for vector in vectors}
    if len(lengths) > 1:
        raise ValueError(f"the runs were scored on different numbers of test images ({sorted(lengths)}); every run "
                         "must be scored on the same test set.")
    n_images = lengths.pop() if lengths else 0
    return pd.DataFrame({
        "arm": np.repeat(runs["arm"].to_numpy(), n_images), "seed": np.repeat(runs["seed"].to_numpy(), n_images),
        "image": np.tile(np.arange(n_images), len(vectors)),
        "correct": np.concatenate(vectors) if vectors else np.array([], dtype=bool),
    })


def _plain(value):
    """A NumPy scalar as the Python value it holds, so that error messages read 2, not np.int64(2)."""
    return value.item() if isinstance(value, np.generic) else value


def correctness_array(correct: pd.DataFrame) -> CorrectnessArray:
    """Validate the tidy frame (columns arm, seed, image, correct; one row per arm, seed and test image) and
    arrange it as arrays. Arms keep their order of first appearance; seeds and images are sorted.

    Raises ValueError, naming the offending value, for missing columns, missing or non-boolean values, duplicate
    (arm, seed, image) rows and runs that were not scored on the same test images as the others.
    """
    if not isinstance(correct, pd.DataFrame):
        raise TypeError(f"expected a pandas DataFrame with columns {list(CORRECT_COLUMNS)}, got "
                         f"{type(correct).__name__}.")
    missing = [column for column in CORRECT_COLUMNS if column not in correct]
    if missing:
        raise ValueError(f"the per-image frame has no column(s) {missing}; expected one row per (arm, seed, test "
                         f"image) with columns {list(CORRECT_COLUMNS)} (correct = predicted label == true label), "
                         f"got columns {list(correct.columns)}.")
    if correct.empty:
        raise ValueError("the per-image frame is empty; expected one row per (arm, seed, test image). Are the "
                         "runs' predictions logged?")
    for column in ("arm", "seed", "image", "correct"):
        nulls = correct[column].isna().to_numpy()
        if nulls.any():
            row = correct.iloc[int(np.argmax(nulls))]
            raise ValueError(f"column {column!r} has {int(nulls.sum())} missing value(s), the first at arm "
                             f"{_plain(row['arm'])!r}, seed {_plain(row['seed'])!r}, image {_plain(row['image'])!r}; "
                             "every row needs all four values. Drop the runs without predictions (a run that failed "
                             "is not a result).")
    values = correct["correct"].to_numpy()
    if values.dtype != bool:
        numeric = pd.to_numeric(correct["correct"], errors="coerce").to_numpy(dtype=float)
        bad = ~np.isin(numeric, (0.0, 1.0))
        if bad.any():
            raise ValueError(f"column 'correct' has value {_plain(values[int(np.argmax(bad))])!r}; expected booleans "
                             "(or 0/1): whether the run classified that test image correctly.")
        values = numeric.astype(bool)
    arm_codes, arms = pd.factorize(correct["arm"], sort=False)
    seed_codes, seeds = pd.factorize(correct["seed"], sort=True)
    image_codes, images = pd.factorize(correct["image"], sort=True)
    n_arms, n_seeds, n_images = len(arms), len(seeds), len(images)
    cell = (arm_codes.astype(np.int64) * n_seeds + seed_codes) * n_images + image_codes
    counts = np.bincount(cell, minlength=n_arms * n_seeds * n_images)
    if counts.max() > 1:
        arm, seed, image = np.unravel_index(int(np.argmax(counts)), (n_arms, n_seeds, n_images))
        raise ValueError(f"{int((counts > 1).sum())} (arm, seed, image) cell(s) appear more than once, e.g. arm "
                         f"{_plain(arms[arm])!r}, seed {_plain(seeds[seed])!r}, image {_plain(images[image])!r} "
                         f"({counts.max()} rows); expected one row per cell. Keep one run per (arm, seed) (the "
                         "latest FINISHED one).")
    scored = counts.reshape(n_arms, n_seeds, n_images).astype(bool)
    present = scored.any(axis=2)
    incomplete = present & ~scored.all(axis=2)
    if incomplete.any():
        arm, seed = np.argwhere(incomplete)[0]
        missing_image = images[int(np.argmin(scored[arm, seed]))]
        raise ValueError(f"arm {_plain(arms[arm])!r}, seed {_plain(seeds[seed])!r} was scored on "
                         f"{int(scored[arm, seed].sum())} of the {n_images} test images the study's runs cover "
                         f"(image {_plain(missing_image)!r} is missing); every run must be scored on the same test "
                         "images. Log predictions for the full test set.")
    array = np.zeros(n_arms * n_seeds * n_images, dtype=bool)
    array[cell] = values
    return CorrectnessArray(tuple(arms), np.asarray(seeds), np.asarray(images),
                            array.reshape(n_arms, n_seeds, n_images), present)


def hedges_dz(differences) -> float:
    """Cohen's d_z of paired differences times Hedges' small-sample correction J(n - 1) (NaN below 3 values).

    d_z = mean / standard deviation overestimates the standardized effect at small n (by about 1.8x at n = 3);
    ``J(df) = Gamma(df / 2) / (sqrt(df / 2) * Gamma((df - 1) / 2))`` removes that bias (Hedges 1981).
    """
    differences = np.asarray(differences, dtype=float)
    df = len(differences) - 1
    if df < 2 or differences.std(ddof=1) == 0:
        return float("nan")
    correction = math.exp(math.lgamma(df / 2) - 0.5 * math.log(df / 2) - math.lgamma((df - 1) / 2))
    return float(correction * differences.mean() / differences.std(ddof=1))


def wilcoxon_counts(arm_counts, baseline_counts) -> float:
    """Two-sided Wilcoxon signed-rank p-value on the per-seed counts of correctly classified images (integers).

    Integer counts keep real ties tied (float accuracies can break them by rounding). Zero differences are
    dropped (Wilcoxon's convention) and tied magnitudes get average ranks; the p-value is exact, from the
    permutation distribution of the signs given those ranks (what ``scipy.stats.wilcoxon`` computes with a
    ``PermutationMethod``, but in milliseconds), with SciPy's tie-corrected normal approximation beyond 100
    nonzero pairs. NaN below ``WILCOXON_MIN_PAIRS`` (6) pairs: with 5 or fewer the smallest attainable two-sided
    p is 2 / 2**5 = 0.0625, so the test could never reach 0.05. NaN too when every difference is zero.
    """
    differences = np.asarray(arm_counts, dtype=np.int64) - np.asarray(baseline_counts, dtype=np.int64)
    if len(differences) < WILCOXON_MIN_PAIRS or not differences.any():
        return float("nan")
    nonzero = differences[differences != 0]
    if len(nonzero) > 100:
        return float(scipy_stats.wilcoxon(nonzero, method="approx").pvalue)
    # Average ranks are multiples of 1/2, so twice the rank is an integer: the null distribution of the sum of
    # the positive differences' doubled ranks is a product of "0 or r" steps, each sign equally likely.
    doubled = np.rint(2 * scipy_stats.rankdata(np.abs(nonzero))).astype(np.int64)
    distribution = np.zeros(int(doubled.sum()) + 1)
    distribution[0] = 1.0
    for rank in doubled:
        shifted = np.zeros_like(distribution)
        shifted[rank:] = distribution[:-rank]
        distribution = (distribution + shifted) / 2
    centre = doubled.sum() / 2
    observed = abs(doubled[nonzero > 0].sum() - centre)
    at_least_as_extreme = np.abs(np.arange(len(distribution)) - centre) >= observed - 1e-9
    return float(min(1.0, distribution[at_least_as_extreme].sum()))


@dataclass(frozen=True)
class UnpairedContrast(_TInference):
    """Arm minus baseline when they share no seed: two independent samples of seeds, the same test images.

    ``standard_error**2 = arm_seed_term / n_arm + baseline_seed_term / n_baseline + image_variance / n_images``:
    each arm's seed term is its per-seed mean variance floored by its within-run noise (as in
    ``ContrastEstimate``), and ``image_variance`` the variance over images of the difference of the arms'
    per-image expected accuracies (their per-image mean difference, less what the runs' own noise adds to it).
    Welch-Satterthwaite df over the three terms (each seed term with its n - 1, the image term its effective
    df). Less precise than a paired comparison: seed effects shared by the arms no longer cancel.
    """

    estimate: float
    n_arm: int
    n_baseline: int
    n_images: int
    arm_seed_term: float
    baseline_seed_term: float
    image_variance: float
    image_df: float

    @property
    def estimable(self) -> bool:
        return self.n_arm >= 2 and self.n_baseline >= 2

    @property
    def standard_error(self) -> float:
        if not self.estimable:
            return float("nan")
        se = math.sqrt(self.arm_seed_term / self.n_arm + self.baseline_seed_term / self.n_baseline
                       + self.image_variance / self.n_images)
        return _measured(se, self.estimate)

    @property
    def df(self) -> float:
        if not self.estimable:
            return float("nan")
        return _satterthwaite([(self.arm_seed_term / self.n_arm, self.n_arm - 1),
                               (self.baseline_seed_term / self.n_baseline, self.n_baseline - 1),
                               (self.image_variance / self.n_images, self.image_df)])

    def equivalence_p_value(self, margin: float = DEFAULT_EQUIVALENCE_MARGIN) -> float:
        """Plain two one-sided tests against +-margin (no skewness correction: the df are small)."""
        check_equivalence_margin(margin, "equivalence margin")
        return _tost_p(self.estimate, self.standard_error, self.df, margin)


def unpaired_contrast(arm_values, baseline_values) -> UnpairedContrast:
    """Mean of ``arm_values`` minus mean of ``baseline_values``, two (seeds, images) 0/1 matrices with no seed
    in common, scored on the same images; see ``UnpairedContrast``."""
    arm, base = np.asarray(arm_values, dtype=np.float64), np.asarray(baseline_values, dtype=np.float64)
    if arm.ndim != 2 or base.ndim != 2 or arm.shape[1] != base.shape[1] or arm.shape[1] < 2:
        raise ValueError(f"unpaired_contrast needs two (seeds, images) arrays on the same test images; got shapes "
                         f"{arm.shape} and {base.shape}.")
    m = arm.shape[1]
    own = [crossed_contrast(values) for values in (arm, base)]
    difference = arm.mean(axis=0) - base.mean(axis=0)
    noise = sum(e.residual_variance / e.n_seeds for e in own if e.n_seeds >= 2)
    image_variance = max(float(difference.var(ddof=1)) - noise, 0.0)
    contributions = (difference - difference.mean()) ** 2
    spread = float(contributions.var(ddof=1))
    image_df = 2 * image_variance ** 2 * m / spread if image_variance > 0 and spread > 0 else float(m - 1)
    return UnpairedContrast(
        estimate=float(difference.mean()), n_arm=arm.shape[0], n_baseline=base.shape[0], n_images=m,
        arm_seed_term=own[0].seed_term_variance if own[0].estimable else float("nan"),
        baseline_seed_term=own[1].seed_term_variance if own[1].estimable else float("nan"),
        image_variance=image_variance, image_df=max(image_df, 1.0),
    )


def per_seed_differences(correct: pd.DataFrame | CorrectnessArray, baseline: str = "baseline") -> pd.DataFrame:
    """Every compared arm's accuracy minus the baseline's on each paired seed: columns arm, seed, delta.

    The per-seed view the interval summarises: a rare bad seed shows here as one low dot. With n seeds a failure
    rarer than about 1 in n seeds is usually not drawn at all, so neither this view nor any test can see it.
    """
    array = correct if isinstance(correct, CorrectnessArray) else correctness_array(correct)
    base = array.arm_index(baseline)
    rows = []
    accuracy = array.correct.mean(axis=2)
    for index, arm in enumerate(array.arms):
        if index == base:
            continue
        for s in np.flatnonzero(array.present[index] & array.present[base]):
            rows.append({"arm": arm, "seed": _plain(array.seeds[s]),
                         "delta": float(accuracy[index, s] - accuracy[base, s])})
    return pd.DataFrame(rows, columns=["arm", "seed", "delta"])


def contrasts_to_baseline(correct: pd.DataFrame | CorrectnessArray,
                          baseline: str = "baseline") -> dict[str, ContrastEstimate | None]:
    """``arm - baseline`` as a ``ContrastEstimate`` per compared arm, on the seeds both have (None when none).

    Use it for planning (``seeds_for_width``, ``width_at``); ``compare_to_baseline`` tabulates the same estimates.
    """
    array = correct if isinstance(correct, CorrectnessArray) else correctness_array(correct)
    base = array.arm_index(baseline)
    estimates = {}
    for index, arm in enumerate(array.arms):
        if index == base:
            continue
        paired = array.present[index] & array.present[base]
        if not paired.any():
            estimates[arm] = None
            continue
        difference = array.correct[index, paired].astype(np.int8) - array.correct[base, paired]
        estimates[arm] = crossed_contrast(difference)
    return estimates


def compare_to_baseline(correct: pd.DataFrame | CorrectnessArray, baseline: str = "baseline",
                        confidence: float = DEFAULT_CONFIDENCE,
                        equivalence_margin: float = DEFAULT_EQUIVALENCE_MARGIN,
                        smallest_effect: float | None = None, first_stage_seeds: int | None = None) -> pd.DataFrame:
    """Every arm against ``baseline``, with training seeds *and* test images random: one row per compared arm.

    ``correct`` is the tidy frame of ``correctness_array`` (arm, seed, image, correct). Arms are paired by seed:
    only seeds present in both the arm and the baseline are used, for the accuracies, the difference and every
    test alike. Rows follow the arms' first appearance; the columns are ``COMPARISON_COLUMNS`` (fractions of
    accuracy, not points):

    * ``n_pairs``, ``baseline_accuracy``, ``arm_accuracy``, ``delta`` (arm minus baseline, mean over the paired
      seeds and all images);
    * ``delta_ci_low``/``delta_ci_high``, ``standard_error``, ``df``, ``p_value``: the crossed analysis of
      ``crossed_contrast`` (a claim about the recipes; the seed term never below the within-run noise);
      ``p_value_holm``: Holm over every compared arm (an arm whose p is NaN still counts);
    * ``mde``: the smallest |delta| this design (n_pairs seeds, these many images) detects with 80% power at the
      family's corrected level ``(1 - confidence) / k`` for k compared arms, two-sided (noncentral t; Holm's
      power is at least this); ``smallest_effect``: the effect stated in advance (default: the equivalence
      margin); ``seeds_needed``: seeds per arm that detect ``smallest_effect`` so (inf when the test-image floor
      forbids it), from the variance components, never from the observed delta; ``ci_width_floor``: the width
      that infinitely many seeds would leave (the test set's limit);
    * ``seed_variance``, ``image_variance``, ``residual_variance``: the contrast's variance components;
    * ``delta_ci_low_this_test_set``, ``delta_ci_high_this_test_set``, ``p_value_this_test_set``: the paired
      t-test over seeds, images fixed: about these test images only, not the recipe;
    * ``wilcoxon_p_value``: signed-rank test on the per-seed integer counts of correct images (NaN below 6
      pairs, where it can never reach 0.05); ``effect_size``: Hedges-corrected d_z of the per-seed accuracy
      differences (standardized by seed-to-seed spread on this test set; NaN below 3 pairs);
    * ``equivalence_margin``, ``equivalence_p_value`` (TOST against +-margin with the same standard error and
      df), ``equivalence_p_value_holm`` (Holm over every compared arm);
    * ``comparison``: ``PAIRED``, or ``UNPAIRED`` for an arm with no seed in common with the baseline (then
      ``unpaired_contrast`` gives the difference, interval, tests and ``mde``; the seed-level columns are NaN).

    With ``first_stage_seeds`` (precision-driven seeding), an arm with more paired seeds than that is analysed
    as Stein's two-stage design (``two_stage_estimate``): its first stage decided how many seeds it got.
    With one paired seed the seed variance is not estimable: the interval, the tests and the plans are NaN.
    """
    check_confidence(confidence)
    check_equivalence_margin(equivalence_margin)
    smallest_effect = check_smallest_effect(equivalence_margin if smallest_effect is None else smallest_effect)
    array = correct if isinstance(correct, CorrectnessArray) else correctness_array(correct)
    base = array.arm_index(baseline)
    estimates = contrasts_to_baseline(array, baseline)
    stages = first_stage_contrasts(array, first_stage_seeds, baseline) if first_stage_seeds else {}
    family_alpha = (1 - confidence) / max(len(estimates), 1)
    m = array.correct.shape[2]
    nan = float("nan")
    rows = []
    for arm, estimate in estimates.items():
        row = dict.fromkeys(COMPARISON_COLUMNS, nan)
        row.update(arm=arm, n_pairs=0, equivalence_margin=equivalence_margin, smallest_effect=smallest_effect)
        index = array.arm_index(arm)
        if estimate is None and array.present[index].any() and array.present[base].any():
            unpaired = unpaired_contrast(array.correct[index, array.present[index]],
                                         array.correct[base, array.present[base]])
            low, high = unpaired.interval(confidence)
            se, df = unpaired.standard_error, unpaired.df
            mde = ((_t_quantile(1 - family_alpha / 2, df) + _t_quantile(DEFAULT_POWER, df)) * se
                   if se > 0 else nan)
            row.update(comparison=UNPAIRED, arm_accuracy=float(array.correct[index, array.present[index]].mean()),
                       baseline_accuracy=float(array.correct[base, array.present[base]].mean()),
                       delta=unpaired.estimate, delta_ci_low=low, delta_ci_high=high, standard_error=se, df=df,
                       p_value=unpaired.p_value, mde=mde,
                       equivalence_p_value=unpaired.equivalence_p_value(equivalence_margin))
        elif estimate is not None:
            paired = array.present[index] & array.present[base]
            arm_counts = array.correct[index, paired].sum(axis=1)
            baseline_counts = array.correct[base, paired].sum(axis=1)
            stage = stages.get(arm)
            recipe = two_stage_estimate(stage, estimate) if stage is not None else estimate
            low, high = recipe.interval(confidence)
            low_fixed, high_fixed = estimate.interval_this_test_set(confidence)
            row.update(
                comparison=PAIRED,
                n_pairs=estimate.n_seeds, baseline_accuracy=baseline_counts.sum() / (estimate.n_seeds * m),
                arm_accuracy=arm_counts.sum() / (estimate.n_seeds * m), delta=recipe.estimate,
                delta_ci_low=low, delta_ci_high=high, standard_error=recipe.standard_error, df=recipe.df,
                p_value=recipe.p_value, mde=estimate.minimum_detectable_effect(family_alpha),
                seeds_needed=estimate.seeds_for_effect(smallest_effect, family_alpha),
                ci_width_floor=estimate.floor_width(confidence), seed_variance=estimate.seed_variance,
                image_variance=estimate.image_variance, residual_variance=estimate.residual_variance,
                delta_ci_low_this_test_set=low_fixed, delta_ci_high_this_test_set=high_fixed,
                p_value_this_test_set=estimate.p_value_this_test_set,
                wilcoxon_p_value=wilcoxon_counts(arm_counts, baseline_counts),
                effect_size=hedges_dz((arm_counts - baseline_counts) / m),
                equivalence_p_value=recipe.equivalence_p_value(equivalence_margin),
            )
        rows.append(row)
    table = pd.DataFrame(rows, columns=COMPARISON_COLUMNS)
    table["n_pairs"] = table["n_pairs"].astype(int)
    table["p_value_holm"] = holm(table["p_value"])
    table["equivalence_p_value_holm"] = holm(table["equivalence_p_value"])
    return table


# -- one arm's accuracy -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class AccuracyInterval:
    """One arm's mean accuracy over seeds and test images, with an interval for the recipe's accuracy."""

    n_seeds: int
    n_images: int
    accuracy: float
    low: float
    high: float
    standard_error: float
    df: float


def accuracy_interval(correct_matrix, confidence: float = DEFAULT_CONFIDENCE) -> AccuracyInterval:
    """The accuracy of one arm from its (seeds, images) 0/1 matrix, seeds and images random, on the logit scale.

    The variance of the mean accuracy comes from ``crossed_contrast`` (seed term + image term, Satterthwaite
    df). The interval is built for logit(accuracy) with the delta method (standard error / (p (1 - p))) and
    transformed back, so it always lies within [0, 1] and is asymmetric near 100%. Degenerate cases:

    * one seed: the seed variance is not estimable; ``low`` and ``high`` are NaN (the accuracy is still given);
    * every image right in every run (or every one wrong): the sample has no variance at all; the interval is
      the exact Clopper-Pearson interval for ``n_images`` of ``n_images`` images, [(alpha/2)^(1/m), 1] (or its
      mirror), i.e. only the test set's size limits what can be said;
    * no variance estimable although some images differ (possible only in tiny toy matrices): NaN bounds.
    """
    check_confidence(confidence)
    values = np.asarray(correct_matrix)
    if values.dtype != bool and values.ndim == 2 and np.any((values != 0) & (values != 1)):
        raise ValueError("accuracy_interval expects a 0/1 (or boolean) matrix of correct classifications, one row "
                         "per seed and one column per test image.")
    estimate = crossed_contrast(values)
    p, n, m = estimate.estimate, estimate.n_seeds, estimate.n_images
    se, df = estimate.standard_error, estimate.df
    nan = float("nan")
    if not estimate.estimable:
        return AccuracyInterval(n, m, p, nan, nan, nan, nan)
    if p in (0.0, 1.0):
        tail = (1 - confidence) / 2
        bound = tail ** (1 / m)
        low, high = (bound, 1.0) if p == 1.0 else (0.0, 1 - bound)
        return AccuracyInterval(n, m, p, low, high, 0.0, nan)
    if se == 0:  # some images wrong, yet no variance estimable at all (a degenerate toy matrix)
        return AccuracyInterval(n, m, p, nan, nan, se, df)
    half_width = _t_quantile(0.5 + confidence / 2, df) * se / (p * (1 - p))
    centre = special.logit(p)
    return AccuracyInterval(n, m, p, float(special.expit(centre - half_width)),
                            float(special.expit(centre + half_width)), se, df)


def accuracy_table(correct: pd.DataFrame | CorrectnessArray, confidence: float = DEFAULT_CONFIDENCE) -> pd.DataFrame:
    """Per arm (first-appearance order): seeds, images, mean test accuracy and its ``accuracy_interval``."""
    array = correct if isinstance(correct, CorrectnessArray) else correctness_array(correct)
    rows = []
    for index, arm in enumerate(array.arms):
        result = accuracy_interval(array.correct[index, array.present[index]], confidence)
        rows.append({"arm": arm, "n_seeds": result.n_seeds, "n_images": result.n_images,
                     "test_accuracy_mean": result.accuracy, "test_accuracy_ci_low": result.low,
                     "test_accuracy_ci_high": result.high, "standard_error": result.standard_error,
                     "df": result.df})
    return pd.DataFrame(rows, columns=ACCURACY_COLUMNS)


# -- when to stop adding seeds --------------------------------------------------------------------------

TARGET_REACHED = "target width reached"
MAX_SEEDS_REACHED = "max seeds reached"
TEST_SET_LIMITS = "test set limits this difference"


def two_stage_estimate(first_stage: ContrastEstimate, final: ContrastEstimate) -> ContrastEstimate:
    """Stein's (1945) two-stage estimate: ``final``'s mean (all seeds) and image term, with the seed term of
    ``first_stage`` (the seeds that decided how many seeds to run; floored by their within-run noise) and its
    degrees of freedom. The mean of the later seeds is independent of the first stage's seed variance, so the
    interval keeps its level whatever the first stage decided; identical to ``final`` when no seed was added.
    """
    if final.n_seeds <= first_stage.n_seeds or not first_stage.estimable:
        return final
    return dataclasses.replace(final, seed_mean_variance=first_stage.seed_term_variance,
                               residual_variance=first_stage.residual_variance,
                               seed_df=first_stage.seed_df_at(first_stage.n_seeds))


def _check_precision_rule(target_width: float, max_seeds: int) -> None:
    if not target_width > 0:
        raise ValueError(f"target interval width {target_width!r}: expected a positive fraction, e.g. 0.001 for "
                         "an interval 0.1 points wide.")
    if max_seeds < 2:
        raise ValueError(f"max_seeds {max_seeds!r}: expected at least 2 (an interval needs two seeds).")


def _test_set_limit(floor: float) -> str:
    return f"{TEST_SET_LIMITS} to ±{100 * floor / 2:.2f} points"


def precision_seeds(first_stage: ContrastEstimate, target_width: float, max_seeds: int,
                    confidence: float = DEFAULT_CONFIDENCE) -> tuple[int, str]:
    """How many seeds an arm gets under the precision rule, decided once from its first stage, and why.

    Stein's two-stage rule: the smallest n (from the first stage's n0 up to ``max_seeds``) whose two-stage
    interval (``two_stage_estimate``: first-stage seed term over n, its n0 - 1 degrees of freedom, the image
    term) is at most ``target_width`` wide; "test set limits this difference" (stop at n0) when the test images
    alone leave a wider interval; ``max_seeds`` when nothing smaller gets there. An arm whose first stage has no
    measurable spread (a zero or NaN standard error) cannot be planned: it gets ``max_seeds``, and a zero-width
    interval never counts as "target width reached".
    """
    _check_precision_rule(target_width, max_seeds)
    n0 = first_stage.n_seeds
    if not first_stage.standard_error > 0:  # NaN (one seed, unmeasurable spread) or 0 (no difference anywhere)
        return max(max_seeds, n0), MAX_SEEDS_REACHED
    floor = first_stage.floor_width(confidence)
    if floor >= target_width:
        return n0, _test_set_limit(floor)
    df = first_stage.seed_df_at(n0)
    for n in range(n0, max_seeds + 1):
        if dataclasses.replace(first_stage, n_seeds=n, seed_df=df).width_at(n, confidence) <= target_width:
            return n, TARGET_REACHED
    return max(max_seeds, n0), MAX_SEEDS_REACHED


def precision_stop_reason(first_stage: ContrastEstimate | None, n_seeds: int, target_width: float, max_seeds: int,
                          confidence: float = DEFAULT_CONFIDENCE) -> str | None:
    """Why an arm with ``n_seeds`` seeds (attempted) needs no more, or None if it should get the next one.

    ``first_stage`` is the arm's contrast on its first-stage seeds (None or one seed: not there yet). The
    decision is ``precision_seeds``: made once, from the first stage, and never again from a variance that
    enters the final test; adding seeds one at a time until an interval happens to be narrow would stop exactly
    when the variance estimate is small by chance (8.9-11.7% false positives in simulations). It never looks
    at the estimate or its p-value either. "max seeds reached" whenever ``n_seeds >= max_seeds``.
    """
    _check_precision_rule(target_width, max_seeds)
    if first_stage is None or not first_stage.estimable:
        return MAX_SEEDS_REACHED if n_seeds >= max_seeds else None
    planned, reason = precision_seeds(first_stage, target_width, max_seeds, confidence)
    if n_seeds >= planned:
        return reason
    return MAX_SEEDS_REACHED if n_seeds >= max_seeds else None


def first_stage_contrasts(correct: pd.DataFrame | CorrectnessArray, first_stage_seeds: int,
                          baseline: str = "baseline") -> dict[str, ContrastEstimate | None]:
    """``arm - baseline`` on each arm's first ``first_stage_seeds`` paired seeds (in seed order): the stage that
    decides, under the precision rule, how many seeds the arm gets (None with fewer than one paired seed)."""
    if first_stage_seeds < 2:
        raise ValueError(f"first_stage_seeds {first_stage_seeds!r}: expected at least 2 (the first stage needs a "
                         "seed variance).")
    array = correct if isinstance(correct, CorrectnessArray) else correctness_array(correct)
    base = array.arm_index(baseline)
    estimates = {}
    for index, arm in enumerate(array.arms):
        if index == base:
            continue
        paired = np.flatnonzero(array.present[index] & array.present[base])[:first_stage_seeds]
        estimates[arm] = None if not len(paired) else crossed_contrast(
            array.correct[index, paired].astype(np.int8) - array.correct[base, paired])
    return estimates


PRECISION_COLUMNS = ["arm", "n_seeds", "first_stage_seeds", "first_stage_width", "ci_width_floor", "seeds_target",
                     "stop_reason"]


def precision_decisions(correct: pd.DataFrame | CorrectnessArray, first_stage_seeds: int, target_width: float,
                        max_seeds: int, baseline: str = "baseline", confidence: float = DEFAULT_CONFIDENCE,
                        n_seeds: dict | None = None) -> pd.DataFrame:
    """``precision_stop_reason`` for every compared arm: one row per arm with ``PRECISION_COLUMNS``.

    ``n_seeds`` maps an arm to the seeds it has been given (attempted: finished or failed, so a failing arm
    cannot loop); by default its paired seeds. ``stop_reason`` is None while the arm needs the next seed.
    """
    array = correct if isinstance(correct, CorrectnessArray) else correctness_array(correct)
    base = array.arm_index(baseline)
    rows = []
    for arm, stage in first_stage_contrasts(array, first_stage_seeds, baseline).items():
        paired = int((array.present[array.arm_index(arm)] & array.present[base]).sum())
        given = paired if n_seeds is None else int(n_seeds.get(arm, paired))
        planned, width, floor = float("nan"), float("nan"), float("nan")
        if stage is not None and stage.estimable:
            planned = float(precision_seeds(stage, target_width, max_seeds, confidence)[0])
            low, high = stage.interval(confidence)
            width, floor = high - low, stage.floor_width(confidence)
        rows.append({"arm": arm, "n_seeds": given, "first_stage_seeds": 0 if stage is None else stage.n_seeds,
                     "first_stage_width": width, "ci_width_floor": floor, "seeds_target": planned,
                     "stop_reason": precision_stop_reason(stage, given, target_width, max_seeds, confidence)})
    table = pd.DataFrame(rows, columns=PRECISION_COLUMNS)
    table["stop_reason"] = pd.Series([row["stop_reason"] for row in rows], index=table.index, dtype=object)
    return table


def arms_needing_seeds(decisions: pd.DataFrame) -> list[str]:
    """The arms of ``precision_decisions`` that should get the next seed (no stop reason), in table order."""
    return [row.arm for row in decisions.itertuples() if row.stop_reason is None]


# -- the factorial study ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FactorialContrasts:
    """Every term of a 2^k factorial as a crossed contrast: the effects table and which seeds could be used.

    ``effects`` has ``FACTORIAL_EFFECT_COLUMNS``; ``n_seeds`` seeds had every cell and were used;
    ``seeds_dropped`` lacked at least one cell and were left out; ``note`` says so (and why the seed error was
    not pooled) in words (None when there is nothing to say). ``pooled``: whether the terms share the pooled
    seed-by-contrast error; ``homogeneity_p_value``: Cochran's test of the equal variances pooling assumes.
    """

    effects: pd.DataFrame
    n_seeds: int
    seeds_dropped: tuple
    note: str | None
    pooled: bool = False
    homogeneity_p_value: float = float("nan")
    pooled_terms: int = 0  # terms sharing the pooled error (those exactly zero, between identical cells, do not)


def _factorial_cells(design: pd.DataFrame, arms, components) -> tuple[list[str], np.ndarray]:
    """(components, on[a, c]) for the study's arms, checking that the arms form a complete 2^k factorial."""
    frame = design.reset_index() if "arm" not in design.columns else design
    if "arm" not in frame.columns:
        raise ValueError("the design frame needs an 'arm' column (or index) and one column per component coded "
                         f"on/off (bool, 0/1 or -0.5/+0.5); got columns {list(design.columns)}.")
    components = list(components) if components is not None else [c for c in frame.columns if c != "arm"]
    missing = [c for c in components if c not in frame.columns]
    if missing or not components:
        raise ValueError(f"the design frame lacks component column(s) {missing or '(none given)'}; got columns "
                         f"{list(frame.columns)}. Code each component on/off per arm (stats.factorial_design "
                         "gives the -0.5/+0.5 coding).")
    frame = frame.drop_duplicates(["arm", *components])
    duplicated = frame["arm"][frame["arm"].duplicated()]
    if len(duplicated):
        raise ValueError(f"arm {duplicated.iloc[0]!r} has more than one coding in the design frame; expected one "
                         "row per arm.")
    coding = frame.set_index("arm")[components]
    unknown = [arm for arm in arms if arm not in coding.index]
    if unknown:
        raise ValueError(f"arm(s) {unknown} have results but no row in the design frame (arms in the design: "
                         f"{list(coding.index)}); add their component coding.")
    on = np.column_stack([
        coding.loc[list(arms), c].astype(bool).to_numpy() if coding[c].dtype == bool
        else coding.loc[list(arms), c].astype(float).to_numpy() > 0
        for c in components
    ])
    cells = [tuple(row) for row in on.astype(int)]
    expected = set(itertools.product((0, 1), repeat=len(components)))
    repeated = {cell for cell in cells if cells.count(cell) > 1}
    absent = sorted(expected - set(cells))
    if repeated or absent:
        def name(cell):
            return "{" + ", ".join(f"{c}={'on' if v else 'off'}" for c, v in zip(components, cell)) + "}"
        raise ValueError(
            f"the arms do not form a complete 2^{len(components)} factorial over {components}: "
            + (f"cells without an arm: {[name(c) for c in absent]}; " if absent else "")
            + (f"cells with several arms: {[name(c) for c in sorted(repeated)]}; " if repeated else "")
            + "expected exactly one arm per combination. Run every arm of the factorial study."
        )
    return components, on


def _holm_by_family(effects: pd.DataFrame) -> None:
    """Set ``holm_family`` from each term's ``order`` and ``p_value_holm``: Holm within each family."""
    effects["holm_family"] = np.where(effects["order"] <= 2, LEADING_FAMILY, HIGHER_ORDER_FAMILY)
    for family in (LEADING_FAMILY, HIGHER_ORDER_FAMILY):
        members = effects["holm_family"] == family
        effects.loc[members, "p_value_holm"] = holm(effects.loc[members, "p_value"])


def factorial_contrasts(correct: pd.DataFrame | CorrectnessArray, design: pd.DataFrame,
                        confidence: float = DEFAULT_CONFIDENCE, components=None,
                        pool: bool = True) -> FactorialContrasts:
    """Main effects and every interaction of a 2^k factorial, each a contrast with seeds and images random.

    ``correct`` is the tidy per-image frame (see ``correctness_array``); ``design`` maps each arm to its
    components coded on/off (an ``arm`` column or index; bool, 0/1 or -0.5/+0.5, e.g. ``factorial_design``'s
    columns). ``components`` picks and orders the component columns (default: all but ``arm``).

    The effect of a term (a set of components) is the regression coefficient of the -0.5/+0.5 coding: a main
    effect is "on minus off", averaged over the other components; a two-way interaction is how much one
    component's effect changes when the other is switched on. As a contrast over the 2^k cells it has weights
    ``sign * 2^order / 2^k`` (sign: product of +-1 codes), and ``crossed_contrast`` analyses it per (seed,
    image): seeds are blocks by pairing (only seeds with every cell are used; the others are counted in
    ``seeds_dropped``), images are random. ``p_value_holm`` is Holm over the main effects and two-way
    interactions (the terms a report leads with, ``holm_family`` = ``LEADING_FAMILY``); the three-way and
    higher interactions form a second Holm family (``HIGHER_ORDER_FAMILY``).

    With ``pool`` (the default), the seed-by-contrast variation is pooled over all the terms
    (``pool_seed_error``), unless Cochran's test finds it heterogeneous (then per-term, said in ``note``).
    """
    check_confidence(confidence)
    array = correct if isinstance(correct, CorrectnessArray) else correctness_array(correct)
    components, on = _factorial_cells(design, array.arms, components)
    complete = array.present.all(axis=0)
    seeds_with_runs = array.present.any(axis=0)
    dropped = tuple(array.seeds[seeds_with_runs & ~complete].tolist())
    if not complete.any():
        raise ValueError(f"no seed has a run in every one of the {len(array.arms)} cells, so no factorial contrast "
                         "can be paired by seed; finish the missing cells (python -m experiments.ablate --study "
                         "factorial resumes them).")
    correct = array.correct[:, complete]
    # An image right (or wrong) in every cell and seed contributes 0 to every term (the weights add up to 0):
    # only the others are combined, into contrasts that are 0 elsewhere.
    varying = correct.any(axis=(0, 1)) & ~correct.all(axis=(0, 1))
    values = correct[:, :, varying].astype(np.float64)
    codes = np.where(on, 1.0, -1.0)
    terms, estimates, squared_weights = [], [], []
    for order in range(1, len(components) + 1):
        for term in itertools.combinations(range(len(components)), order):
            weights = codes[:, term].prod(axis=1) * 2.0 ** order / len(array.arms)
            contrast = np.zeros(correct.shape[1:])
            contrast[:, varying] = np.tensordot(weights, values, axes=1)
            terms.append((term, order))
            estimates.append(crossed_contrast(contrast))
            squared_weights.append(float(weights @ weights))
    estimates, homogeneity_p = pool_seed_error(estimates, squared_weights) if pool else (estimates, float("nan"))
    pooled = pool and any(not math.isnan(e.seed_df) for e in estimates)
    rows = []
    for (term, order), estimate in zip(terms, estimates):
        low, high = estimate.interval(confidence)
        rows.append({
            "term": ":".join(components[c] for c in term),
            "kind": "main effect" if order == 1 else "interaction", "order": order,
            "effect": estimate.estimate, "ci_low": low, "ci_high": high,
            "standard_error": estimate.standard_error, "df": estimate.df, "p_value": estimate.p_value,
            "n_seeds": estimate.n_seeds, "seed_variance": estimate.seed_variance,
            "image_variance": estimate.image_variance,
            "seed_error": math.sqrt(estimate.seed_term_variance / estimate.n_seeds) if estimate.estimable
            else float("nan"),
        })
    effects = pd.DataFrame(rows)
    _holm_by_family(effects)
    notes = []
    if dropped:
        notes.append(f"{len(dropped)} seed(s) lack at least one of the {len(array.arms)} cells and are left out of "
                     f"the factorial contrasts (seeds {list(dropped)}); {int(complete.sum())} seed(s) with every cell "
                     "are used.")
    if pool and not pooled and homogeneity_p < HOMOGENEITY_ALPHA:
        notes.append(f"The terms' seed-to-seed variation is not homogeneous (Cochran's test p = {homogeneity_p:.3f}), "
                     "so it is not pooled: each term uses its own seed variance, with n - 1 degrees of freedom, and "
                     "its interval is wider.")
    return FactorialContrasts(effects.reindex(columns=FACTORIAL_EFFECT_COLUMNS), int(complete.sum()), dropped,
                              " ".join(notes) or None, pooled, homogeneity_p,
                              sum(not math.isnan(e.seed_df) for e in estimates))


def pool_seed_error(estimates: list[ContrastEstimate], squared_weights) -> tuple[list[ContrastEstimate], float]:
    """Pool the seed-by-contrast variation of orthogonal contrasts of a complete 2^k design (seeds in every cell).

    Each term's seed mean square over its ``sum(w**2)`` estimates the same seed-by-cell variance when that
    variance is the same for every cell (the within-run noise is: |w| is equal for every cell of a term). The
    standard factorial analysis (Box, Hunter & Hunter 2005) then pools the 2^k - 1 terms into one error with
    (2^k - 1)(n - 1) degrees of freedom: 15 at 2 seeds instead of 1. Returns the estimates with the pooled seed
    term (floored, as always, by each term's within-run noise) and Cochran's test p-value of the homogeneity
    pooling assumes (the largest scaled mean square against their sum, Bonferroni over the terms, F-based); below
    ``HOMOGENEITY_ALPHA`` the estimates come back unchanged (per-term variances). Images stay random per term.
    """
    if len(estimates) < 2 or not all(e.estimable for e in estimates):
        return estimates, float("nan")
    # A term that is exactly zero on every seed and image compares cells that are the same training run
    # (identical by construction, e.g. a schedule step after the last epoch): it carries no seed variation to
    # pool, and is left as it is (zero width, no test).
    varies = [not (e.seed_mean_variance == 0 and e.residual_variance == 0 and e.image_variance == 0 and e.estimate == 0)
              for e in estimates]
    scaled = np.array([e.seed_mean_variance / w for e, w, v in zip(estimates, squared_weights, varies) if v])
    terms, df = len(scaled), estimates[0].n_seeds - 1
    total = float(scaled.sum())
    if terms < 2 or not total > 0:
        return estimates, float("nan")
    largest = float(scaled.max()) / total
    statistic = (terms - 1) * largest / (1 - largest) if largest < 1 else math.inf
    homogeneity_p = min(1.0, terms * float(scipy_stats.f.sf(statistic, df, (terms - 1) * df)))
    if homogeneity_p < HOMOGENEITY_ALPHA:
        return estimates, homogeneity_p
    pooled = total / terms
    return [dataclasses.replace(e, seed_mean_variance=pooled * w, seed_df=float(terms * df)) if v else e
            for e, w, v in zip(estimates, squared_weights, varies)], homogeneity_p


@dataclass(frozen=True)
class FactorialOLS:
    """Run-level OLS of ``formula``: effects, ANOVA and a warning when the design is unbalanced."""

    effects: pd.DataFrame
    anova: pd.DataFrame
    warning: str | None
    n_runs: int
    formula: str


def factorial_block_ols(runs: pd.DataFrame, design: pd.DataFrame, confidence: float = DEFAULT_CONFIDENCE,
                        components=None) -> FactorialOLS:
    """Run-level OLS with seed as a block and the saturated factorial: ``factorial_block_formula(components)``.

    ``design`` codes each arm's components on/off, as for ``factorial_contrasts`` (the study's definition).
    One observation per FINISHED run (test accuracy; a NaN accuracy is dropped and counted in ``warning``).
    Seeds are shared by all cells, so ``C(seed)`` removes seed-to-seed shifts; all interactions are in the model
    (none is folded into the residual), so the residual is the seed x cell interaction, with (cells - 1)(seeds -
    1) degrees of freedom in a balanced design. This treats the test set as fixed (like the "this test set only"
    columns); ``factorial_contrasts`` is the analysis that also counts the test images. ``anova`` is
    ``anova_lm(typ=2)``. When not every seed has every cell exactly once the design is unbalanced: types
    I/II/III of the ANOVA then disagree with each other and with the coefficient t-tests, and ``warning`` says
    so. The effects table has the ``FACTORIAL_EFFECT_COLUMNS`` that apply (``holm_family`` as in
    ``factorial_contrasts``) plus ``t_statistic``.
    """
    import statsmodels.api as sm
    import statsmodels.formula.api as smf

    check_confidence(confidence)
    if "seed" not in runs:
        raise ValueError(f"the block model needs a 'seed' column in the runs frame; got columns {list(runs.columns)}.")
    coded = factorial_design(runs, design, components)
    components = [c for c in coded.columns if c not in ("arm", "seed", "test_accuracy")]
    formula = factorial_block_formula(components)
    notes = []
    failed = coded["test_accuracy"].isna()
    if failed.any():
        notes.append(f"{int(failed.sum())} run(s) without a test accuracy are left out")
        coded = coded[~failed]
    constant = [c for c in components if coded[c].nunique() < 2]
    n_cells = 2 ** len(components)
    n_seeds = coded["seed"].nunique()
    n_parameters = n_cells + n_seeds - 1
    if constant or len(coded) <= n_parameters:
        raise ValueError(
            f"the block model {formula!r} has {n_parameters} coefficients with {n_seeds} seed(s) and "
            f"needs more runs than that, with every component both on and off; got {len(coded)} runs"
            + (f" and components that never vary: {constant}" if constant else "")
            + f". Run all {n_cells} arms of the factorial study with at least two seeds "
            "(python -m experiments.ablate --study factorial --seeds 2)."
        )
    per_cell = coded.groupby(["seed", *components]).size()
    if len(per_cell) != n_cells * n_seeds or (per_cell != 1).any():
        notes.append(f"the design is unbalanced ({len(coded)} runs, not one per seed and cell: {n_seeds} seeds x "
                     f"{n_cells} cells = {n_cells * n_seeds}), so the ANOVA's types I/II/III disagree with each "
                     "other and with the coefficient t-tests; read the effects with care")
    model = smf.ols(formula, data=coded).fit()
    interval = model.conf_int(alpha=1 - confidence)
    treatment = [name for name in model.params.index if name != "Intercept" and not name.startswith("C(seed)")]
    order = np.array([name.count(":") + 1 for name in treatment])
    effects = pd.DataFrame({
        "term": treatment, "kind": np.where(order == 1, "main effect", "interaction"), "order": order,
        "effect": model.params[treatment].to_numpy(), "ci_low": interval.loc[treatment, 0].to_numpy(),
        "ci_high": interval.loc[treatment, 1].to_numpy(), "standard_error": model.bse[treatment].to_numpy(),
        "df": float(model.df_resid), "t_statistic": model.tvalues[treatment].to_numpy(),
        "p_value": model.pvalues[treatment].to_numpy(),
    })
    _holm_by_family(effects)
    effects = effects.sort_values("order", kind="stable").reset_index(drop=True)
    anova = sm.stats.anova_lm(model, typ=2).reset_index().rename(columns={"index": "term"})
    warning = None
    if notes:
        text = "; ".join(notes)
        warning = text[0].upper() + text[1:] + "."
    return FactorialOLS(effects, anova, warning, len(coded), formula)


def learning_curve_table(histories: pd.DataFrame, threshold: float = DEFAULT_THRESHOLD) -> pd.DataFrame:
    """Per run, from per-epoch metrics (run_id, arm, seed, epoch, accuracy, val_accuracy; epoch from 0).

    epochs_to_threshold: first epoch (counting from 1) whose validation accuracy reaches ``threshold``
    (NaN if never); best_epoch and best_val_accuracy: the epoch of the highest validation accuracy;
    final_gap: training minus validation accuracy at the last epoch (positive = overfitting, negative is
    usual with augmentation and dropout, which handicap the training pass).
    """
    check_threshold(threshold)
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


def learning_curve_summary(per_run: pd.DataFrame, threshold: float = DEFAULT_THRESHOLD) -> pd.DataFrame:
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
    """Per arm and epoch: the mean of ``metric`` over seeds with its t interval (NaN bounds with one seed).

    The band respects the metric's range: for an accuracy (a name containing "accuracy") it is clipped to
    [0, 1], for a loss (a name containing "loss") to [0, inf); a t interval knows nothing of either bound, and
    with two or three seeds it can cross them. Clipping is a display convention for learning-curve bands, not a
    valid interval method; one arm's test accuracy has ``accuracy_interval``, which stays in range by design.
    """
    lower, upper = (0.0, 1.0) if "accuracy" in metric else ((0.0, np.inf) if "loss" in metric else (-np.inf, np.inf))
    rows = []
    for (arm, epoch), group in histories.groupby(["arm", "epoch"], sort=False):
        interval = mean_confidence_interval(group[metric], confidence)
        rows.append({"arm": arm, "epoch": epoch, "n": interval.n, "mean": interval.mean,
                     "ci_low": float(np.clip(interval.low, lower, upper)),
                     "ci_high": float(np.clip(interval.high, lower, upper))})
    return pd.DataFrame(rows, columns=["arm", "epoch", "n", "mean", "ci_low", "ci_high"])
