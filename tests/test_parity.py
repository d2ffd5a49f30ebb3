"""The seed's own code as a pipeline (``pipeline="seed_script"``) and the ``parity`` study that compares it."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from mnist_ablation.config import BASELINE, FIELD_NAMES, ConfigError, TrainConfig, parse_set_arguments, with_overrides
from mnist_ablation.seed_pipeline import (
    DEFAULT_PIPELINE,
    PIPELINES,
    SEED_SCRIPT,
    SEED_SCRIPT_FIXED_FIELDS,
    SEED_SCRIPT_VARIABLE_FIELDS,
    lr_scheduler,
    seed_image_data_generator,
)
from mnist_ablation.studies import STUDIES

from helpers import REPO_ROOT, command_env, run_module

SEED_SCRIPT_CONFIG = BASELINE.replace(pipeline=SEED_SCRIPT)
TINY = {"train_subset": 200, "epochs": 1}
# Keras' ImageDataGenerator calls scipy.ndimage.interpolation.affine_transform, deprecated by SciPy, once per image.
SCIPY_NAMESPACE_NOISE = pytest.mark.filterwarnings("ignore:Please import `affine_transform`:DeprecationWarning")


# -- the config field ---------------------------------------------------------------------------------------

def test_pipeline_is_a_registry_field_defaulting_to_the_trainer():
    assert BASELINE.pipeline == DEFAULT_PIPELINE == "trainer"
    assert PIPELINES.names == ("trainer", "seed_script")
    assert PIPELINES["trainer"].train is None and PIPELINES["seed_script"].train is not None
    with pytest.raises(ConfigError, match=r"pipeline='seed_scirpt' is invalid: expected one of \('trainer', "
                                          r"'seed_script'\)"):
        BASELINE.replace(pipeline="seed_scirpt")
    assert with_overrides(BASELINE, parse_set_arguments(["pipeline=seed_script"])) == SEED_SCRIPT_CONFIG


def test_existing_config_hashes_are_unchanged():
    # Guards resume across upgrades: finished cells in users' stores are recognised by these hashes, computed
    # before the pipeline field existed (git stash of this change). They must never move.
    assert BASELINE.hash() == "69077df4b3b166f0"
    assert BASELINE.hash({"a": "b"}) == "b8ab76e8864d4f66"
    assert STUDIES["leave-one-out"].arms["no_dropout"].hash() == "7692ce0d8198596b"
    assert BASELINE.replace(validation="test", seed=3, epochs=2, train_subset=300).hash() == "ff5cbd8f9349582a"
    # The seed's script is another computation: another hash, so neither pipeline resumes the other's cells.
    assert SEED_SCRIPT_CONFIG.hash() != BASELINE.hash()
    assert SEED_SCRIPT_CONFIG.replace(threads=2, steps_per_execution=1).hash() == SEED_SCRIPT_CONFIG.hash()
    # The field is in what is logged, so a logged config re-creates the run.
    assert SEED_SCRIPT_CONFIG.to_dict()["pipeline"] == "seed_script"
    assert BASELINE.to_dict()["pipeline"] == "trainer"


def test_every_field_is_either_fixed_by_the_seeds_code_or_variable():
    # A field added later must be classified: unclassified, it would be silently ignored by the seed's script.
    assert set(SEED_SCRIPT_FIXED_FIELDS).isdisjoint(SEED_SCRIPT_VARIABLE_FIELDS)
    assert set(SEED_SCRIPT_FIXED_FIELDS) | set(SEED_SCRIPT_VARIABLE_FIELDS) == set(FIELD_NAMES)


@pytest.mark.parametrize("name, value, where", [
    ("batch_size", 64, "datagen.flow"),
    ("augmentation", False, "ImageDataGenerator"),
    ("rotation_range", 20.0, "rotation_range=10"),
    ("zoom_range", 0.2, "zoom_range=0.1"),
    ("architecture", "extra_block", "Sequential"),
    ("conv_filters", (64, 128, 128), "Sequential"),
    ("batch_norm", False, "Sequential"),
    ("dense_dropout_rate", 0.3, "Sequential"),
    ("optimizer", "sgd", "optimizer='adam'"),
    ("learning_rate", 3e-3, "lr_scheduler"),
    ("lr_schedule", "constant", "lr_scheduler"),
    ("lr_step_boundaries", (3, 6), "lr_scheduler"),
    ("label_smoothing", 0.1, "categorical_crossentropy"),
])
def test_seed_script_rejects_what_the_seeds_code_fixes(name, value, where):
    with pytest.raises(ConfigError) as raised:
        dataclasses.replace(SEED_SCRIPT_CONFIG, **{name: value})
    message = str(raised.value)
    assert f"{name}={value!r}" in message and "pipeline='seed_script'" in message and where in message
    assert "has no such knob" in message and "pipeline='trainer'" in message
    # The same value is fine for the trainer, which has the knob.
    dataclasses.replace(BASELINE, **{name: value})


def test_seed_script_accepts_what_varies_per_cell():
    config = SEED_SCRIPT_CONFIG.replace(seed=7, epochs=3, validation="test", validation_size=1000, split_seed=2,
                                        train_subset=500, tta_views=2, threads=2, steps_per_execution=4)
    assert config.pipeline == "seed_script"
    # The seed's recipe spelled out is the same config (ints for floats and lists for tuples, as --set gives them).
    spelled_out = with_overrides(SEED_SCRIPT_CONFIG, {"rotation_range": 10, "conv_filters": [32, 64, 64]})
    assert spelled_out == SEED_SCRIPT_CONFIG


# -- the seed's code, as written ----------------------------------------------------------------------------

def test_seed_script_augments_with_the_seeds_image_data_generator():
    from mnist_ablation.augment import AugmentationParams

    generator = seed_image_data_generator()
    # The seed's ImageDataGenerator(rotation_range=10, width_shift_range=0.1, height_shift_range=0.1,
    # zoom_range=0.1, shear_range=0.1), everything else at Keras' defaults.
    assert (generator.rotation_range, generator.width_shift_range, generator.height_shift_range,
            generator.shear_range) == (10, 0.1, 0.1, 0.1)
    assert list(generator.zoom_range) == [0.9, 1.1]
    assert (generator.fill_mode, generator.interpolation_order, generator.cval) == ("nearest", 1, 0.0)
    assert not (generator.horizontal_flip or generator.vertical_flip or generator.featurewise_center
                or generator.zca_whitening or generator.rescale or generator.channel_shift_range)
    # The trainer's augmentation has the same strengths (its pixel-wise equality is tests/test_augment.py's).
    trainer = AugmentationParams.from_config(BASELINE)
    assert (trainer.rotation_range, trainer.width_shift_range, trainer.height_shift_range, trainer.zoom_range,
            trainer.shear_range) == (10, 0.1, 0.1, 0.1, 0.1)
    # It is the very class the seed imports from tensorflow.keras, and it lives in Keras' NumPy/SciPy code.
    import tensorflow as tf

    assert type(generator) is tf.keras.preprocessing.image.ImageDataGenerator
    assert type(generator).__module__ == "keras.src.legacy.preprocessing.image"


def test_seed_script_schedule_and_model_are_the_seeds():
    from mnist_ablation.model import build_model
    from mnist_ablation.schedules import build_schedule

    trainer_schedule = build_schedule(BASELINE)
    rates = [lr_scheduler(epoch) for epoch in range(15)]
    assert rates == [0.001] * 5 + [0.0005] * 5 + [0.0001] * 5
    # Equal once stored in the optimizer's float32 variable (1e-3 * 0.1 is 1.0000000000000002e-4 in float64).
    assert [np.float32(r) for r in rates] == [np.float32(trainer_schedule(epoch)) for epoch in range(15)]
    from mnist_ablation.model import seed_sequential_model

    assert seed_sequential_model().count_params() == build_model(BASELINE).count_params() == 469_578


# -- training runs ------------------------------------------------------------------------------------------

def _assert_complete(result, config, num_train_images):
    from mnist_ablation.train import EPOCH_METRICS

    assert result.config == config and result.initial_epoch == 0
    assert result.num_train_images == num_train_images
    assert set(result.history) == set(EPOCH_METRICS)
    assert all(len(values) == config.epochs and np.all(np.isfinite(values)) for values in result.history.values())
    assert result.history["learning_rate"] == pytest.approx([0.001] * config.epochs)
    assert result.test_probabilities.shape == (10_000, 10) and result.test_labels.shape == (10_000,)
    np.testing.assert_allclose(result.test_probabilities.sum(axis=1), 1.0, atol=1e-4)
    assert result.test_accuracy == np.mean(result.test_probabilities.argmax(1) == result.test_labels)
    assert result.train_seconds > 0 and result.train_images_per_second > 0
    assert type(result.model).__name__ == "Sequential" and result.model.count_params() == 469_578


@pytest.mark.slow
@SCIPY_NAMESPACE_NOISE
def test_seed_script_cell_on_tensorflow_is_complete_reproducible_and_never_resumes(tmp_path, mnist):
    import keras

    from mnist_ablation.model import build_model
    from mnist_ablation.train import EpochCheckpoint, load_checkpoint, train

    config = SEED_SCRIPT_CONFIG.replace(**TINY)
    # A trainer checkpoint of the same split, seed and epochs, in the directory the cell is given: never loaded.
    trainer_config = BASELINE.replace(**TINY)
    checkpoint = tmp_path / "checkpoint"
    writer = EpochCheckpoint(checkpoint, trainer_config, {"loss": [0.1]})
    writer.set_model(build_model(trainer_config))
    writer.on_epoch_end(0, {"loss": 0.1})
    assert load_checkpoint(checkpoint, trainer_config) is not None
    assert load_checkpoint(checkpoint, config) is None

    class Seen(keras.callbacks.Callback):
        logs: list = []

        def on_epoch_end(self, epoch, logs=None):
            self.logs.append(dict(logs))

    seen = Seen()
    result = train(config, mnist, callbacks=[seen], checkpoint_dir=checkpoint, verbose=0)
    _assert_complete(result, config, 200)
    # The caller's callbacks see what the trainer's see (learning rate and epoch time included).
    assert {"loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "epoch_seconds"} <= set(seen.logs[0])
    # Seeded from the config: the same cell again is the same run, bit for bit; another seed is another run.
    again = train(config, mnist, verbose=0)
    np.testing.assert_array_equal(again.test_probabilities, result.test_probabilities)
    assert again.history["loss"] == result.history["loss"]
    other = train(config.replace(seed=1), mnist, verbose=0)
    assert other.history["loss"] != result.history["loss"]


NO_TENSORFLOW = textwrap.dedent("""
    import importlib.abc, runpy, sys

    class NoTensorFlow(importlib.abc.MetaPathFinder):
        # A machine with Keras on JAX and no TensorFlow: importing it fails as it would there.
        def find_spec(self, name, path=None, target=None):
            if name == "tensorflow" or name.startswith("tensorflow."):
                raise ModuleNotFoundError(f"No module named {name!r}")

    sys.meta_path.insert(0, NoTensorFlow())
    sys.argv = ["experiments.ablate", *sys.argv[1:]]
    try:
        runpy.run_module("experiments.ablate", run_name="__main__")
    except SystemExit as exit:
        if exit.code:
            raise
    import keras
    loaded = sorted(name for name in sys.modules if name == "tensorflow" or name.startswith("tensorflow."))
    print("BACKEND", keras.backend.backend(), "TENSORFLOW_MODULES", loaded)
""")


@pytest.mark.slow
def test_seed_script_cell_on_jax_without_tensorflow(tmp_path, data_dir, mnist):
    pytest.importorskip("jax")
    cells = tmp_path / "cells"
    env = command_env("sqlite:///unused.db", data_dir, KERAS_BACKEND="jax")
    completed = subprocess.run(
        [sys.executable, "-c", NO_TENSORFLOW, "--study", "parity", "--arms", "seed_script", "--seeds", "1",
         "--train-subset", "200", "--epochs", "1", "--offline", str(cells)],
        env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "BACKEND jax TENSORFLOW_MODULES []" in completed.stdout
    from mnist_ablation import offline

    result, record = offline.load_result(cells / "seed_script-seed0")
    assert record["keras_backend"] == "jax" and record["config"]["pipeline"] == "seed_script"
    assert record["config_hash"] == SEED_SCRIPT_CONFIG.replace(**TINY).hash(mnist.checksums)
    assert result.config == SEED_SCRIPT_CONFIG.replace(**TINY)
    assert len(result.history["loss"]) == 1 and np.isfinite(result.history["val_loss"][0])
    assert result.test_probabilities.shape == (10_000, 10) and result.num_train_images == 200
    # The Sequential trained on JAX loads here, on TensorFlow, and predicts what JAX predicted.
    probabilities = result.model.predict(mnist.x_test[:500], batch_size=500, verbose=0)
    np.testing.assert_allclose(probabilities, result.test_probabilities[:500], atol=1e-4)


# -- the study ----------------------------------------------------------------------------------------------

def test_parity_study_compares_the_trainer_with_the_seeds_script():
    study = STUDIES["parity"]
    assert list(study.arms) == ["baseline", "seed_script"] and study.baseline_arm == "baseline"
    assert study.arms["baseline"] == BASELINE
    assert study.overrides("seed_script") == {"pipeline": "seed_script"}


@pytest.mark.slow
def test_parity_study_runs_from_the_command_line(tmp_path, tracking_uri, data_dir):
    from mlflow.tracking import MlflowClient

    from mnist_ablation import naming, store

    env = command_env(tracking_uri, data_dir)
    listing = run_module("experiments.ablate", "--list", env=env, cwd=tmp_path)
    assert "parity: Is the trainer's baseline the seed's pipeline?" in listing.stdout
    assert '{"pipeline": "seed_script"}' in listing.stdout

    output = tmp_path / "report"
    run_module("experiments.ablate", "--study", "parity", "--quick", "--seeds", "1", "--train-subset", "200",
               "--epochs", "1", "--output", str(output), env=env, cwd=tmp_path)
    runs = store.cell_runs("parity")
    assert sorted(runs["arm"]) == ["baseline", "seed_script"] and set(runs["status"]) == {"FINISHED"}
    assert set(runs["train_subset"]) == {200} and set(runs["epochs"]) == {1}
    client = MlflowClient(tracking_uri)
    logged = {row.arm: client.get_run(row.run_id) for row in runs.itertuples()}
    assert logged["seed_script"].data.params["pipeline"] == "seed_script"
    assert logged["baseline"].data.params["pipeline"] == "trainer"
    # Logged exactly alike: the same params, the same metrics, the same artifacts, predictions of 10,000 images.
    assert set(logged["seed_script"].data.params) == set(logged["baseline"].data.params)
    assert set(logged["seed_script"].data.metrics) == set(logged["baseline"].data.metrics)
    for run in logged.values():
        assert len(client.get_metric_history(run.info.run_id, "val_accuracy")) == 1
        assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"predictions", "plots", "config.json"}
        assert len(store.read_predictions(run.info.run_id)) == 10_000
        config = store.read_json_artifact(run.info.run_id, naming.CONFIG_ARTIFACT)
        assert config["pipeline"] == run.data.params["pipeline"]
    # The report compares them like any two arms.
    summary = (output / "ablation_summary.csv").read_text()
    assert "seed_script" in summary and "delta_vs_baseline" in summary.splitlines()[0]
    # The Sequential is logged as the cell's model and loads back.
    import mlflow

    model = mlflow.keras.load_model(f"runs:/{logged['seed_script'].info.run_id}/model")
    assert type(model).__name__ == "Sequential" and model.count_params() == 469_578


def test_train_config_is_still_frozen_and_complete():
    # The new field is a field like the others: frozen, typed, in FIELD_NAMES, round-tripping through to_dict.
    assert "pipeline" in FIELD_NAMES
    from mnist_ablation.config import from_dict

    assert from_dict(SEED_SCRIPT_CONFIG.to_dict()) == SEED_SCRIPT_CONFIG
    legacy = {k: v for k, v in BASELINE.to_dict().items() if k != "pipeline"}  # a config.json logged before it
    assert from_dict(legacy) == BASELINE
    with pytest.raises(dataclasses.FrozenInstanceError):
        SEED_SCRIPT_CONFIG.pipeline = "trainer"  # type: ignore[misc]
    assert isinstance(TrainConfig().pipeline, str)
