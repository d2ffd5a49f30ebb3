"""What a run logs, as the MLflow UI shows it, in a real headless Chromium.

One tiny real run (`python -m experiments.train --system-metrics`) against a real ``mlflow server``; Debian's
/usr/bin/chromium driven by Playwright loads the run page (its datasets), the logged model's page (the
run's final test_accuracy), the experiment's Models tab and the System metrics tab. Screenshots go to
tmp_path. MLflow 3.17 opens experiments in its GenAI view; ``?workflowType=machine_learning`` selects the
classic one.
"""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from helpers import command_env, run_module

CLASSIC_VIEW = "workflowType=machine_learning"
DATASET_NAMES = ("mnist-train", "mnist-validation", "mnist-test")
TIMEOUT_MS = 60_000


def close_assistant_panel(page) -> None:
    """MLflow 3.17 opens an assistant side panel that takes a third of the width; close it if it is there."""
    close = page.get_by_role("button", name="Close", exact=True)
    if close.count():
        close.first.click()


@pytest.mark.slow
def test_run_page_models_tab_and_system_metrics_read_right(mlflow_server, browser, tmp_path, data_dir):
    env = command_env(mlflow_server, data_dir, MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="1")
    result = run_module("experiments.train", "--epochs", "1", "--train-subset", "200", "--system-metrics",
                        "--experiment-name", "ui-check", "--tracking-uri", mlflow_server, env=env, cwd=tmp_path)
    run_id = result.stdout.split("MLflow run id:")[1].split()[0]
    run = MlflowClient(mlflow_server).get_run(run_id)
    experiment_id = run.info.experiment_id
    (output,) = run.outputs.model_outputs
    test_accuracy = repr(run.data.metrics["test_accuracy"])  # as the UI prints it: shortest round-trip digits

    # Wide: the Models tab's grid renders only the columns in view, and the metrics come after six others.
    page = browser.new_page(viewport={"width": 2400, "height": 1100})
    experiment = f"{mlflow_server}/#/experiments/{experiment_id}"

    # The run page: status, and the three datasets with their contexts (the drawer lists them all).
    page.goto(f"{experiment}/runs/{run_id}?{CLASSIC_VIEW}")
    page.get_by_text("mnist-train (").first.wait_for(timeout=TIMEOUT_MS)
    close_assistant_panel(page)
    page.screenshot(path=tmp_path / "run.png")
    page.get_by_text("mnist-train (").first.click()
    drawer = page.get_by_text("3 datasets used")
    drawer.wait_for(timeout=TIMEOUT_MS)
    page.screenshot(path=tmp_path / "datasets.png")
    body = page.inner_text("body")
    for name, context in zip(DATASET_NAMES, ("Training", "Validation", "Testing")):
        assert f"{name} (" in body and context in body
    assert "num images: 200" in body  # the training dataset's profile

    # The logged model's page: the run's final metrics, linked to their datasets; no system metrics.
    page.goto(f"{experiment}/models/{output.model_id}?{CLASSIC_VIEW}")
    row = page.get_by_role("row").filter(has_text="test_accuracy")
    row.first.wait_for(timeout=TIMEOUT_MS)
    page.screenshot(path=tmp_path / "model.png", full_page=True)
    assert test_accuracy in row.first.inner_text() and "mnist-test" in row.first.inner_text()
    assert "system/" not in page.inner_text("body")

    # The experiment's Models tab (classic view): the final test metrics are columns of the model's row.
    page.goto(f"{experiment}/models?{CLASSIC_VIEW}")
    page.get_by_role("columnheader", name="Source run").wait_for(timeout=TIMEOUT_MS)
    page.get_by_role("columnheader", name="test_accuracy").wait_for(timeout=TIMEOUT_MS)
    page.screenshot(path=tmp_path / "models_tab.png")
    page.get_by_text(test_accuracy, exact=True).first.wait_for(timeout=TIMEOUT_MS)

    # The System metrics tab: MLflow's charts of the run's system/* metrics.
    page.goto(f"{experiment}/runs/{run_id}/system-metrics?{CLASSIC_VIEW}")
    page.get_by_text("(system/cpu_utilization_percentage)").first.wait_for(timeout=TIMEOUT_MS)  # a drawn legend
    page.screenshot(path=tmp_path / "system_metrics.png")
    page.close()
