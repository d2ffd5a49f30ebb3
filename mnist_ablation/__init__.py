"""mnist_ablation: ablation studies of the seed's MNIST CNN, tracked in MLflow and tuned with Optuna."""

from . import seed_pipeline  # noqa: F401  (registers the "seed_script" pipeline; import-light)
from .config import BASELINE, ConfigError, TrainConfig

__all__ = ["BASELINE", "ConfigError", "TrainConfig"]
__version__ = "0.1.0"

# The study report's DataFrame functions, imported on first use (they pull in MLflow and matplotlib).
_REPORT_FUNCTIONS = ("ablation_summary", "factorial_analysis", "learning_curves", "seeds_needed", "write_study_report")
__all__ += list(_REPORT_FUNCTIONS)


def __getattr__(name: str):
    if name in _REPORT_FUNCTIONS:
        from . import report

        return getattr(report, name)
    raise AttributeError(f"module 'mnist_ablation' has no attribute {name!r}")
