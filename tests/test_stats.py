"""Statistics of the ablation report against independent calculations on fixed inputs."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pandas as pd
import pytest

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


def test_paired_comparison_matches_hand_computation():
    baseline = [0.990, 0.992, 0.991, 0.989]
    arm = [0.985, 0.990, 0.987, 0.983]  # differences -0.005, -0.002, -0.004, -0.006
    differences = [a - b for a, b in zip(arm, baseline)]
    mean, sd = statistics.mean(differences), statistics.stdev(differences)
    standard_error = sd / math.sqrt(4)
    t = mean / standard_error
    # Closed-form CDF of Student's t with 3 degrees of freedom.
    x = abs(t) / math.sqrt(3)
    cdf = 0.5 + (x / (1 + x * x) + math.atan(x)) / math.pi
    result = stats.paired_comparison(baseline, arm)
    assert result.n_pairs == 4
    assert result.mean_difference == pytest.approx(-0.00425)
    assert result.ci_low == pytest.approx(mean - T_975[3] * standard_error)
    assert result.ci_high == pytest.approx(mean + T_975[3] * standard_error)
    assert result.t_statistic == pytest.approx(t)
    assert result.p_value == pytest.approx(2 * (1 - cdf))
    assert result.effect_size == pytest.approx(mean / sd)
    # All four differences negative and distinct: exact signed-rank p = 2 / 2**4.
    assert result.wilcoxon_p_value == pytest.approx(0.125)


def test_paired_comparison_needs_two_pairs_and_some_spread():
    single = stats.paired_comparison([0.99], [0.98])
    assert single.mean_difference == pytest.approx(-0.01)
    assert all(math.isnan(v) for v in (single.ci_low, single.ci_high, single.p_value, single.effect_size))
    identical = stats.paired_comparison([0.9, 0.8], [0.9, 0.8])
    assert identical.mean_difference == 0 and math.isnan(identical.p_value)
    with pytest.raises(ValueError, match="one baseline value per arm value"):
        stats.paired_comparison([0.9, 0.8], [0.9])


def test_mcnemar_exact_is_a_binomial_test_on_the_discordant_pairs():
    # 3 vs 12 discordant: p = 2 * P(X <= 3), X ~ Binomial(15, 1/2).
    expected = 2 * sum(math.comb(15, k) for k in range(4)) / 2 ** 15
    assert stats.mcnemar_exact(3, 12) == pytest.approx(expected)
    assert stats.mcnemar_exact(12, 3) == pytest.approx(expected)
    assert stats.mcnemar_exact(0, 0) == 1.0


def _correct_vectors(both: int, baseline_only: int, arm_only: int, neither: int):
    baseline = [True] * both + [True] * baseline_only + [False] * arm_only + [False] * neither
    arm = [True] * both + [False] * baseline_only + [True] * arm_only + [False] * neither
    return np.array(baseline), np.array(arm)


def test_pooled_mcnemar_sums_discordant_counts_over_seeds():
    seed0 = _correct_vectors(50, 1, 5, 4)
    seed1 = _correct_vectors(48, 2, 7, 3)
    result = stats.pooled_mcnemar([seed0, seed1])
    assert (result.baseline_only_correct, result.arm_only_correct) == (3, 12)
    assert result.p_value == pytest.approx(stats.mcnemar_exact(3, 12))


def test_holm_on_known_p_values():
    # Sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> monotone 0.02, 0.03, 0.06, 0.06.
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    adjusted = stats.holm([0.01, np.nan, 0.04])
    assert adjusted[0] == pytest.approx(0.02) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.04)


def _runs(rows):
    return pd.DataFrame(rows, columns=["arm", "seed", "run_id", "status", "test_accuracy"])


def test_ablation_table_columns_pairing_holm_and_failed_arm():
    runs = _runs([
        ("baseline", 0, "b0", "FINISHED", 0.990), ("baseline", 1, "b1", "FINISHED", 0.992),
        ("baseline", 2, "b2", "FINISHED", 0.991),
        ("no_bn", 0, "n0", "FINISHED", 0.985), ("no_bn", 1, "n1", "FINISHED", 0.990),
        ("no_bn", 2, "n2", "FAILED", np.nan),
        ("no_aug", 0, "a0", "FINISHED", 0.991), ("no_aug", 1, "a1", "FINISHED", 0.991),
        ("no_aug", 2, "a2", "FINISHED", 0.993),
        ("broken", 0, "x0", "FAILED", np.nan), ("broken", 1, "x1", "KILLED", np.nan),
    ])
    table = stats.ablation_table(runs)
    assert list(table.columns[:len(stats.SUMMARY_COLUMNS)]) == stats.SUMMARY_COLUMNS
    assert list(table["arm"]) == ["baseline", "no_bn", "no_aug", "broken"]
    rows = table.set_index("arm")
    assert rows.loc["baseline", "delta_vs_baseline"] == 0
    # no_bn pairs seeds 0 and 1 only (its seed 2 failed): differences -0.005, -0.002.
    assert rows.loc["no_bn", "n_seeds"] == 2 and rows.loc["no_bn", "n_failed"] == 1
    assert rows.loc["no_bn", "delta_vs_baseline"] == pytest.approx(-0.0035)
    half_width = T_975[1] * statistics.stdev([-0.005, -0.002]) / math.sqrt(2)
    assert rows.loc["no_bn", "delta_ci_low"] == pytest.approx(-0.0035 - half_width)
    assert "1 seed(s) failed" in rows.loc["no_bn", "status"]
    # Holm over the two arms with a p-value; the failed arm does not count.
    p = rows.loc[["no_bn", "no_aug"], "p_value"].to_numpy()
    assert rows.loc[["no_bn", "no_aug"], "p_value_holm"].to_numpy() == pytest.approx(stats.holm(p))
    assert np.all(rows.loc[["no_bn", "no_aug"], "p_value_holm"].to_numpy() >= p)
    assert rows.loc["broken", "n_seeds"] == 0 and rows.loc["broken", "n_failed"] == 2
    assert rows.loc["broken", "status"] == "failed"
    assert math.isnan(rows.loc["broken", "test_accuracy_mean"]) and math.isnan(rows.loc["broken", "p_value"])


def test_ablation_table_with_one_seed_reports_no_intervals():
    runs = _runs([("baseline", 0, "b0", "FINISHED", 0.99), ("no_bn", 0, "n0", "FINISHED", 0.98)])
    correct = {"b0": _correct_vectors(90, 6, 2, 2)[0], "n0": _correct_vectors(90, 6, 2, 2)[1]}
    table = stats.ablation_table(runs, correct).set_index("arm")
    for column in ("test_accuracy_ci_low", "test_accuracy_ci_high", "delta_ci_low", "delta_ci_high", "p_value",
                   "p_value_holm"):
        assert table[column].isna().all(), column
    assert table.loc["no_bn", "delta_vs_baseline"] == pytest.approx(-0.01)
    # McNemar works on one seed's per-example predictions.
    assert table.loc["no_bn", "mcnemar_p_value"] == pytest.approx(stats.mcnemar_exact(6, 2))
    assert "no intervals" in table.loc["no_bn", "status"]


def _factorial_runs():
    rows = []
    for index, (a, b, c, d) in enumerate(np.ndindex(2, 2, 2, 2)):
        for replicate, noise in enumerate((0.001, -0.001)):
            rows.append({
                "arm": f"cell{index}", "seed": replicate, "augmentation": bool(a), "batch_norm": bool(b),
                "dropout": bool(c), "lr_schedule": "step" if d else "constant",
                "test_accuracy": 0.98 + 0.01 * a + 0.004 * b - 0.002 * a * b + noise,
            })
    return pd.DataFrame(rows)


def test_factorial_effects_recover_main_effects_and_interaction():
    effects, anova = stats.factorial_effects(_factorial_runs())
    effects = effects.set_index("term")
    assert len(effects) == 10
    # On minus off, averaged over batch norm: 0.01 - 0.002 / 2; batch norm: 0.004 - 0.002 / 2.
    assert effects.loc["augmentation", "effect"] == pytest.approx(0.009)
    assert effects.loc["batch_norm", "effect"] == pytest.approx(0.003)
    assert effects.loc["augmentation:batch_norm", "effect"] == pytest.approx(-0.002)
    assert effects.loc["dropout", "effect"] == pytest.approx(0, abs=1e-12)
    # Residuals are the +-0.001 noise: 32 runs, 11 coefficients, sigma^2 = 32e-6 / 21.
    sigma2 = 32e-6 / 21
    main_se, interaction_se = math.sqrt(sigma2 / 8), math.sqrt(sigma2 / 2)
    assert effects.loc["augmentation", "std_error"] == pytest.approx(main_se)
    assert effects.loc["augmentation", "ci_low"] == pytest.approx(0.009 - T_975[21] * main_se)
    assert effects.loc["augmentation:batch_norm", "ci_high"] == pytest.approx(-0.002 + T_975[21] * interaction_se)
    assert effects.loc["augmentation", "kind"] == "main effect"
    sums = anova.set_index("term")["sum_sq"]
    assert sums["augmentation"] == pytest.approx(8 * 0.009 ** 2)
    assert sums["Residual"] == pytest.approx(32e-6)


def test_factorial_effects_refuse_an_incomplete_design():
    runs = _factorial_runs()
    with pytest.raises(ValueError, match="never vary"):
        stats.factorial_effects(runs[runs["dropout"]])


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
