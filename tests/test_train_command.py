"""`python -m experiments.train` end to end into a temporary MLflow store, and the trainer's guarantees."""

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from mnist_ablation.config import BASELINE, FIELD_NAMES, TrainConfig, from_dict
from mnist_ablation.train import TrainingDiverged, train

from helpers import command_env, run_module

EPOCH_METRICS = {"loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "epoch_seconds"}


@pytest.mark.slow
def test_train_command_logs_everything(tmp_path, tracking_uri, data_dir):
    result = run_module("experiments.train", "--train-subset", "300", "--epochs", "2", "--seed", "3",
                        "--set", "dense_units=64", env=command_env(tracking_uri, data_dir), cwd=tmp_path)
    assert "Epoch 2/2" in result.stdout and "test accuracy:" in result.stdout
    run_id = result.stdout.split("MLflow run id:")[1].split()[0]
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert set(FIELD_NAMES) <= set(params)
    assert (params["seed"], params["epochs"], params["train_subset"], params["dense_units"]) == ("3", "2", "300", "64")
    for key in EPOCH_METRICS:
        history = client.get_metric_history(run_id, key)
        assert sorted(m.step for m in history) == [0, 1], key
    metrics = run.data.metrics
    assert {"test_loss", "test_accuracy", "train_seconds", "train_images_per_second"} <= set(metrics)
    assert 0.1 < metrics["test_accuracy"] <= 1.0 and metrics["train_images_per_second"] > 0

    artifacts = {a.path for a in client.list_artifacts(run_id)} | {
        a.path for d in ("plots", "predictions") for a in client.list_artifacts(run_id, d)}
    assert {"config.json", "environment.json", "plots/training_curves.png", "plots/confusion_matrix.png",
            "predictions/test_predictions.parquet"} <= artifacts

    config = from_dict(json.loads(Path(mlflow.artifacts.download_artifacts(run_id=run_id,
                                                                          artifact_path="config.json")).read_text()))
    assert config == TrainConfig(seed=3, epochs=2, train_subset=300, dense_units=64)
    environment = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=run_id,
                                                                      artifact_path="environment.json")).read_text())
    assert len(environment["git"]["commit"]) in (40, len("unknown"))
    assert environment["data"]["sha256"]["train-images-idx3-ubyte"].startswith("ba891046")
    assert {"tensorflow", "keras", "mlflow"} <= set(environment["packages"])

    predictions = pd.read_parquet(mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="predictions/test_predictions.parquet"))
    assert len(predictions) == 10_000
    probabilities = predictions[[f"prob_{k}" for k in range(10)]].to_numpy()
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)
    assert np.mean(probabilities.argmax(1) == predictions["label"]) == pytest.approx(metrics["test_accuracy"])

    model = mlflow.keras.load_model(f"runs:/{run_id}/model")
    from mnist_ablation.data import load_mnist

    images = load_mnist(data_dir).x_test[:64]
    assert np.allclose(model.predict(images, verbose=0), probabilities[:64], atol=1e-4)


def test_bad_config_fails_before_any_run(tmp_path, tracking_uri, data_dir):
    result = run_module("experiments.train", "--set", "conv_dropout_rate=1.5", env=command_env(tracking_uri, data_dir),
                        cwd=tmp_path, check=False)
    assert result.returncode == 2
    assert "conv_dropout_rate=1.5 is invalid" in result.stderr and "Traceback" not in result.stderr
    store_file = tmp_path / "store" / "mlflow.db"
    assert not store_file.exists() or not mlflow.search_runs(search_all_experiments=True).shape[0]


@pytest.mark.slow
def test_same_seed_same_result(mnist):
    config = TrainConfig(epochs=1, train_subset=200)
    first = train(config, mnist, verbose=0)
    second = train(config, mnist, verbose=0)
    assert np.array_equal(first.test_probabilities, second.test_probabilities)
    other_seed = train(config.replace(seed=1), mnist, verbose=0)
    assert not np.array_equal(first.test_probabilities, other_seed.test_probabilities)


@pytest.mark.slow
def test_seed_protocol_validates_on_the_test_set(mnist):
    result = train(TrainConfig(epochs=1, train_subset=200, validation="test"), mnist, verbose=0)
    assert result.history["val_accuracy"][-1] == pytest.approx(result.test_accuracy, abs=1e-6)


@pytest.mark.slow
def test_divergence_raises_with_a_reason(mnist):
    with pytest.raises(TrainingDiverged, match="diverged.*learning_rate 10"):
        train(TrainConfig(epochs=2, train_subset=300, learning_rate=10.0), mnist, verbose=0)


@pytest.mark.slow
def test_failed_run_is_marked_failed_not_finished(tracking_uri, mnist):
    from mnist_ablation import tracking

    with pytest.raises(TrainingDiverged):
        tracking.run_training(TrainConfig(epochs=2, train_subset=300, learning_rate=10.0), mnist, verbose=0)
    runs = mlflow.search_runs(search_all_experiments=True)
    assert list(runs["status"]) == ["FAILED"]
    assert "diverged" in runs["tags.failure_reason"].iloc[0]


@pytest.mark.slow
def test_checkpoint_resume_continues_the_same_run(tmp_path, mnist):
    """A run stopped after epoch 1 continues from its checkpoint with the same history and data stream.

    Dropout's random state is not part of a Keras checkpoint, so after the resume the run matches
    an uninterrupted one statistically, not bit for bit (the README says so).
    """
    import keras

    config = TrainConfig(epochs=2, train_subset=200)
    whole = train(config, mnist, verbose=0)

    class StopAfterFirstEpoch(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config, mnist, callbacks=[StopAfterFirstEpoch()], checkpoint_dir=tmp_path / "ckpt", verbose=0)
    resumed = train(config, mnist, checkpoint_dir=tmp_path / "ckpt", verbose=0)
    assert resumed.initial_epoch == 1
    assert len(resumed.history["val_accuracy"]) == 2
    assert resumed.history["loss"][0] == pytest.approx(whole.history["loss"][0], rel=1e-5)
    assert resumed.history["loss"][1] == pytest.approx(whole.history["loss"][1], rel=0.25)
    assert abs(resumed.test_accuracy - whole.test_accuracy) < 0.1
    assert not (tmp_path / "ckpt" / "model.tmp.keras").exists()


def test_a_checkpoint_of_another_config_is_ignored_loudly(tmp_path, caplog):
    import json

    from mnist_ablation.train import load_checkpoint

    (tmp_path / "state.json").write_text(json.dumps({"config_hash": "0123456789abcdef", "epochs_completed": 2}))
    with caplog.at_level("WARNING", logger="mnist_ablation.train"):
        assert load_checkpoint(tmp_path, BASELINE) is None
    assert "of another config (hash 0123456789abcdef" in caplog.text and "starting from epoch 0" in caplog.text
