"""mnist_ablation: ablation studies of the seed's MNIST CNN, tracked in MLflow and tuned with Optuna."""

from .config import BASELINE, ConfigError, TrainConfig

__all__ = ["BASELINE", "ConfigError", "TrainConfig"]
__version__ = "0.1.0"
