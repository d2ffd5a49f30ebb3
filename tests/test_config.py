"""Config defaults, overrides, validation messages and hashing."""

import dataclasses

import pytest

from mnist_ablation.config import (
    BASELINE,
    FIELD_NAMES,
    ConfigError,
    TrainConfig,
    from_dict,
    parse_set_arguments,
    with_overrides,
)

REQUIRED_FIELDS = (
    "augmentation", "rotation_range", "width_shift_range", "height_shift_range", "zoom_range", "shear_range",
    "batch_norm", "dropout", "conv_dropout_rate", "dense_dropout_rate", "lr_schedule", "learning_rate",
    "batch_size", "epochs", "seed", "validation",
)


def test_defaults_are_the_seed_recipe():
    assert set(REQUIRED_FIELDS) <= set(FIELD_NAMES)
    assert (BASELINE.batch_size, BASELINE.epochs, BASELINE.learning_rate) == (32, 15, 1e-3)
    assert (BASELINE.rotation_range, BASELINE.width_shift_range, BASELINE.height_shift_range) == (10, 0.1, 0.1)
    assert (BASELINE.zoom_range, BASELINE.shear_range) == (0.1, 0.1)
    assert BASELINE.augmentation and BASELINE.batch_norm and BASELINE.dropout
    assert (BASELINE.conv_dropout_rate, BASELINE.dense_dropout_rate) == (0.25, 0.5)
    assert BASELINE.lr_schedule == "step" and BASELINE.conv_filters == (32, 64, 64) and BASELINE.dense_units == 256


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        BASELINE.epochs = 3  # type: ignore[misc]


def test_set_arguments_are_typed():
    overrides = parse_set_arguments(["batch_norm=false", "learning_rate=3e-4", "conv_filters=16,32,32",
                                     "train_subset=none", "epochs=4"])
    assert overrides == {"batch_norm": False, "learning_rate": 3e-4, "conv_filters": (16, 32, 32),
                         "train_subset": None, "epochs": 4}
    config = with_overrides(BASELINE, overrides)
    assert config.batch_norm is False and config.conv_filters == (16, 32, 32)


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"conv_dropout_rate": 1.0}, ["conv_dropout_rate", "1.0", "[0, 1)"]),
        ({"dense_dropout_rate": -0.1}, ["dense_dropout_rate", "-0.1"]),
        ({"lr_schedule": "warmup"}, ["lr_schedule", "'warmup'", "step", "constant", "cosine"]),
        ({"batch_size": -32}, ["batch_size", "-32", ">= 1"]),
        ({"epochs": 0}, ["epochs", "0"]),
        ({"validation": "holdout"}, ["validation", "holdout", "split", "test"]),
        ({"lr_step_factors": (1.0, 0.5)}, ["lr_step_factors", "3 positive factors"]),
        ({"architecture": "resnet"}, ["architecture", "resnet", "seed"]),
    ],
)
def test_invalid_values_name_field_value_and_allowed(overrides, words):
    with pytest.raises(ConfigError) as error:
        with_overrides(BASELINE, overrides)
    for word in words:
        assert word in str(error.value)


def test_unknown_field_suggests_the_close_one():
    with pytest.raises(ConfigError, match="unknown config field 'batchnorm'.*batch_norm"):
        parse_set_arguments(["batchnorm=false"])
    with pytest.raises(ConfigError, match="not FIELD=VALUE"):
        parse_set_arguments(["batch_norm"])
    with pytest.raises(ConfigError, match="is not a boolean"):
        parse_set_arguments(["dropout=maybe"])


def test_wrong_type_is_rejected():
    with pytest.raises(ConfigError, match="epochs"):
        TrainConfig(epochs="15")  # type: ignore[arg-type]


def test_round_trip_and_hash():
    config = BASELINE.replace(batch_norm=False, conv_filters=(16, 32, 32))
    assert from_dict(config.to_dict()) == config
    assert config.hash() == from_dict(config.to_dict()).hash()
    assert config.hash() != BASELINE.hash()
    assert BASELINE.hash({"file": "a"}) != BASELINE.hash({"file": "b"})
    # Speed-only fields do not change what a run computes, so they leave the hash alone.
    assert BASELINE.replace(threads=1, steps_per_execution=8).hash() == BASELINE.hash()
