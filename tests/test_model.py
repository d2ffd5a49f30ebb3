"""The model's layer structure and parameter count against the seed's, and its variants."""

import pytest

from mnist_ablation.config import BASELINE
from mnist_ablation.model import build_model, seed_sequential_model


def _layer_kinds(model):
    return [type(layer).__name__ for layer in model.layers if type(layer).__name__ != "InputLayer"]


def test_default_model_is_the_seeds():
    model = build_model(BASELINE)
    seed = seed_sequential_model()
    assert model.count_params() == seed.count_params() == 469_578
    assert _layer_kinds(model) == _layer_kinds(seed)
    assert [w.shape for w in model.weights] == [w.shape for w in seed.weights]
    assert model.output_shape == (None, 10)


def test_switches_remove_exactly_their_layers():
    no_bn = build_model(BASELINE.replace(batch_norm=False))
    no_dropout = build_model(BASELINE.replace(dropout=False))
    kinds = _layer_kinds(build_model(BASELINE))
    assert _layer_kinds(no_bn) == [k for k in kinds if k != "BatchNormalization"]
    assert _layer_kinds(no_dropout) == [k for k in kinds if k != "Dropout"]
    assert no_bn.count_params() == 469_578 - 4 * (32 + 64 + 256)


def test_dropout_rates_are_taken_from_config():
    model = build_model(BASELINE.replace(conv_dropout_rate=0.1, dense_dropout_rate=0.3))
    rates = [layer.rate for layer in model.layers if type(layer).__name__ == "Dropout"]
    assert rates == [0.1, 0.1, 0.3]


def test_variants_build():
    assert build_model(BASELINE.replace(conv_filters=(64, 128, 128))).count_params() > 469_578
    assert build_model(BASELINE.replace(architecture="extra_block")).name == "extra_block_cnn"


def test_unknown_architecture_lists_known():
    import dataclasses

    config = dataclasses.replace(BASELINE)
    object.__setattr__(config, "architecture", "vgg")  # bypass validation to reach the registry
    with pytest.raises(ValueError, match="unknown architecture 'vgg'.*seed.*extra_block"):
        build_model(config)
