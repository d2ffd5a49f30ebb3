"""Cells trained without a tracking store (``ablate --offline``), on any Keras backend, then imported."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from mnist_ablation import store
from mnist_ablation.config import BASELINE

from helpers import command_env, run_module

TINY = ["--study", "architecture", "--arms", "baseline", "--seeds", "1", "--epochs", "1", "--train-subset", "200"]


# -- the NumPy input pipeline (backends other than TensorFlow) ------------------------------------------

def test_numpy_batches_are_the_pixels_reshuffled_per_epoch_and_resumable(mnist):
    from mnist_ablation.train import AugmentedBatches

    images, labels = mnist.x_train[:100], mnist.y_train[:100]
    config = BASELINE.replace(augmentation=False, batch_size=32, epochs=3)
    batches = AugmentedBatches(config, images, labels)
    assert len(batches) == 3 * 4  # ceil(100 / 32) steps a run's every epoch
    epoch0 = np.concatenate([batches[i][1].argmax(1) for i in range(4)])
    epoch1 = np.concatenate([batches[i][1].argmax(1) for i in range(4, 8)])
    assert sorted(epoch0) == sorted(labels) and not np.array_equal(epoch0, epoch1)
    x, y = batches[0]
    order = np.random.default_rng([config.seed, 0]).permutation(100)[:32]
    np.testing.assert_array_equal(x, images[order])  # without augmentation: the seed's pixels, bit for bit
    np.testing.assert_array_equal(y.argmax(1), labels[order])
    resumed = AugmentedBatches(config, images, labels, initial_epoch=1)
    assert len(resumed) == 2 * 4
    np.testing.assert_array_equal(resumed[0][0], batches[4][0])


def test_numpy_batches_augment_reproducibly(mnist):
    from mnist_ablation.train import AugmentedBatches

    images, labels = mnist.x_train[:64], mnist.y_train[:64]
    config = BASELINE.replace(epochs=1)
    first, again = AugmentedBatches(config, images, labels)[1], AugmentedBatches(config, images, labels)[1]
    np.testing.assert_array_equal(first[0], again[0])
    plain = AugmentedBatches(config.replace(augmentation=False), images, labels)[1]
    np.testing.assert_array_equal(first[1], plain[1])
    assert np.mean(np.abs(first[0] - plain[0])) > 0.01  # the same images, moved


# -- the commands ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_offline_cells_import_as_complete_study_runs(tmp_path, data_dir, tracking_uri, mnist):
    env = command_env(tracking_uri, data_dir)
    cells = tmp_path / "cells"
    trained = run_module("experiments.ablate", *TINY, "--offline", str(cells), env=env)
    assert "1 cell(s) to train" in trained.stdout
    folder = cells / "baseline-seed0"
    record = json.loads((folder / "result.json").read_text())
    assert record["keras_backend"] == "tensorflow" and record["config"]["train_subset"] == 200
    assert record["environment"]["data"]["sha256"] and record["environment"]["git"]["commit"]
    # A folder left by a killed run is never mistaken for a finished cell; a rerun skips saved cells.
    shutil.copytree(folder, cells / "wide-seed0.partial")
    again = run_module("experiments.ablate", *TINY, "--offline", str(cells), env=env)
    assert "0 cell(s) to train, 1 already saved" in again.stdout

    imported = run_module("experiments.ablate", *TINY, "--import-offline", str(cells), "--no-report", env=env)
    assert "imported 1 cell(s)" in imported.stdout
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("ablation/architecture")
    runs = client.search_runs([experiment.experiment_id], "tags.`mnist_ablation.role` = 'cell'")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["trained_offline"] == "true" and run.data.tags["arm"] == "baseline"
    assert run.data.tags["config_hash"] == record["config_hash"]
    assert run.data.metrics["test_accuracy"] == pytest.approx(record["test_accuracy"])
    assert run.data.params["train_subset"] == "200"
    history = client.get_metric_history(run.info.run_id, "val_accuracy")
    assert [m.value for m in history] == pytest.approx(record["history"]["val_accuracy"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"predictions", "plots", "config.json", "environment.json"} <= artifacts
    from mnist_ablation import tracking

    tracking.use_tracking_uri(tracking_uri)
    predictions = store.read_predictions(run.info.run_id)
    saved = np.load(folder / "test_probabilities.npy")
    np.testing.assert_allclose(predictions[[f"prob_{k}" for k in range(10)]].to_numpy(), saved, atol=1e-6)
    import mlflow

    model = mlflow.keras.load_model(f"runs:/{run.info.run_id}/model")
    np.testing.assert_allclose(model.predict(mnist.x_test[:200], verbose=0), saved[:200], atol=1e-5)
    # Datasets from the record's checksums and source; the run's final metrics on the logged model.
    imported_run = client.get_run(run.info.run_id)
    assert {d.dataset.name for d in imported_run.inputs.dataset_inputs} == {"mnist-train", "mnist-validation",
                                                                          "mnist-test"}
    (output,) = imported_run.outputs.model_outputs
    model_metrics = {m.key: m.value for m in mlflow.get_logged_model(output.model_id).metrics}
    assert model_metrics["test_accuracy"] == pytest.approx(record["test_accuracy"])
    assert model_metrics["val_accuracy"] == pytest.approx(record["history"]["val_accuracy"][-1])

    # Importing again adds nothing; the same folder does not match a study defined with other epochs.
    twice = run_module("experiments.ablate", *TINY, "--import-offline", str(cells), "--no-report", env=env)
    assert "imported 0 cell(s)" in twice.stdout and "1 already in the study" in twice.stdout
    other = [*TINY[:-4], "--epochs", "2", "--train-subset", "200"]
    mismatch = run_module("experiments.ablate", *other, "--import-offline", str(cells), "--no-report", env=env,
                          check=False)
    assert mismatch.returncode == 1 and "not a cell of this study" in mismatch.stderr


@pytest.mark.slow
def test_the_same_trainer_runs_on_the_jax_backend(tmp_path, data_dir, mnist):
    pytest.importorskip("jax")
    env = command_env("sqlite:///unused.db", data_dir, KERAS_BACKEND="jax")
    cells = tmp_path / "cells"
    run_module("experiments.ablate", *TINY, "--offline", str(cells), env=env)
    from mnist_ablation import offline

    result, record = offline.load_result(cells / "baseline-seed0")
    assert record["keras_backend"] == "jax" and record["environment"]["machine"]["keras_backend"] == "jax"
    assert len(result.history["loss"]) == 1 and np.isfinite(result.history["loss"][0])
    # The model trained on JAX loads here (TensorFlow) and predicts what JAX predicted.
    probabilities = result.model.predict(mnist.x_test[:500], batch_size=500, verbose=0)
    np.testing.assert_allclose(probabilities, result.test_probabilities[:500], atol=1e-4)
    assert result.model.count_params() == 469_578


@pytest.mark.slow
def test_offline_identical_arms_train_once_and_import_as_reusing_runs(tmp_path, data_dir, tracking_uri):
    env = command_env(tracking_uri, data_dir)
    cells = tmp_path / "cells"
    args = ["--arms", "baseline,constant_lr", "--seeds", "1", "--epochs", "1", "--train-subset", "200"]
    trained = run_module("experiments.ablate", *args, "--offline", str(cells), env=env)
    assert "1 cell(s) to train" in trained.stdout and "1 reuse an identical arm's cell" in trained.stdout
    assert [path.name for path in cells.iterdir() if not path.name.startswith(".")] == ["baseline-seed0"]
    imported = run_module("experiments.ablate", *args, "--import-offline", str(cells), "--no-report", env=env)
    assert "imported 2 cell(s)" in imported.stdout and "constant_lr-seed0: reuses baseline-seed0" in imported.stdout
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("ablation/leave-one-out")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id],
                                                          "tags.`mnist_ablation.role` = 'cell'")}
    assert set(runs) == {"baseline-seed0", "constant_lr-seed0"}
    assert runs["constant_lr-seed0"].data.tags["mnist_ablation.reuses_run"] == runs["baseline-seed0"].info.run_id
    assert runs["constant_lr-seed0"].info.status == "FINISHED"
    twice = run_module("experiments.ablate", *args, "--import-offline", str(cells), "--no-report", env=env)
    assert "imported 0 cell(s)" in twice.stdout
