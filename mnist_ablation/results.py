"""What a training run produces, without Keras: ``RunResult``, the per-epoch metric names, the loss on probabilities.

``train`` re-exports every name here. They live apart so that the modules that only read or log results
(``tracking``, ``ensemble``, ``report``, ``doctor``) import no Keras or TensorFlow (about 3 to 5 s of start-up).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import keras

    from .config import TrainConfig

EPOCH_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "epoch_seconds")
# Keras' fuzz factor (keras.config.epsilon()'s default), so that the loss below is Keras' own.
PROBABILITY_EPSILON = 1e-7


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass
class RunResult:
    """What one training run produced."""

    config: TrainConfig
    model: keras.Model
    history: dict[str, list[float]]  # per-epoch metrics, EPOCH_METRICS keys, whole even when resumed
    test_loss: float
    test_accuracy: float
    test_labels: np.ndarray  # (10000,)
    test_probabilities: np.ndarray  # (10000, 10) float32
    train_seconds: float  # wall time of the epochs trained in this process (incl. validation)
    train_images_per_second: float
    num_train_images: int
    initial_epoch: int = 0  # > 0 when resumed from a checkpoint
    tta_probabilities: np.ndarray | None = None  # when config.tta_views > 0
    extra_metrics: dict[str, float] = field(default_factory=dict)


def categorical_loss(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Keras' categorical cross-entropy on probabilities: clip to [eps, 1 - eps], mean of -log p(true)."""
    picked = np.clip(probabilities[np.arange(len(labels)), labels], PROBABILITY_EPSILON, 1 - PROBABILITY_EPSILON)
    return float(-np.mean(np.log(picked)))
