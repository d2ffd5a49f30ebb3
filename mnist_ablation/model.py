"""The seed's CNN and its variants, built by name from a config (Keras Functional API)."""

from __future__ import annotations

from typing import Callable

import keras
from keras import layers

from .registry import lookup

INPUT_SHAPE = (28, 28, 1)
NUM_CLASSES = 10


def _conv_block(x, filters: int, config, *, batch_norm: bool, pool: bool, name: str):
    x = layers.Conv2D(filters, (3, 3), activation="relu", name=f"{name}_conv")(x)
    if batch_norm and config.batch_norm:
        x = layers.BatchNormalization(name=f"{name}_bn")(x)
    if pool:
        x = layers.MaxPooling2D((2, 2), name=f"{name}_pool")(x)
        if config.dropout:
            x = layers.Dropout(config.conv_dropout_rate, name=f"{name}_dropout")(x)
    return x


def _classifier(x, config):
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(config.dense_units, activation="relu", name="dense")(x)
    if config.batch_norm:
        x = layers.BatchNormalization(name="dense_bn")(x)
    if config.dropout:
        x = layers.Dropout(config.dense_dropout_rate, name="dense_dropout")(x)
    return layers.Dense(NUM_CLASSES, activation="softmax", name="predictions")(x)


def seed_architecture(config) -> keras.Model:
    """Conv32-BN, Conv64-Pool-Drop, Conv64-BN-Pool-Drop, Dense256-BN-Drop, Dense10 (469,578 params)."""
    f1, f2, f3 = config.conv_filters
    inputs = keras.Input(shape=INPUT_SHAPE, name="image")
    x = _conv_block(inputs, f1, config, batch_norm=True, pool=False, name="block1")
    x = _conv_block(x, f2, config, batch_norm=False, pool=True, name="block2")
    x = _conv_block(x, f3, config, batch_norm=True, pool=True, name="block3")
    return keras.Model(inputs, _classifier(x, config), name="seed_cnn")


def extra_block_architecture(config) -> keras.Model:
    """The seed's network with a fourth 3x3 conv (same padding, BN) before the last pooling."""
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


ARCHITECTURES: dict[str, Callable[[object], keras.Model]] = {
    "seed": seed_architecture,
    "extra_block": extra_block_architecture,
}


def build_model(config) -> keras.Model:
    """Build the (uncompiled) model named by ``config.architecture``."""
    builder = lookup(ARCHITECTURES, config.architecture, "architecture")
    return builder(config)


def seed_sequential_model() -> keras.Model:
    """The seed's model exactly as its text writes it (reference for tests and the speed benchmark)."""
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
