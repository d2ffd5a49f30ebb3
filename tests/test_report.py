"""End to end: a tiny real study, then ``python -m experiments.report`` on it, as a user runs them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from mnist_ablation import stats, store

REPO_ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _run(args: list[str], env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _study(tmp_path_factory, data_dir, seeds: int):
    root = tmp_path_factory.mktemp(f"study_{seeds}_seeds")
    uri = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    env = {**os.environ, "MNIST_DATA_DIR": str(data_dir), "MLFLOW_TRACKING_URI": uri, "TF_CPP_MIN_LOG_LEVEL": "2"}
    _run(["experiments.ablate", "--study", "leave-one-out", "--arms", "baseline,no_batch_norm", "--seeds",
          str(seeds), "--train-subset", "200", "--epochs", "1", "--no-report"], env)
    return root, uri, env


@pytest.fixture(scope="module")
def two_seed_study(tmp_path_factory, data_dir):
    return _study(tmp_path_factory, data_dir, seeds=2)


def _parent_run_id(uri: str) -> str:
    import mlflow

    from mnist_ablation import compare

    mlflow.set_tracking_uri(uri)
    return store.find_parent_run("leave-one-out").info.run_id


def test_report_command_writes_summary_page_and_parent_artifacts(two_seed_study):
    root, uri, env = two_seed_study
    output = root / "report"
    result = _run(["experiments.report", "--study", "leave-one-out", "--tracking-uri", uri, "--output",
                   str(output)], env)
    assert "report:" in result.stdout

    summary = pd.read_csv(output / "ablation_summary.csv")
    assert list(summary.columns[:len(stats.SUMMARY_COLUMNS)]) == stats.SUMMARY_COLUMNS
    assert list(summary["arm"]) == ["baseline", "no_batch_norm"]
    assert list(summary["n_seeds"]) == [2, 2]
    arm = summary.set_index("arm").loc["no_batch_norm"]
    assert arm["test_accuracy_ci_low"] <= arm["test_accuracy_mean"] <= arm["test_accuracy_ci_high"]
    assert arm["delta_ci_low"] <= arm["delta_vs_baseline"] <= arm["delta_ci_high"]
    assert 0 <= arm["p_value"] <= arm["p_value_holm"] <= 1  # one arm compared: Holm leaves p unchanged
    assert 0 <= arm["mcnemar_p_value"] <= 1
    assert arm["mcnemar_baseline_only_correct"] + arm["mcnemar_arm_only_correct"] > 0

    page = (output / "report.html").read_text()
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) >= 4  # test error, learning curves, confusion differences, wrong-for-the-arm examples
    assert "<link" not in page and "<script" not in page  # self-contained
    assert "Removing batch norm (arm no_batch_norm)" in page
    assert "python -m experiments.ablate" in page and "python -m experiments.report" in page
    markdown = (output / "report.md").read_text()
    assert "| arm |" in markdown and "figures/test_error.png" in markdown
    assert (output / "figures" / "worse_examples.png").stat().st_size > 0

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    parent = _parent_run_id(uri)
    logged = {a.path for a in client.list_artifacts(parent, "report")}
    assert {"report/ablation_summary.csv", "report/report.html", "report/report.md", "report/figures"} <= logged
    figures = {a.path for a in client.list_artifacts(parent, "report/figures")}
    assert "report/figures/test_error.png" in figures


def test_report_functions_return_dataframes(two_seed_study):
    import mnist_ablation

    _, uri, _ = two_seed_study
    summary = mnist_ablation.ablation_summary("leave-one-out", tracking_uri=uri)
    assert list(summary["arm"]) == ["baseline", "no_batch_norm"]
    curves = mnist_ablation.learning_curves("leave-one-out", tracking_uri=uri, threshold=0.5)
    assert set(curves["arm"]) == {"baseline", "no_batch_norm"} and (curves["best_epoch_mean"] == 1).all()


def test_one_seed_study_says_intervals_cannot_be_computed(tmp_path_factory, data_dir):
    root, uri, env = _study(tmp_path_factory, data_dir, seeds=1)
    output = root / "report"
    _run(["experiments.report", "--study", "leave-one-out", "--output", str(output), "--no-mlflow-log"], env)
    summary = pd.read_csv(output / "ablation_summary.csv")
    assert list(summary["n_seeds"]) == [1, 1]
    for column in ("test_accuracy_ci_low", "test_accuracy_ci_high", "delta_ci_low", "delta_ci_high", "p_value",
                   "p_value_holm"):
        assert summary[column].isna().all(), column
    assert summary["mcnemar_p_value"].notna().iloc[1]  # per-example test still works with one seed
    page = (output / "report.html").read_text()
    assert "confidence intervals and seed-level tests cannot be computed" in page
    assert "the confidence interval and the t-test cannot be computed" in page


def test_report_of_an_unknown_study_fails_clearly(two_seed_study):
    _, uri, env = two_seed_study
    result = subprocess.run([sys.executable, "-m", "experiments.report", "--study", "factorial", "--tracking-uri", uri],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "no study 'factorial'" in result.stderr and "experiments.ablate --study factorial" in result.stderr


def test_factorial_figure_and_tables_render():
    from test_stats import _factorial_runs

    from mnist_ablation import report

    effects, anova = stats.factorial_effects(_factorial_runs())
    png = report._figure_png(report.factorial_figure(effects, 0.95))
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    table = report._html_table(report._round_frame(anova))
    assert "augmentation:batch_norm" in table and "Residual" in table
