"""MLflow 3 conventions: system metrics, the logged model (signature, input example, final metrics), datasets.

Real MLflow on temporary SQLite stores; commands run as subprocesses, as a user would run them.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from mnist_ablation import tracking
from mnist_ablation.config import TrainConfig
from mnist_ablation.data import build_split

from helpers import REPO_ROOT, command_env, run_module

TINY_RUN = ["--train-subset", "200", "--epochs", "2"]
PSUTIL_WARNING = "system metrics are off: MLflow needs psutil"
# Run a command with psutil hidden: `import psutil` fails and importlib.util.find_spec("psutil") is None.
WITHOUT_PSUTIL = ("import runpy, sys; sys.modules['psutil'] = None; "
                  "runpy.run_module(sys.argv.pop(1), run_name='__main__', alter_sys=True)")


def run_id_of(stdout: str) -> str:
    return stdout.split("MLflow run id:")[1].split()[0]


# -- datasets: digests from the checksums and the split, sizes without touching the pixels -------------

def test_dataset_digests_follow_the_data_and_the_split(mnist):
    def digests(config, checksums=mnist.checksums):
        sizes = tracking.split_sizes(config, len(mnist.y_train), len(mnist.y_test))
        return {name: d.digest for name, d in tracking.mnist_datasets(config, checksums, mnist.source, sizes).items()}

    base = digests(TrainConfig())
    assert set(base) == {"mnist-train", "mnist-validation", "mnist-test"} and len(set(base.values())) == 3
    assert digests(TrainConfig(seed=5, epochs=1, batch_norm=False)) == base  # the data, not the recipe

    subset = digests(TrainConfig(train_subset=200))
    assert subset["mnist-train"] != base["mnist-train"]
    assert (subset["mnist-validation"], subset["mnist-test"]) == (base["mnist-validation"], base["mnist-test"])

    other_split = digests(TrainConfig(split_seed=1))
    assert other_split["mnist-train"] != base["mnist-train"]
    assert other_split["mnist-validation"] != base["mnist-validation"]
    assert other_split["mnist-test"] == base["mnist-test"]

    seed_protocol = digests(TrainConfig(validation="test"))
    assert seed_protocol["mnist-validation"] != base["mnist-validation"]
    assert seed_protocol["mnist-train"] != base["mnist-train"]

    altered = {**mnist.checksums, "t10k-labels-idx1-ubyte": "0" * 64}
    assert set(digests(TrainConfig(), altered).values()).isdisjoint(base.values())


@pytest.mark.parametrize("config", [TrainConfig(), TrainConfig(train_subset=200), TrainConfig(validation="test"),
                                    TrainConfig(validation="test", train_subset=300),
                                    TrainConfig(validation_size=1000)])
def test_dataset_sizes_match_the_split_the_trainer_builds(mnist, config):
    split = build_split(mnist, config.validation, config.validation_size, config.split_seed, config.train_subset)
    sizes = tracking.split_sizes(config, len(mnist.y_train), len(mnist.y_test))
    assert sizes == {"mnist-train": len(split.y_train), "mnist-validation": len(split.y_val),
                     "mnist-test": len(split.y_test)}


def test_dataset_source_is_the_data_directory_or_keras_download(data_dir):
    local = tracking.dataset_source(str(data_dir))
    assert local._get_source_type() == "local" and json.loads(local.to_json())["uri"] == str(data_dir)
    keras_download = tracking.dataset_source("keras-download")
    assert keras_download._get_source_type() == "http"
    assert json.loads(keras_download.to_json())["url"] == tracking.KERAS_MNIST_URL


# -- system metrics: MLflow's switch with and without psutil ---------------------------------------------

def test_the_epoch_logger_is_a_keras_callback_made_on_first_use():
    # tracking imports no Keras (doctor, report and ensemble import tracking); its callback class comes on first use.
    import keras

    logger_class = tracking.MlflowEpochLogger
    assert issubclass(logger_class, keras.callbacks.Callback) and logger_class.__name__ == "MlflowEpochLogger"
    assert tracking.MlflowEpochLogger is logger_class  # made once
    with pytest.raises(AttributeError, match="no attribute 'EpochLogger'"):
        tracking.EpochLogger  # noqa: B018 - the module's __getattr__ must refuse other names


def test_missing_psutil_is_one_warning_and_no_system_metrics(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "psutil", None)
    monkeypatch.setattr(tracking, "_warned", set())
    with caplog.at_level(logging.WARNING, logger=tracking.__name__):
        assert tracking.system_metrics_available() is False
        assert tracking.system_metrics_available() is False
    warnings = [r.getMessage() for r in caplog.records if PSUTIL_WARNING in r.getMessage()]
    assert len(warnings) == 1 and "pip install psutil" in warnings[0] and "\n" not in warnings[0]


def test_system_metrics_flag_sets_mlflows_switch(monkeypatch):
    from experiments.cli import apply_tracking_arguments
    from experiments.train import parse_args

    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")  # restored after the test
    apply_tracking_arguments(parse_args([]))
    assert not tracking.system_metrics_requested()
    apply_tracking_arguments(parse_args(["--system-metrics"]))
    assert tracking.system_metrics_requested()
    for module in ("experiments.ablate", "experiments.tune"):
        parser_module = __import__(module, fromlist=["parse_args"])
        assert parser_module.parse_args(["--system-metrics"]).system_metrics is True


@pytest.mark.slow
def test_switch_on_without_psutil_warns_once_and_the_run_finishes(tmp_path, tracking_uri, data_dir):
    env = command_env(tracking_uri, data_dir, MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING="true")
    result = subprocess.run([sys.executable, "-c", WITHOUT_PSUTIL, "experiments.train", "--train-subset", "200",
                             "--epochs", "1"], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    warning_lines = [line for line in result.stderr.splitlines() if PSUTIL_WARNING in line]
    assert len(warning_lines) == 1, result.stderr[-3000:]
    run = MlflowClient().get_run(run_id_of(result.stdout))
    assert run.info.status == "FINISHED" and "test_accuracy" in run.data.metrics
    assert not [key for key in run.data.metrics if key.startswith("system/")]


# -- one real run: system metrics, datasets, the logged model and its metrics --------------------------

@pytest.mark.slow
def test_train_command_follows_mlflow3_conventions(tmp_path, tracking_uri, data_dir, mnist):
    env = command_env(tracking_uri, data_dir, MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="1")
    result = run_module("experiments.train", *TINY_RUN, "--system-metrics", env=env, cwd=tmp_path)
    run_id = run_id_of(result.stdout)
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"

    # System metrics, sampled every second by MLflow's monitor.
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics)

    # Datasets: train, validation and test, with their contexts, sizes and the data directory as source.
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"mnist-train", "mnist-validation", "mnist-test"}
    contexts = {name: {t.key: t.value for t in d.tags}["mlflow.data.context"] for name, d in inputs.items()}
    assert contexts == {"mnist-train": "training", "mnist-validation": "validation", "mnist-test": "testing"}
    profiles = {name: json.loads(d.dataset.profile) for name, d in inputs.items()}
    assert {name: p["num_images"] for name, p in profiles.items()} == {
        "mnist-train": 200, "mnist-validation": 5000, "mnist-test": 10_000}
    assert profiles["mnist-train"]["train_subset"] == 200 and profiles["mnist-train"]["image_shape"] == [28, 28, 1]
    for dataset_input in inputs.values():
        assert dataset_input.dataset.source_type == "local"
        assert json.loads(dataset_input.dataset.source)["uri"] == str(data_dir)
        assert "mlflow_tensorspec" in json.loads(dataset_input.dataset.schema)
    assert len({d.dataset.digest for d in inputs.values()}) == 3

    # The logged model: signature, a real MNIST input example, and the run's final metrics.
    (output,) = run.outputs.model_outputs
    logged_model = mlflow.get_logged_model(output.model_id)
    assert logged_model.source_run_id == run_id and logged_model.params["train_subset"] == "200"
    model_metrics = {m.key: m for m in logged_model.metrics}
    assert not [key for key in model_metrics if key.startswith("system/")]
    assert len(logged_model.metrics) == len(model_metrics)  # one value per metric: no epoch-0 copies
    for key in ("test_accuracy", "test_loss", "train_seconds", "train_images_per_second"):
        assert model_metrics[key].value == pytest.approx(run.data.metrics[key])
    for key in ("val_accuracy", "val_loss", "loss", "accuracy"):
        history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        assert [m.step for m in history] == [0, 1], key  # linking added no duplicate points
        assert model_metrics[key].step == 1 and model_metrics[key].value == pytest.approx(history[-1].value)
    first_epoch_val = client.get_metric_history(run_id, "val_accuracy")[0].value
    assert model_metrics["val_accuracy"].value != first_epoch_val
    assert (model_metrics["test_accuracy"].dataset_name, model_metrics["val_accuracy"].dataset_name,
            model_metrics["loss"].dataset_name) == ("mnist-test", "mnist-validation", "mnist-train")
    assert model_metrics["test_accuracy"].dataset_digest == inputs["mnist-test"].dataset.digest
    assert model_metrics["train_seconds"].dataset_name is None

    model_uri = f"runs:/{run_id}/model"
    mlflow_model = mlflow.models.Model.load(model_uri)
    (image_spec,) = mlflow_model.signature.inputs.inputs
    assert (image_spec.type, image_spec.shape) == (np.dtype(np.float32), (-1, 28, 28, 1))
    example = mlflow_model.load_input_example(mlflow.artifacts.download_artifacts(model_uri))
    assert example.dtype == np.float32 and example.shape == (1, 28, 28, 1)
    np.testing.assert_array_equal(example, mnist.x_test[:1])
    probabilities = mlflow.keras.load_model(model_uri).predict(example, verbose=0)
    assert probabilities.shape == (1, 10) and probabilities.sum() == pytest.approx(1.0, abs=1e-4)
