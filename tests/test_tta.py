"""Test-time augmentation: the trainer's TTA evaluation and what the tracking logs for it."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from mnist_ablation.config import BASELINE, ConfigError

ZERO_STRENGTHS = dict(rotation_range=0.0, width_shift_range=0.0, height_shift_range=0.0, zoom_range=0.0,
                      shear_range=0.0)


def test_tta_views_must_not_be_negative():
    with pytest.raises(ConfigError, match="tta_views"):
        BASELINE.replace(tta_views=-1)


@pytest.fixture(scope="module")
def tta_run(tmp_path_factory, mnist):
    """One tiny tracked run with two TTA views, in its own temporary store."""
    from mnist_ablation import tracking

    store = tmp_path_factory.mktemp("tta_store")
    tracking.use_tracking_uri(f"sqlite:///{store / 'mlflow.db'}")
    config = BASELINE.replace(train_subset=200, epochs=1, tta_views=2)
    return tracking.run_training(config, mnist, experiment_name="tta-test", run_name="tta", verbose=0)


@pytest.mark.slow
def test_tta_run_logs_its_own_metrics_and_predictions(tta_run):
    result = tta_run.result
    run = MlflowClient().get_run(tta_run.run_id)
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    assert metrics["test_accuracy_tta"] == pytest.approx(
        float(np.mean(result.tta_probabilities.argmax(1) == result.test_labels)))
    assert 0.0 < metrics["test_loss_tta"] < 10.0
    # The plain evaluation is untouched by TTA and still logged under its own names.
    assert metrics["test_accuracy"] == pytest.approx(result.test_accuracy)
    columns = [f"prob_{k}" for k in range(10)]
    tta_frame = pd.read_parquet(mlflow.artifacts.download_artifacts(
        run_id=tta_run.run_id, artifact_path="predictions/test_predictions_tta.parquet"))
    plain_frame = pd.read_parquet(mlflow.artifacts.download_artifacts(
        run_id=tta_run.run_id, artifact_path="predictions/test_predictions.parquet"))
    assert len(tta_frame) == 10_000
    np.testing.assert_allclose(tta_frame[columns].to_numpy(), result.tta_probabilities, atol=1e-7)
    np.testing.assert_allclose(plain_frame[columns].to_numpy(), result.test_probabilities, atol=1e-7)
    np.testing.assert_allclose(tta_frame[columns].to_numpy().sum(1), 1.0, atol=1e-4)
    # The augmented views change the probabilities (otherwise TTA would be a no-op).
    assert np.abs(result.tta_probabilities - result.test_probabilities).max() > 1e-3


@pytest.mark.slow
def test_tta_with_zero_strengths_equals_the_plain_prediction(tta_run, mnist):
    from mnist_ablation.train import predict_probabilities, tta_probabilities

    model = tta_run.result.model
    images = mnist.x_test[:500]
    plain = predict_probabilities(model, images)
    identity = tta_probabilities(model, images, BASELINE.replace(tta_views=3, **ZERO_STRENGTHS))
    np.testing.assert_allclose(identity, plain, atol=1e-6)
    assert np.array_equal(identity.argmax(1), plain.argmax(1))


@pytest.mark.slow
def test_tta_is_reproducible_and_averages_the_plain_view(tta_run, mnist):
    from mnist_ablation.train import predict_probabilities, tta_probabilities

    model = tta_run.result.model
    images = mnist.x_test[:500]
    config = BASELINE.replace(tta_views=2)
    first = tta_probabilities(model, images, config)
    np.testing.assert_array_equal(first, tta_probabilities(model, images, config))
    # One view: (plain + one augmented view) / 2, so 2 * tta - plain is a proper probability vector.
    plain = predict_probabilities(model, images)
    single = tta_probabilities(model, images, BASELINE.replace(tta_views=1))
    view = 2 * single - plain
    assert view.min() > -1e-5
    np.testing.assert_allclose(view.sum(1), 1.0, atol=1e-4)
    assert np.abs(view - plain).max() > 1e-3
