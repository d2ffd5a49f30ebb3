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


@pytest.mark.parametrize("kernel, filters, final_size", [
    (3, (32, 48, 64, 80, 96, 112, 128, 144, 160, 176), 8),
    (5, (32, 64, 96, 128, 160), 8),
    (7, (48, 96, 144, 192), 4),
])
def test_no_pool_architectures_follow_an_et_al(kernel, filters, final_size):
    # An et al. 2020's M3/M5/M7: unpadded kxk convs with BN and ReLU, no pooling, no dropout, BN on the logits.
    model = build_model(BASELINE.replace(architecture=f"no_pool_{kernel}x{kernel}", conv_filters=filters))
    convs = [layer for layer in model.layers if type(layer).__name__ == "Conv2D"]
    assert [c.filters for c in convs] == list(filters)
    assert all(c.kernel_size == (kernel, kernel) and not c.use_bias for c in convs)
    kinds = set(_layer_kinds(model))
    assert "MaxPooling2D" not in kinds and "Dropout" not in kinds
    assert model.get_layer("flatten").input.shape[1:] == (final_size, final_size, filters[-1])
    assert model.output_shape == (None, 10)


def test_no_pool_rejects_more_convs_than_the_image_allows():
    from mnist_ablation.config import ConfigError

    with pytest.raises(ConfigError, match=r"conv_filters.*1 to 4 positive integers for no_pool_7x7"):
        BASELINE.replace(architecture="no_pool_7x7", conv_filters=(8, 8, 8, 8, 8))
    with pytest.raises(ConfigError, match="3 positive integers for seed"):
        BASELINE.replace(conv_filters=(8, 8, 8, 8))
