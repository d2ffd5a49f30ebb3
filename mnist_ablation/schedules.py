"""Learning-rate schedules by name: epoch -> learning rate, for ``keras.callbacks.LearningRateScheduler``."""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable

from .registry import Registry

Schedule = Callable[[int], float]


def step(config) -> Schedule:
    """The seed's schedule: 1e-3 before epoch 5, 5e-4 before epoch 10, then 1e-4 (by default)."""

    def rate(epoch: int) -> float:
        return config.learning_rate * config.lr_step_factors[bisect.bisect_right(config.lr_step_boundaries, epoch)]

    return rate


def constant(config) -> Schedule:
    return lambda epoch: config.learning_rate


def cosine(config) -> Schedule:
    """Cosine decay per epoch from learning_rate towards min_learning_rate at the end of training.

    Progress is ``epoch / epochs`` so the last epoch still trains at a positive rate.
    """

    def rate(epoch: int) -> float:
        progress = epoch / config.epochs
        return config.min_learning_rate + 0.5 * (config.learning_rate - config.min_learning_rate) * (
            1 + math.cos(math.pi * progress)
        )

    return rate


def onecycle(config) -> Schedule:
    """Linear warm-up over the first 30% of epochs to learning_rate, then cosine down (Smith, 2018)."""
    warmup = max(1, round(0.3 * config.epochs))
    start = config.min_learning_rate or config.learning_rate / 25

    def rate(epoch: int) -> float:
        if epoch < warmup:
            return start + (config.learning_rate - start) * epoch / warmup
        progress = (epoch - warmup) / max(config.epochs - 1 - warmup, 1)
        end = config.min_learning_rate or config.learning_rate / 1e3
        return end + 0.5 * (config.learning_rate - end) * (1 + math.cos(math.pi * progress))

    return rate


def exponential(config) -> Schedule:
    """Geometric decay from learning_rate to min_learning_rate (or 1% of it) at the last epoch."""
    end = config.min_learning_rate or config.learning_rate / 100

    def rate(epoch: int) -> float:
        return config.learning_rate * (end / config.learning_rate) ** (epoch / max(config.epochs - 1, 1))

    return rate


SCHEDULES: Registry[Callable[[object], Schedule]] = Registry("lr_schedule", {
    "step": step,
    "constant": constant,
    "cosine": cosine,
    "onecycle": onecycle,
    "exponential": exponential,
})


def build_schedule(config) -> Schedule:
    """Look up ``config.lr_schedule``; an unknown name raises ValueError listing the known ones."""
    return SCHEDULES[config.lr_schedule](config)
