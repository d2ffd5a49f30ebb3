"""The seed's CNN and its variants, built by name from a config (Keras Functional API).

Keras is imported inside the builders, so the architecture registry (names and constraints) can be read by
config validation and ``--list`` without loading a backend.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .data import NUM_CLASSES
from .registry import Registry

if TYPE_CHECKING:
    import keras

INPUT_SHAPE = (28, 28, 1)
OUTPUT_LAYER = "predictions"  # every architecture's softmax output (the explorer finds the logits through it)


def _conv_block(x, filters: int, config, *, batch_norm: bool, pool: bool, name: str):
    from keras import layers

    x = layers.Conv2D(filters, (3, 3), activation="relu", name=f"{name}_conv")(x)
    if batch_norm and config.batch_norm:
        x = layers.BatchNormalization(name=f"{name}_bn")(x)
    if pool:
        x = layers.MaxPooling2D((2, 2), name=f"{name}_pool")(x)
        if config.dropout:
            x = layers.Dropout(config.conv_dropout_rate, name=f"{name}_dropout")(x)
    return x


def _classifier(x, config):
    from keras import layers

    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(config.dense_units, activation="relu", name="dense")(x)
    if config.batch_norm:
        x = layers.BatchNormalization(name="dense_bn")(x)
    if config.dropout:
        x = layers.Dropout(config.dense_dropout_rate, name="dense_dropout")(x)
    return layers.Dense(NUM_CLASSES, activation="softmax", name=OUTPUT_LAYER)(x)


def seed_architecture(config) -> keras.Model:
    """Conv32-BN, Conv64-Pool-Drop, Conv64-BN-Pool-Drop, Dense256-BN-Drop, Dense10 (469,578 params)."""
    import keras

    f1, f2, f3 = config.conv_filters
    inputs = keras.Input(shape=INPUT_SHAPE, name="image")
    x = _conv_block(inputs, f1, config, batch_norm=True, pool=False, name="block1")
    x = _conv_block(x, f2, config, batch_norm=False, pool=True, name="block2")
    x = _conv_block(x, f3, config, batch_norm=True, pool=True, name="block3")
    return keras.Model(inputs, _classifier(x, config), name="seed_cnn")


def extra_block_architecture(config) -> keras.Model:
    """The seed's network with a fourth 3x3 conv (same padding, BN) before the last pooling."""
    import keras
    from keras import layers

    f1, f2, f3 = config.conv_filters
    inputs = keras.Input(shape=INPUT_SHAPE, name="image")
    x = _conv_block(inputs, f1, config, batch_norm=True, pool=False, name="block1")
    x = _conv_block(x, f2, config, batch_norm=False, pool=True, name="block2")
    x = _conv_block(x, f3, config, batch_norm=True, pool=False, name="block3")
    x = layers.Conv2D(2 * f3, (3, 3), padding="same", activation="relu", name="block4_conv")(x)
    if config.batch_norm:
        x = layers.BatchNormalization(name="block4_bn")(x)
    x = layers.MaxPooling2D((2, 2), name="block4_pool")(x)
    if config.dropout:
        x = layers.Dropout(config.conv_dropout_rate, name="block4_dropout")(x)
    return keras.Model(inputs, _classifier(x, config), name="extra_block_cnn")


def no_pool_architecture(config, kernel: int) -> keras.Model:
    """An et al. 2020 (arXiv 2008.10400): unpadded ``kernel`` x ``kernel`` convs, no pooling, no dropout.

    One conv (no bias) + BN + ReLU per entry of ``conv_filters``, then Flatten, Dense(10) (no bias) + BN
    and softmax. Their M3 is ten 3x3 convs (32, 48, ..., 176), M5 five 5x5 (32, 64, 96, 128, 160) and M7
    four 7x7 (48, 96, 144, 192). ``dense_units`` and the dropout fields do not apply.
    """
    import keras
    from keras import layers

    inputs = keras.Input(shape=INPUT_SHAPE, name="image")
    x = inputs
    for index, filters in enumerate(config.conv_filters, start=1):
        x = layers.Conv2D(filters, (kernel, kernel), use_bias=not config.batch_norm, name=f"block{index}_conv")(x)
        if config.batch_norm:
            x = layers.BatchNormalization(name=f"block{index}_bn")(x)
        x = layers.Activation("relu", name=f"block{index}_relu")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(NUM_CLASSES, use_bias=not config.batch_norm, name="logits")(x)
    if config.batch_norm:
        x = layers.BatchNormalization(name="logits_bn")(x)
    outputs = layers.Activation("softmax", name=OUTPUT_LAYER)(x)
    return keras.Model(inputs, outputs, name=f"no_pool_{kernel}x{kernel}_cnn")


@dataclass(frozen=True)
class Architecture:
    """A model builder and the config it accepts: how many ``conv_filters``, and which fields it ignores."""

    build: Callable[[object], keras.Model]
    min_conv_layers: int = 3
    max_conv_layers: int = 3
    uses_dense_and_dropout: bool = True  # dense_units, dropout and its rates

    def conv_layers_allowed(self, name: str) -> str:
        if self.min_conv_layers == self.max_conv_layers:
            return f"{self.min_conv_layers} positive integers for {name}, e.g. 32,64,64"
        return (f"{self.min_conv_layers} to {self.max_conv_layers} positive integers for {name} "
                "(each unpadded conv shrinks the 28x28 image)")


def _no_pool(kernel: int) -> Architecture:
    # Unpadded kxk convs shrink 28x28 by k-1 per layer; the last one must leave at least 1x1.
    return Architecture(functools.partial(no_pool_architecture, kernel=kernel), min_conv_layers=1,
                        max_conv_layers=(INPUT_SHAPE[0] - 1) // (kernel - 1), uses_dense_and_dropout=False)


ARCHITECTURES: Registry[Architecture] = Registry("architecture", {
    "seed": Architecture(seed_architecture),
    "extra_block": Architecture(extra_block_architecture),
    "no_pool_3x3": _no_pool(3),
    "no_pool_5x5": _no_pool(5),
    "no_pool_7x7": _no_pool(7),
})


def build_model(config) -> keras.Model:
    """Build the (uncompiled) model named by ``config.architecture``."""
    return ARCHITECTURES[config.architecture].build(config)


def seed_sequential_model() -> keras.Model:
    """The seed's model exactly as its text writes it (reference for tests and the speed benchmark)."""
    import keras
    from keras.layers import BatchNormalization, Conv2D, Dense, Dropout, Flatten, MaxPooling2D

    return keras.Sequential([
        keras.Input(shape=INPUT_SHAPE),
        Conv2D(32, (3, 3), activation="relu"),
        BatchNormalization(),
        Conv2D(64, (3, 3), activation="relu"),
        MaxPooling2D((2, 2)),
        Dropout(0.25),
        Conv2D(64, (3, 3), activation="relu"),
        BatchNormalization(),
        MaxPooling2D((2, 2)),
        Dropout(0.25),
        Flatten(),
        Dense(256, activation="relu"),
        BatchNormalization(),
        Dropout(0.5),
        Dense(10, activation="softmax"),
    ])


def inference_copy(model: keras.Model) -> keras.Model:
    """The same layers and weights (batch-norm statistics included), uncompiled: no optimizer state.

    For saving or logging a trained model: Adam's two slots per weight would triple the file (5.5 MB ->
    1.9 MB here). ``keras.models.clone_model`` would compile the clone with the same optimizer;
    ``from_config`` does not.
    """
    copy = type(model).from_config(model.get_config())  # a Sequential (the seed's script) stays one
    copy.set_weights(model.get_weights())
    return copy
