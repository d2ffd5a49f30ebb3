"""Statistics of the ablation report against independent calculations on fixed inputs."""

from __future__ import annotations

import dataclasses
import itertools
import math
import statistics

import numpy as np
import pandas as pd
import pytest
from statsmodels.stats.multitest import multipletests

from mnist_ablation import stats

# Student-t quantiles t(0.975, df) from printed tables (not from SciPy).
T_975 = {1: 12.706204736174707, 2: 4.302652729911275, 3: 3.182446305284263, 21: 2.079613844727662}


def test_mean_interval_matches_hand_computed_t_interval():
    result = stats.mean_confidence_interval([0.98, 0.99, 1.00])
    half_width = T_975[2] * 0.01 / math.sqrt(3)
    assert result.n == 3
    assert result.mean == pytest.approx(0.99)
    assert result.low == pytest.approx(0.99 - half_width)
    assert result.high == pytest.approx(0.99 + half_width)


def test_mean_interval_with_one_value_is_not_computable():
    result = stats.mean_confidence_interval([0.97])
    assert result.mean == 0.97
    assert math.isnan(result.low) and math.isnan(result.high)


def test_holm_on_known_p_values():
    # Sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> monotone 0.02, 0.03, 0.06, 0.06.
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # A NaN p stays NaN but counts in the family: k = 3, so 0.01 * 3 and 0.04 * 2.
    adjusted = stats.holm([0.01, np.nan, 0.04])
    assert adjusted[0] == pytest.approx(0.03) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.08)
    # The same as statsmodels' Holm with the NaN entries read as p = 1 (where they sort last).
    p = np.array([0.2, np.nan, 0.001, 0.03, np.nan, 0.5])
    reference = multipletests(np.nan_to_num(p, nan=1.0), method="holm")[1]
    assert stats.holm(p)[~np.isnan(p)] == pytest.approx(reference[~np.isnan(p)])
    assert stats.holm([0.9, 0.8]) == pytest.approx([1.0, 1.0]) and len(stats.holm([])) == 0


def test_learning_curve_table_and_summary():
    histories = pd.DataFrame({
        "run_id": ["r0"] * 4 + ["r1"] * 4, "arm": ["baseline"] * 8, "seed": [0] * 4 + [1] * 4,
        "epoch": [0, 1, 2, 3] * 2,
        "val_accuracy": [0.97, 0.985, 0.991, 0.990, 0.96, 0.97, 0.98, 0.985],
        "accuracy": [0.95, 0.98, 0.99, 0.995, 0.94, 0.96, 0.975, 0.99],
    })
    per_run = stats.learning_curve_table(histories, threshold=0.99).set_index("run_id")
    assert per_run.loc["r0", "epochs_to_threshold"] == 3
    assert per_run.loc["r0", "best_epoch"] == 3
    assert per_run.loc["r0", "final_gap"] == pytest.approx(0.005)
    assert math.isnan(per_run.loc["r1", "epochs_to_threshold"])
    assert per_run.loc["r1", "best_epoch"] == 4
    summary = stats.learning_curve_summary(per_run.reset_index(), 0.99).iloc[0]
    assert summary["n_reached_threshold"] == 1 and summary["epochs_to_threshold_mean"] == 3
    assert summary["final_gap_mean"] == pytest.approx((0.005 + 0.005) / 2)
    with pytest.raises(ValueError, match="threshold"):
        stats.learning_curve_table(histories, threshold=99)


# -- the crossed design (seeds x test images, both random) ----------------------------------------------------


def test_crossed_contrast_of_an_additive_design_has_known_components():
    # d_si = a_s + b_i exactly: no residual, the seed term is var(a) / n and the image term var(b) / m.
    a, b = [0.1, -0.1, 0.3], [0.2, 0.0, -0.2, 0.4, 0.1]
    values = np.add.outer(a, b)
    estimate = stats.crossed_contrast(values)
    seed_part, image_part = statistics.variance(a) / 3, statistics.variance(b) / 5
    assert estimate.estimate == pytest.approx(statistics.mean(a) + statistics.mean(b))
    assert estimate.residual_variance == pytest.approx(0, abs=1e-15)
    assert estimate.seed_mean_variance == pytest.approx(statistics.variance(a))
    assert estimate.seed_variance == pytest.approx(statistics.variance(a))
    assert estimate.image_variance == pytest.approx(statistics.variance(b))
    assert estimate.standard_error == pytest.approx(math.sqrt(seed_part + image_part))
    # Satterthwaite: the seed term has n - 1 = 2 df; the image term's df is 2 * var(b)^2 * m / var(z), z_i being
    # each image's contribution (b_i - mean b)^2 (no residual to subtract).
    z = [(x - statistics.mean(b)) ** 2 for x in b]
    image_df = 2 * statistics.variance(b) ** 2 * 5 / statistics.variance(z)
    assert estimate.image_df == pytest.approx(image_df)
    satterthwaite = (seed_part + image_part) ** 2 / (seed_part ** 2 / 2 + image_part ** 2 / image_df)
    assert estimate.df == pytest.approx(satterthwaite)
    # The "this test set only" analysis is the paired t over the seed means.
    assert estimate.standard_error_this_test_set == pytest.approx(math.sqrt(seed_part))
    low, high = estimate.interval_this_test_set()
    half_width = T_975[2] * math.sqrt(seed_part)
    assert (high - estimate.estimate, estimate.estimate - low) == pytest.approx((half_width, half_width))


def test_crossed_contrast_mean_squares_match_a_two_way_anova():
    import statsmodels.api as sm
    import statsmodels.formula.api as smf

    rng = np.random.default_rng(7)
    values = rng.normal(size=(4, 9)) + rng.normal(0, 2, size=(4, 1)) + rng.normal(0, 3, size=(1, 9))
    seeds, images = np.meshgrid(range(4), range(9), indexing="ij")
    frame = pd.DataFrame({"d": values.ravel(), "seed": seeds.ravel(), "image": images.ravel()})
    anova = sm.stats.anova_lm(smf.ols("d ~ C(seed) + C(image)", data=frame).fit()).set_index(
        pd.Index(["seed", "image", "residual"]))["mean_sq"]
    estimate = stats.crossed_contrast(values)
    assert estimate.seed_mean_variance == pytest.approx(anova["seed"] / 9)
    assert estimate.residual_variance == pytest.approx(anova["residual"])
    assert estimate.image_variance == pytest.approx((anova["image"] - anova["residual"]) / 4)
    assert estimate.standard_error ** 2 == pytest.approx((anova["seed"] + anova["image"] - anova["residual"]) / 36)
    # With weights, an (arms, seeds, images) array is combined first.
    arms = np.stack([values, 2 * values])
    assert stats.crossed_contrast(arms, [-1.0, 1.0]).estimate == pytest.approx(values.mean())


def test_crossed_contrast_with_mostly_zero_images_matches_a_two_way_anova():
    # MNIST-like: most images never differ (their all-zero columns share one weighted column inside).
    import statsmodels.api as sm
    import statsmodels.formula.api as smf

    rng = np.random.default_rng(17)
    values = np.zeros((3, 120))
    values[:, :25] = rng.integers(-1, 2, (3, 25))
    seeds, images = np.meshgrid(range(3), range(120), indexing="ij")
    frame = pd.DataFrame({"d": values.ravel(), "seed": seeds.ravel(), "image": images.ravel()})
    anova = sm.stats.anova_lm(smf.ols("d ~ C(seed) + C(image)", data=frame).fit()).set_index(
        pd.Index(["seed", "image", "residual"]))["mean_sq"]
    estimate = stats.crossed_contrast(values)
    assert estimate.n_images == 120 and estimate.estimate == pytest.approx(values.mean())
    assert estimate.seed_mean_variance == pytest.approx(anova["seed"] / 120)
    assert estimate.residual_variance == pytest.approx(anova["residual"])
    assert estimate.image_variance == pytest.approx(max(anova["image"] - anova["residual"], 0) / 3)
    # The image df and the jackknife moments do not depend on where the zero images sit.
    shuffled = stats.crossed_contrast(values[:, rng.permutation(120)])
    for field in ("image_df", "skewness", "skew_covariance"):
        assert getattr(shuffled, field) == pytest.approx(getattr(estimate, field), rel=1e-9, abs=1e-15), field


def test_crossed_contrast_truncates_a_negative_image_component():
    # Images that differ less than the seed x image noise: the image component estimates as 0, never negative,
    # and the variance is the seed-only one with n - 1 degrees of freedom.
    values = np.array([[1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 1.0]])
    estimate = stats.crossed_contrast(values)
    assert not estimate.seed_term_floored  # the seed mean square is above the within-run noise here
    assert estimate.image_variance == 0.0
    assert estimate.df == pytest.approx(2)
    assert estimate.standard_error == pytest.approx(estimate.standard_error_this_test_set)


def test_one_seed_gives_no_interval_test_or_plan():
    estimate = stats.crossed_contrast([[1, 0, 0, -1, 1]])
    assert estimate.estimate == pytest.approx(0.2) and estimate.n_seeds == 1 and not estimate.estimable
    values = [*estimate.interval(), estimate.p_value, estimate.equivalence_p_value(), estimate.standard_error,
              estimate.df, estimate.minimum_detectable_effect(), estimate.seeds_for_width(0.01),
              estimate.seeds_for_effect(0.1), estimate.floor_width(), *estimate.interval_this_test_set()]
    assert all(math.isnan(v) for v in values)


def test_crossed_contrast_rejects_bad_input():
    with pytest.raises(ValueError, match="at least one seed and two test images"):
        stats.crossed_contrast(np.zeros((3, 1)))
    with pytest.raises(ValueError, match="NaN or infinite"):
        stats.crossed_contrast([[0.0, np.nan], [1.0, 0.0]])
    with pytest.raises(ValueError, match="one weight per arm"):
        stats.crossed_contrast(np.zeros((2, 3, 4)), [1.0, -1.0, 0.0])


def _noisy_estimate(n_seeds=4, n_images=400, seed=3):
    rng = np.random.default_rng(seed)
    values = (rng.normal(0, 0.02, (n_seeds, 1)) + rng.normal(0.01, 0.05, (1, n_images))
              + rng.normal(0, 0.1, (n_seeds, n_images)))
    return stats.crossed_contrast(values)


def test_planning_is_consistent_with_the_interval():
    estimate = _noisy_estimate()
    low, high = estimate.interval(0.9)
    assert estimate.width_at(estimate.n_seeds, 0.9) == pytest.approx(high - low)
    floor = estimate.floor_width()
    assert 0 < floor < estimate.width_at(50) < estimate.width_at(5) < estimate.width_at(2)
    assert floor == pytest.approx(2 * 1.959964 * math.sqrt(estimate.image_variance / estimate.n_images), rel=0.05)
    target = (floor + estimate.width_at(estimate.n_seeds)) / 2
    needed = estimate.seeds_for_width(target)
    assert estimate.width_at(needed) <= target < estimate.width_at(needed - 1)
    assert estimate.seeds_for_width(0.99 * floor) == math.inf
    # The minimum detectable effect at this design is detected with exactly this many seeds.
    mde = estimate.minimum_detectable_effect(alpha=0.05 / 3)
    assert estimate.seeds_for_effect(mde * 1.0001, alpha=0.05 / 3) == estimate.n_seeds
    assert estimate.seeds_for_effect(0.0) == math.inf
    with pytest.raises(ValueError, match="target interval width"):
        estimate.seeds_for_width(0)


def test_equivalence_test_is_two_one_sided_t_tests():
    from scipy import stats as scipy_stats

    symmetric = stats.ContrastEstimate(estimate=0.0003, n_seeds=5, n_images=10_000, seed_mean_variance=4e-7,
                                       image_variance=0.0, residual_variance=0.001, image_df=9999.0)
    se, df = symmetric.standard_error, symmetric.df
    assert df == pytest.approx(4)
    expected = max(scipy_stats.t.sf((0.0003 + 0.001) / se, df), scipy_stats.t.cdf((0.0003 - 0.001) / se, df))
    assert symmetric.equivalence_p_value(0.001) == pytest.approx(expected)
    # With 4 df the skewness correction does not hold (it assumes a nearly exact variance): plain TOST.
    assert dataclasses.replace(symmetric, skewness=0.1, skew_covariance=0.1).equivalence_p_value(0.001) == \
        pytest.approx(expected)
    # With 9 df a skewed estimate shifts the one-sided tests (Hall's transformation); a symmetric one does not.
    symmetric = dataclasses.replace(symmetric, n_seeds=10, seed_mean_variance=8e-7)
    se, df = symmetric.standard_error, symmetric.df
    expected = max(scipy_stats.t.sf((0.0003 + 0.001) / se, df), scipy_stats.t.cdf((0.0003 - 0.001) / se, df))
    assert df == pytest.approx(9) and symmetric.equivalence_p_value(0.001) == pytest.approx(expected)
    skewed = dataclasses.replace(symmetric, skewness=0.1, skew_covariance=0.1)
    assert skewed.equivalence_p_value(0.001) != pytest.approx(expected)
    assert 0 <= skewed.equivalence_p_value(0.001) <= 1
    statistics_ = np.linspace(-6, 6, 201)
    assert np.all(np.diff([skewed._unskewed(t) for t in statistics_]) > 0)  # monotone
    with pytest.raises(ValueError, match="equivalence margin"):
        symmetric.equivalence_p_value(-0.001)


def _tidy(correct_by_arm: dict) -> pd.DataFrame:
    """Tidy frame from {arm: (seeds, images) 0/1 array} with seeds 0.. and images 0.."""
    frames = []
    for arm, matrix in correct_by_arm.items():
        matrix = np.asarray(matrix, dtype=bool)
        seeds, images = np.meshgrid(range(matrix.shape[0]), range(matrix.shape[1]), indexing="ij")
        frames.append(pd.DataFrame({"arm": arm, "seed": seeds.ravel(), "image": images.ravel(),
                                    "correct": matrix.ravel()}))
    return pd.concat(frames, ignore_index=True)


def _counts_matrix(counts, n_images):
    """0/1 rows with the given number of correct images (the first ``count`` images right)."""
    return np.array([[i < count for i in range(n_images)] for count in counts])


def _exact_signed_rank_p(differences) -> float:
    """Two-sided exact Wilcoxon p by enumerating all sign flips, zeros dropped, average ranks for ties."""
    from scipy.stats import rankdata

    nonzero = [d for d in differences if d != 0]
    ranks = rankdata([abs(d) for d in nonzero])
    centre = ranks.sum() / 2
    observed = abs(sum(r for r, d in zip(ranks, nonzero) if d > 0) - centre)
    extreme = 0
    for signs in itertools.product((0, 1), repeat=len(nonzero)):
        extreme += abs(sum(r for r, s in zip(ranks, signs) if s) - centre) >= observed - 1e-9
    return extreme / 2 ** len(nonzero)


def test_compare_to_baseline_pairs_seeds_and_matches_independent_calculations():
    from scipy import stats as scipy_stats

    m = 50
    baseline_counts = [45, 46, 44, 47, 45, 46, 45]
    arm_counts = [47, 48, 44, 49, 46, 48, 47]  # differences 2, 2, 0, 2, 1, 2, 2: real ties and a zero
    correct = _tidy({
        "baseline": _counts_matrix(baseline_counts, m),
        "better": _counts_matrix(arm_counts, m),
        "one_seed": _counts_matrix([40], m),
        "short": _counts_matrix(arm_counts[:4], m),  # seeds 0-3 only
    })
    table = stats.compare_to_baseline(correct, confidence=0.95, equivalence_margin=0.002)
    assert list(table.columns) == stats.COMPARISON_COLUMNS
    assert list(table["arm"]) == ["better", "one_seed", "short"]
    rows = table.set_index("arm")
    better = rows.loc["better"]
    assert better["n_pairs"] == 7
    assert better["baseline_accuracy"] == pytest.approx(sum(baseline_counts) / (7 * m))
    assert better["delta"] == pytest.approx(better["arm_accuracy"] - better["baseline_accuracy"])
    t_test = scipy_stats.ttest_rel(np.array(arm_counts) / m, np.array(baseline_counts) / m)
    assert better["p_value_this_test_set"] == pytest.approx(t_test.pvalue)
    interval = t_test.confidence_interval(0.95)
    assert better["delta_ci_low_this_test_set"] == pytest.approx(interval.low)
    assert better["delta_ci_high_this_test_set"] == pytest.approx(interval.high)
    differences = [a - b for a, b in zip(arm_counts, baseline_counts)]
    assert better["wilcoxon_p_value"] == pytest.approx(_exact_signed_rank_p(differences))
    # Hedges' correction J(6) = Gamma(3) / (sqrt(3) Gamma(5 / 2)) on d_z.
    d_z = statistics.mean(differences) / statistics.stdev(differences)
    assert better["effect_size"] == pytest.approx(d_z * 2 / (math.sqrt(3) * math.gamma(2.5)))
    # The recipe-level interval is at least as wide as the seed-only one and contains the estimate.
    assert better["delta_ci_low"] <= better["delta_ci_low_this_test_set"] <= better["delta"]
    assert better["equivalence_margin"] == 0.002
    # "short": means and delta on the 4 paired seeds only.
    short = rows.loc["short"]
    assert short["n_pairs"] == 4
    assert short["baseline_accuracy"] == pytest.approx(sum(baseline_counts[:4]) / (4 * m))
    assert math.isnan(short["wilcoxon_p_value"])  # fewer than 6 pairs
    # One paired seed: delta given, everything that needs the seed variance NaN.
    single = rows.loc["one_seed"]
    assert single["n_pairs"] == 1 and single["delta"] == pytest.approx((40 - 45) / m)
    for column in ("delta_ci_low", "delta_ci_high", "p_value", "p_value_holm", "mde", "seeds_needed",
                   "ci_width_floor", "equivalence_p_value", "effect_size"):
        assert math.isnan(single[column]), column
    # Holm over all three compared arms, the NaN one included.
    assert table["p_value_holm"].to_numpy() == pytest.approx(stats.holm(table["p_value"]), nan_ok=True)
    assert better["p_value_holm"] >= min(1.0, 2 * better["p_value"])
    assert better["mde"] > 0 and better["seeds_needed"] >= 2


def test_wilcoxon_on_integer_counts_keeps_real_ties():
    from scipy import stats as scipy_stats

    rng = np.random.default_rng(11)
    for _ in range(50):
        n = int(rng.integers(6, 12))
        baseline, arm = rng.integers(9950, 9960, n), rng.integers(9950, 9960, n)
        if not np.any(arm != baseline):
            continue
        expected = _exact_signed_rank_p(arm - baseline)
        assert stats.wilcoxon_counts(arm, baseline) == pytest.approx(expected)
        nonzero = (arm - baseline)[arm != baseline]
        reference = scipy_stats.wilcoxon(nonzero, method=scipy_stats.PermutationMethod(n_resamples=np.inf))
        assert stats.wilcoxon_counts(arm, baseline) == pytest.approx(reference.pvalue)
    assert math.isnan(stats.wilcoxon_counts([5, 6, 7, 8, 9], [1, 1, 1, 1, 1]))  # 5 pairs: never below 0.0625
    assert math.isnan(stats.wilcoxon_counts([5] * 8, [5] * 8))


def test_hedges_correction_removes_the_small_sample_bias_of_d_z():
    assert math.isnan(stats.hedges_dz([0.1, 0.2]))  # needs three values
    differences = [0.1, 0.3, 0.2]
    d_z = statistics.mean(differences) / statistics.stdev(differences)
    assert stats.hedges_dz(differences) == pytest.approx(d_z / math.sqrt(math.pi))  # J(2) = 1 / Gamma(1/2)


@pytest.mark.parametrize(("frame_change", "message"), [
    (lambda f: f.drop(columns="image"), r"no column\(s\) \['image'\]"),
    (lambda f: pd.concat([f, f.iloc[[3]]]), "appear more than once.*arm 'baseline', seed 0, image 3"),
    (lambda f: f.drop(index=f.index[(f["arm"] == "arm") & (f["seed"] == 1) & (f["image"] == 2)]),
     "arm 'arm', seed 1 was scored on 3 of the 4 test images.*image 2 is missing"),
    (lambda f: f.assign(correct=f["correct"].astype(int).replace({1: 2})), "column 'correct' has value 2"),
    (lambda f: f.assign(correct=f["correct"].astype(object).where(f.index != 5, None)), "'correct' has 1 missing"),
    (lambda f: f.iloc[:0], "empty"),
])
def test_compare_to_baseline_rejects_bad_frames_with_helpful_errors(frame_change, message):
    frame = _tidy({"baseline": np.ones((2, 4)), "arm": np.eye(2, 4)})
    with pytest.raises(ValueError, match=message):
        stats.compare_to_baseline(frame_change(frame))


def test_compare_to_baseline_needs_a_known_baseline_and_a_frame():
    frame = _tidy({"baseline": np.ones((2, 4)), "arm": np.eye(2, 4)})
    message = r"arm 'control' is not in the study's results; its arms are \['baseline', 'arm'\]"
    with pytest.raises(ValueError, match=message):
        stats.compare_to_baseline(frame, baseline="control")
    with pytest.raises(TypeError, match="expected a pandas DataFrame"):
        stats.compare_to_baseline(np.ones((2, 4)))
    with pytest.raises(ValueError, match="equivalence_margin"):
        stats.compare_to_baseline(frame, equivalence_margin=0)


def test_compare_to_baseline_is_fast_on_a_full_study():
    import time

    rng = np.random.default_rng(0)
    arms, n_seeds, n_images = ["baseline", "no_bn", "no_aug", "no_dropout", "constant_lr"], 10, 10_000
    correct = rng.random((len(arms), n_seeds, n_images)) < 0.995
    frame = pd.DataFrame({
        "arm": np.repeat(arms, n_seeds * n_images), "seed": np.tile(np.repeat(np.arange(n_seeds), n_images), 5),
        "image": np.tile(np.arange(n_images), 5 * n_seeds), "correct": correct.ravel(),
    })
    stats.compare_to_baseline(frame.iloc[:4 * n_images])  # warm up imports, not the work
    start = time.perf_counter()
    table = stats.compare_to_baseline(frame)
    elapsed = time.perf_counter() - start
    assert len(table) == 4 and (table["n_pairs"] == 10).all()
    assert elapsed < 2.0, f"compare_to_baseline took {elapsed:.2f} s on 500,000 rows"


# -- one arm's accuracy -----------------------------------------------------------------------------------------


def test_accuracy_interval_stays_within_0_and_1_on_the_logit_scale():
    matrix = _counts_matrix([34, 95], 100)  # two seeds at 34% and 95%
    result = stats.accuracy_interval(matrix)
    assert result.accuracy == pytest.approx(0.645)
    assert 0 < result.low < result.accuracy < result.high < 1
    # By hand: logit(p) +- t(df) * se / (p (1 - p)), back through the logistic function.
    estimate = stats.crossed_contrast(matrix)
    half = scipy_t_quantile(0.975, estimate.df) * estimate.standard_error / (0.645 * 0.355)
    logit = math.log(0.645 / 0.355)
    assert result.low == pytest.approx(1 / (1 + math.exp(-(logit - half))))
    assert result.high == pytest.approx(1 / (1 + math.exp(-(logit + half))))


def scipy_t_quantile(probability, df):
    from scipy import stats as scipy_stats

    return scipy_stats.t.ppf(probability, df)


def test_accuracy_interval_degenerate_cases():
    perfect = stats.accuracy_interval(np.ones((3, 200), dtype=bool))
    assert perfect.accuracy == 1 and perfect.high == 1
    assert perfect.low == pytest.approx(0.025 ** (1 / 200))  # Clopper-Pearson for 200 of 200
    hopeless = stats.accuracy_interval(np.zeros((3, 200), dtype=bool))
    assert hopeless.low == 0 and hopeless.high == pytest.approx(1 - 0.025 ** (1 / 200))
    single = stats.accuracy_interval(_counts_matrix([90], 100))
    assert single.accuracy == pytest.approx(0.9) and math.isnan(single.low) and math.isnan(single.high)
    with pytest.raises(ValueError, match="0/1"):
        stats.accuracy_interval([[0.5, 1.0], [1.0, 1.0]])


def test_accuracy_table_per_arm():
    frame = _tidy({"baseline": _counts_matrix([90, 92, 91], 100), "arm": _counts_matrix([80, 85], 100)})
    table = stats.accuracy_table(frame).set_index("arm")
    assert list(table.reset_index().columns) == stats.ACCURACY_COLUMNS
    assert table.loc["baseline", "n_seeds"] == 3 and table.loc["arm", "n_seeds"] == 2
    assert table.loc["arm", "test_accuracy_mean"] == pytest.approx(0.825)
    assert (table["test_accuracy_ci_low"] < table["test_accuracy_mean"]).all()


# -- the precision stopping rule ------------------------------------------------------------------------------


def test_precision_stop_reason_branches():
    reason = stats.precision_stop_reason
    stage = _noisy_estimate(n_seeds=3)  # interval about 0.08 wide, test-set floor about 0.03
    width, floor = stage.width_at(3), stage.floor_width()
    assert floor < width
    planned, why = stats.precision_seeds(stage, width * 1.01, 10)
    assert (planned, why) == (3, stats.TARGET_REACHED) and reason(stage, 3, width * 1.01, 10) == stats.TARGET_REACHED
    planned, why = stats.precision_seeds(stage, (floor + width) / 2, 10)
    assert 3 < planned <= 10 and reason(stage, 3, (floor + width) / 2, 10) is None
    assert reason(stage, planned, (floor + width) / 2, 10) == why
    # Stein: the planned n makes the two-stage interval (first-stage seed term, its 2 df) at most the target.
    if why == stats.TARGET_REACHED:
        two_stage = dataclasses.replace(stage, n_seeds=planned, seed_df=2.0)
        assert two_stage.width_at(planned) <= (floor + width) / 2 < dataclasses.replace(
            stage, n_seeds=planned - 1, seed_df=2.0).width_at(planned - 1)
    assert reason(stage, 4, floor * 1.01, 4) == stats.MAX_SEEDS_REACHED
    assert reason(stage, 3, floor * 0.99, 10) == f"test set limits this difference to ±{50 * floor:.2f} points"
    assert reason(None, 1, 0.001, 10) is None  # one seed: no first stage yet, keep going
    assert reason(None, 10, 0.001, 10) == stats.MAX_SEEDS_REACHED
    with pytest.raises(ValueError, match="target interval width"):
        reason(stage, 3, -1, 10)
    with pytest.raises(ValueError, match="max_seeds"):
        reason(stage, 3, 0.001, 1)


def test_a_zero_standard_error_with_real_spread_gives_no_interval():
    # The audit's case: 2 seeds, the arm right on 10 images per seed that the baseline misses, other images each
    # seed. The seed means agree exactly, yet the runs differ: the within-run noise floor keeps a real error.
    values = np.zeros((2, 1000))
    values[0, :10], values[1, 10:20] = 1, 1
    estimate = stats.crossed_contrast(values)
    assert estimate.seed_mean_variance == 0 and estimate.seed_term_floored
    low, high = estimate.interval()
    assert estimate.standard_error > 0 and low < 0.01 < high and not math.isnan(estimate.p_value)
    # Every (seed, image) value equal and non-zero: no spread can be measured, so no interval (not a zero width).
    constant = stats.ContrastEstimate(estimate=0.001, n_seeds=2, n_images=1000, seed_mean_variance=0.0,
                                      image_variance=0.0, residual_variance=0.0, image_df=999.0)
    assert math.isnan(constant.standard_error) and all(math.isnan(v) for v in constant.interval())
    assert stats.precision_stop_reason(constant, 2, 0.01, 10) is None


def test_a_zero_width_interval_never_reaches_the_target():
    values = np.zeros((3, 50))
    identical = stats.crossed_contrast(values)
    assert identical.interval() == (0.0, 0.0)
    assert stats.precision_seeds(identical, 0.01, 10) == (10, stats.MAX_SEEDS_REACHED)
    assert stats.precision_stop_reason(identical, 3, 0.01, 10) is None


def test_precision_decisions_on_a_results_table_use_the_first_stage_only():
    rng = np.random.default_rng(2)
    arms = {"baseline": rng.random((6, 300)) < 0.9, "close": rng.random((6, 300)) < 0.9,
            "far": rng.random((2, 300)) < 0.5}
    decisions = stats.precision_decisions(_tidy(arms), first_stage_seeds=3, target_width=10.0, max_seeds=10)
    assert list(decisions.columns) == stats.PRECISION_COLUMNS
    rows = decisions.set_index("arm")
    assert list(rows.index) == ["close", "far"] and (rows["stop_reason"] == stats.TARGET_REACHED).all()
    assert rows.loc["close", "first_stage_seeds"] == 3 and rows.loc["far", "first_stage_seeds"] == 2
    # Later seeds do not change the decision: only the first stage's variance decides.
    later = {**arms, "close": np.vstack([arms["close"][:3], ~arms["close"][3:]])}
    assert stats.precision_decisions(_tidy(later), 3, 10.0, 10).equals(decisions)
    tight = stats.precision_decisions(_tidy(arms), 3, target_width=1e-6, max_seeds=4).set_index("arm")
    assert tight.loc["close", "stop_reason"] in (stats.MAX_SEEDS_REACHED,) or \
        tight.loc["close", "stop_reason"].startswith("test set limits")
    assert stats.arms_needing_seeds(tight.reset_index()) == [
        arm for arm in ("close", "far") if tight.loc[arm, "stop_reason"] is None]


def test_two_stage_estimate_keeps_the_first_stage_seed_term():
    rng = np.random.default_rng(5)
    values = rng.normal(0, 0.3, (8, 200)) + rng.normal(0, 0.05, (8, 1)) + 0.02
    first, final = stats.crossed_contrast(values[:3]), stats.crossed_contrast(values)
    two_stage = stats.two_stage_estimate(first, final)
    assert two_stage.estimate == final.estimate and two_stage.n_seeds == 8
    assert two_stage.seed_term_variance == pytest.approx(first.seed_term_variance)
    assert two_stage.seed_df_at(8) == 2
    assert two_stage.image_variance == final.image_variance
    assert stats.two_stage_estimate(first, first) is first


# -- the factorial study through the crossed machinery -------------------------------------------------------------


COMPONENTS = ("augmentation", "batch_norm", "dropout", "step_lr")  # the factorial study's, from its definition


def _factorial_correct(n_seeds=3, n_images=60, seed=4):
    """Per-image results of a 16-cell factorial: arm names, the design frame, the tidy frame and per-run rows."""
    rng = np.random.default_rng(seed)
    cells = list(itertools.product((False, True), repeat=4))
    design = pd.DataFrame([{"arm": f"cell{i}", **dict(zip(COMPONENTS, cell))}
                           for i, cell in enumerate(cells)])
    matrices = {}
    for i, (a, b, c, _) in enumerate(cells):
        accuracy = 0.85 + 0.06 * a + 0.03 * b - 0.04 * a * b + 0.02 * a * b * c
        matrices[f"cell{i}"] = rng.random((n_seeds, n_images)) < accuracy
    runs = pd.DataFrame([
        {"arm": arm, "seed": seed_, "augmentation": design.set_index("arm").loc[arm, "augmentation"],
         "batch_norm": design.set_index("arm").loc[arm, "batch_norm"],
         "dropout": design.set_index("arm").loc[arm, "dropout"],
         "lr_schedule": "step" if design.set_index("arm").loc[arm, "step_lr"] else "constant",
         "test_accuracy": matrix[seed_].mean()}
        for arm, matrix in matrices.items() for seed_ in range(n_seeds)
    ])
    return design, _tidy(matrices), runs


def test_factorial_contrasts_equal_the_coded_regression_coefficients():
    import statsmodels.formula.api as smf

    design, correct, runs = _factorial_correct()
    result = stats.factorial_contrasts(correct, design, pool=False)  # the pooled error: the test below
    effects = result.effects.set_index("term")
    assert list(result.effects.columns) == stats.FACTORIAL_EFFECT_COLUMNS
    assert len(effects) == 15 and result.n_seeds == 3 and result.seeds_dropped == () and result.note is None
    assert list(effects["order"].value_counts().sort_index()) == [4, 6, 4, 1]
    assert effects.loc["augmentation", "kind"] == "main effect"
    assert effects.loc["augmentation:batch_norm:dropout:step_lr", "kind"] == "interaction"
    # Balanced: the contrast equals the OLS coefficient of the -0.5/+0.5 coded saturated model on run accuracies.
    coded = stats.factorial_design(runs, design)
    model = smf.ols("test_accuracy ~ augmentation * batch_norm * dropout * step_lr", data=coded).fit()
    for term in effects.index:
        assert effects.loc[term, "effect"] == pytest.approx(model.params[term], abs=1e-12), term
    # A main effect is "on minus off" averaged over the rest.
    on = runs[runs["augmentation"]]["test_accuracy"].mean()
    off = runs[~runs["augmentation"]]["test_accuracy"].mean()
    assert effects.loc["augmentation", "effect"] == pytest.approx(on - off)
    leading = effects[effects["holm_family"] == stats.LEADING_FAMILY]
    assert len(leading) == 10
    assert leading["p_value_holm"].to_numpy() == pytest.approx(stats.holm(leading["p_value"]))
    assert (effects["ci_low"] <= effects["effect"]).all() and (effects["effect"] <= effects["ci_high"]).all()


def test_factorial_contrasts_pool_the_seed_error_over_the_terms():
    design, correct, _ = _factorial_correct(n_seeds=2, n_images=400, seed=9)
    pooled = stats.factorial_contrasts(correct, design)
    separate = stats.factorial_contrasts(correct, design, pool=False)
    assert pooled.pooled and not separate.pooled and pooled.homogeneity_p_value >= stats.HOMOGENEITY_ALPHA
    # 15 orthogonal terms x (2 - 1) seed df, shared by every term; the estimates are the same.
    effects, own = pooled.effects.set_index("term"), separate.effects.set_index("term")
    assert effects["effect"].to_numpy() == pytest.approx(own["effect"].to_numpy())
    assert (own["df"] < 15.01).all() and (effects["df"] > own["df"] - 1e-9).all()
    # The pooled seed mean square, scaled by each term's sum of squared weights (1/4 for a main effect, 1 for a
    # two-way interaction, ...), is the mean of the terms' scaled mean squares: by hand from the per-term fits.
    array = stats.correctness_array(correct)
    codes = np.where(design.set_index("arm").loc[list(array.arms)].to_numpy(), 1.0, -1.0)
    scaled, weights_of = [], {}
    for order in range(1, 5):
        for term in itertools.combinations(range(4), order):
            weights = codes[:, term].prod(axis=1) * 2.0 ** order / 16
            estimate = stats.crossed_contrast(array.correct.astype(float), weights)
            scaled.append(estimate.seed_mean_variance / (weights @ weights))
            weights_of[":".join(COMPONENTS[c] for c in term)] = weights @ weights
    pooled_ms = np.mean(scaled)
    # seed_error**2 = max(pooled, the term's within-run floor) / 2 seeds: never below the pooled value.
    ratio = np.array([row["seed_error"] ** 2 * 2 / (pooled_ms * weights_of[term]) for term, row in effects.iterrows()])
    assert (ratio >= 1 - 1e-9).all() and np.isclose(ratio, 1).any()
    # A term whose seed-to-seed variation is far above the others' fails the homogeneity check: no pooling.
    shifted = correct.copy()
    on = design.set_index("arm")["augmentation"]
    shifted_arms = set(on[on].index)
    flip = shifted["arm"].isin(shifted_arms) & (shifted["seed"] == 0) & (shifted["image"] < 120)
    shifted.loc[flip, "correct"] = False
    heterogeneous = stats.factorial_contrasts(shifted, design)
    assert not heterogeneous.pooled and heterogeneous.homogeneity_p_value < stats.HOMOGENEITY_ALPHA
    assert "not homogeneous" in heterogeneous.note


def test_factorial_contrasts_drop_seeds_without_every_cell_and_say_so():
    design, correct, _ = _factorial_correct()
    incomplete = correct[~((correct["arm"] == "cell5") & (correct["seed"] == 2))]
    result = stats.factorial_contrasts(incomplete, design)
    assert result.n_seeds == 2 and result.seeds_dropped == (2,)
    assert "1 seed(s) lack at least one of the 16 cells" in result.note and "[2]" in result.note
    assert (result.effects["n_seeds"] == 2).all()


def test_factorial_contrasts_refuse_an_incomplete_design():
    design, correct, _ = _factorial_correct()
    with pytest.raises(ValueError, match="cells without an arm"):
        stats.factorial_contrasts(correct[correct["arm"] != "cell0"], design[design["arm"] != "cell0"])
    with pytest.raises(ValueError, match=r"arm\(s\) \['cell3'\] have results but no row in the design frame"):
        stats.factorial_contrasts(correct, design[design["arm"] != "cell3"])
    # The -0.5/+0.5 coding of factorial_design works as well as booleans.
    coded = design.assign(**{c: np.where(design[c], 0.5, -0.5) for c in COMPONENTS})
    assert stats.factorial_contrasts(correct, coded).effects["effect"].to_numpy() == pytest.approx(
        stats.factorial_contrasts(correct, design).effects["effect"].to_numpy())


def test_factorial_block_ols_has_seed_blocks_the_saturated_model_and_warns_when_unbalanced():
    design, correct, runs = _factorial_correct()
    balanced = stats.factorial_block_ols(runs, design)
    assert balanced.warning is None and balanced.n_runs == 48
    effects = balanced.effects.set_index("term")
    assert len(effects) == 15 and (effects["df"] == 15 * 2).all()  # (cells - 1) x (seeds - 1)
    contrasts = stats.factorial_contrasts(correct, design).effects.set_index("term")
    assert effects["effect"].to_numpy() == pytest.approx(contrasts.loc[effects.index, "effect"].to_numpy())
    anova = balanced.anova.set_index("term")
    assert "C(seed)" in anova.index and "augmentation:batch_norm:dropout:step_lr" in anova.index
    assert anova.loc["Residual", "df"] == 30
    unbalanced = stats.factorial_block_ols(runs.drop(index=runs.index[5]).assign(
        test_accuracy=lambda f: f["test_accuracy"].where(f.index != 7)), design)
    assert "1 run(s) without a test accuracy" in unbalanced.warning
    assert "unbalanced" in unbalanced.warning and "types I/II/III disagree" in unbalanced.warning
    with pytest.raises(ValueError, match="at least two seeds"):
        stats.factorial_block_ols(runs[runs["seed"] == 0], design)


def test_mean_curves_bands_respect_the_metric_range():
    histories = pd.DataFrame({
        "arm": ["a"] * 4, "seed": [0, 1, 0, 1], "epoch": [0, 0, 1, 1],
        "val_accuracy": [0.999, 0.95, 0.999, 0.998], "val_loss": [0.001, 0.2, 0.003, 0.004],
    })
    accuracy = stats.mean_curves(histories, "val_accuracy")
    loss = stats.mean_curves(histories, "val_loss")
    assert (accuracy["ci_high"] <= 1).all() and (accuracy["ci_low"] >= 0).all()
    assert (loss["ci_low"] >= 0).all() and loss["ci_high"].iloc[0] > 0.2


def test_correct_frame_from_runs_and_their_correctness_vectors():
    runs = pd.DataFrame({"arm": ["baseline", "baseline", "arm"], "seed": [0, 1, 0], "run_id": ["b0", "b1", "a0"]})
    vectors = {"b0": [True, True, False], "b1": [True, False, True], "a0": [False, True, True], "x": [True]}
    frame = stats.correct_frame(runs, vectors)
    assert list(frame.columns) == ["arm", "seed", "image", "correct"] and len(frame) == 9
    assert frame[(frame["arm"] == "baseline") & (frame["seed"] == 1)]["correct"].tolist() == [True, False, True]
    assert stats.accuracy_table(frame).set_index("arm").loc["arm", "test_accuracy_mean"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="no per-image results for 1 run"):
        stats.correct_frame(runs.assign(run_id=["b0", "b1", "zz"]), vectors)
    with pytest.raises(ValueError, match="different numbers of test images"):
        stats.correct_frame(runs, {**vectors, "a0": [True, False]})


def test_an_arm_identical_to_the_baseline_has_zero_width_and_no_test():
    rng = np.random.default_rng(8)
    baseline = rng.random((4, 200)) < 0.9
    row = stats.compare_to_baseline(_tidy({"baseline": baseline, "same": baseline})).iloc[0]
    assert row["delta"] == 0 and row["delta_ci_low"] == 0 and row["delta_ci_high"] == 0
    assert row["ci_width_floor"] == 0 and row["mde"] == 0 and row["seeds_needed"] == math.inf
    for column in ("p_value", "p_value_holm", "equivalence_p_value", "wilcoxon_p_value", "effect_size"):
        assert math.isnan(row[column]), column  # a test divides by a spread that is not there
    # A zero-width interval never counts as "target width reached" (issue 21): nothing was measured.
    same = stats.crossed_contrast(baseline.astype(np.int8) - baseline)
    assert stats.precision_stop_reason(same, 4, 0.001, 10) != stats.TARGET_REACHED


def test_an_arm_without_a_seed_in_common_gets_an_unpaired_comparison():
    rng = np.random.default_rng(21)
    baseline, arm = rng.random((3, 500)) < 0.9, rng.random((3, 500)) < 0.8
    frame = _tidy({"baseline": baseline, "other": arm})
    frame.loc[frame["arm"] == "other", "seed"] += 10  # seeds 10-12: none in common with the baseline
    row = stats.compare_to_baseline(frame).iloc[0]
    assert row["comparison"] == stats.UNPAIRED and row["n_pairs"] == 0
    assert row["delta"] == pytest.approx(arm.mean() - baseline.mean())
    assert row["delta_ci_low"] < row["delta"] < row["delta_ci_high"] and 0 <= row["p_value"] <= 1
    assert math.isnan(row["p_value_this_test_set"]) and math.isnan(row["seeds_needed"])
    # By hand: each arm's floored seed term over its seeds, plus the images' part of the per-image difference.
    unpaired = stats.unpaired_contrast(arm, baseline)
    own = [stats.crossed_contrast(m.astype(float)) for m in (arm, baseline)]
    difference = arm.mean(axis=0) - baseline.mean(axis=0)
    image = max(difference.var(ddof=1) - sum(e.residual_variance / 3 for e in own), 0.0)
    assert unpaired.standard_error ** 2 == pytest.approx(
        sum(e.seed_term_variance / 3 for e in own) + image / 500)
    paired = stats.compare_to_baseline(_tidy({"baseline": baseline, "other": arm})).iloc[0]
    assert paired["comparison"] == stats.PAIRED


def test_planning_is_for_the_stated_smallest_effect_not_the_observed_one():
    rng = np.random.default_rng(22)
    frame = _tidy({"baseline": rng.random((3, 2000)) < 0.95, "arm": rng.random((3, 2000)) < 0.95})
    small = stats.compare_to_baseline(frame, smallest_effect=0.002).iloc[0]
    large = stats.compare_to_baseline(frame, smallest_effect=0.02).iloc[0]
    assert small["smallest_effect"] == 0.002 and large["smallest_effect"] == 0.02
    assert small["seeds_needed"] >= large["seeds_needed"]  # the observed delta plays no part
    default = stats.compare_to_baseline(frame, equivalence_margin=0.004).iloc[0]
    assert default["smallest_effect"] == 0.004
    estimate = stats.contrasts_to_baseline(frame)["arm"]
    needed = large["seeds_needed"]
    if math.isfinite(needed) and needed > 2:
        assert estimate.power_at(0.02, needed, 0.05) >= 0.8 > estimate.power_at(0.02, needed - 1, 0.05)
    with pytest.raises(ValueError, match="smallest effect 2"):
        stats.compare_to_baseline(frame, smallest_effect=2)


def test_per_seed_differences_show_every_paired_seed():
    baseline = _counts_matrix([45, 46, 44], 50)
    arm = _counts_matrix([47, 30, 44], 50)  # seed 1 is bad
    per_seed = stats.per_seed_differences(_tidy({"baseline": baseline, "arm": arm}))
    assert list(per_seed.columns) == ["arm", "seed", "delta"]
    assert per_seed["delta"].tolist() == pytest.approx([2 / 50, -16 / 50, 0.0])
    assert per_seed.loc[per_seed["delta"].idxmin(), "seed"] == 1


def test_pooling_leaves_out_terms_between_identical_cells():
    # The step LR schedule does nothing (its cells are the same run): its terms are exactly zero and carry no
    # seed variation, so they neither join the pool nor make the homogeneity check fail.
    design, correct, _ = _factorial_correct(n_seeds=2, n_images=400, seed=9)
    cells = design.set_index("arm")
    twin = {arm: cells.index[(cells[list(COMPONENTS[:3])] == cells.loc[arm, list(COMPONENTS[:3])]).all(axis=1)
                             & ~cells["step_lr"]][0] for arm in cells.index}
    copied = pd.concat([correct[correct["arm"] == twin[arm]].assign(arm=arm) for arm in cells.index],
                       ignore_index=True)
    result = stats.factorial_contrasts(copied, design)
    effects = result.effects.set_index("term")
    with_step = [term for term in effects.index if "step_lr" in term]
    assert result.pooled and result.pooled_terms == 7 and len(with_step) == 8
    assert (effects.loc[with_step, "effect"] == 0).all() and (effects.loc[with_step, "ci_low"] == 0).all()
    others = effects.drop(index=with_step)
    assert (others["df"] > 6).all()  # 7 x (2 - 1) pooled df and more from the images
