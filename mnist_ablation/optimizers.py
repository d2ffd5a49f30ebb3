"""Optimizers by name. Keras is imported when one is built, so validation can read the names cheaply."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from .registry import Registry

if TYPE_CHECKING:
    import keras


def adam(config) -> keras.optimizers.Optimizer:
    """The seed's optimizer (``optimizer='adam'``: Keras' defaults, learning rate set by the schedule)."""
    import keras

    return keras.optimizers.Adam(config.learning_rate)


def adamw(config) -> keras.optimizers.Optimizer:
    import keras

    return keras.optimizers.AdamW(config.learning_rate, weight_decay=config.weight_decay)


def nadam(config) -> keras.optimizers.Optimizer:
    import keras

    return keras.optimizers.Nadam(config.learning_rate)


def sgd(config) -> keras.optimizers.Optimizer:
    import keras

    return keras.optimizers.SGD(config.learning_rate, momentum=0.9, nesterov=True)


OPTIMIZERS: Registry[Callable[[object], keras.optimizers.Optimizer]] = Registry("optimizer", {
    "adam": adam,
    "adamw": adamw,
    "nadam": nadam,
    "sgd": sgd,
})
USES_WEIGHT_DECAY = ("adamw",)


def build_optimizer(config) -> keras.optimizers.Optimizer:
    """The optimizer named by ``config.optimizer``."""
    return OPTIMIZERS[config.optimizer](config)
