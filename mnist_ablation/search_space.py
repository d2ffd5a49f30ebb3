"""The tuning search space, and the samplers and pruners by name.

Import-light (Optuna is imported when a sampler, pruner or fixed trial is built), so the command layer can
offer the registries' names as choices without loading Optuna or TensorFlow.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

from .config import FIELD_NAMES, ConfigError, TrainConfig
from .errors import UserError
from .registry import Registry
from .schedules import SCHEDULES

BATCH_SIZES = (32, 64, 128, 256)
DECAYING_SCHEDULES = ("cosine", "onecycle", "exponential")  # schedules with a floor (min_learning_rate)


class SearchSpaceError(UserError, ValueError):
    """A base config the search space cannot reproduce."""


def suggest_config(trial, base: TrainConfig) -> TrainConfig:
    """The search space: ``base`` with the trial's choices for the fields worth tuning.

    Every ``suggest_*`` call is here. Conditional parameters exist only when their switch is on
    (dropout rates only with dropout, the step factors only for the step schedule), so "off" is a value,
    as in the config. Fields not suggested keep ``base``'s value; ``baseline_params(base)`` is the
    point of this space that reproduces ``base`` exactly.
    """
    learning_rate = trial.suggest_float("learning_rate", 1e-4, 1e-2, log=True)
    lr_schedule = trial.suggest_categorical("lr_schedule", SCHEDULES.names)
    if lr_schedule == "step":
        # The step boundaries stay base's; each later step is a multiple of the initial rate.
        step_factors = tuple(trial.suggest_float(f"lr_step_factor_{index}", 0.01, 1.0, log=True)
                             for index in range(1, len(base.lr_step_boundaries) + 1))
    elif lr_schedule in DECAYING_SCHEDULES:
        min_learning_rate_fraction = trial.suggest_float("min_learning_rate_fraction", 0.0, 0.1)
    batch_size = trial.suggest_categorical("batch_size", _with_base_value(BATCH_SIZES, base.batch_size))
    batch_norm = trial.suggest_categorical("batch_norm", (True, False))
    dropout = trial.suggest_categorical("dropout", (True, False))
    if dropout:
        conv_dropout_rate = trial.suggest_float("conv_dropout_rate", 0.0, 0.5)
        dense_dropout_rate = trial.suggest_float("dense_dropout_rate", 0.0, 0.7)
    augmentation = trial.suggest_categorical("augmentation", (True, False))
    if augmentation:
        rotation_range = trial.suggest_float("rotation_range", 0.0, 20.0)  # degrees
        width_shift_range = trial.suggest_float("width_shift_range", 0.0, 0.2)
        height_shift_range = trial.suggest_float("height_shift_range", 0.0, 0.2)
        zoom_range = trial.suggest_float("zoom_range", 0.0, 0.2)
        shear_range = trial.suggest_float("shear_range", 0.0, 20.0)  # degrees, as ImageDataGenerator reads it

    changes: dict[str, Any] = {"learning_rate": learning_rate, "lr_schedule": lr_schedule, "batch_size": batch_size,
                               "batch_norm": batch_norm, "dropout": dropout, "augmentation": augmentation}
    if lr_schedule == "step":
        changes["lr_step_factors"] = (base.lr_step_factors[0], *step_factors)
    elif lr_schedule in DECAYING_SCHEDULES:
        changes["min_learning_rate"] = min_learning_rate_fraction * learning_rate
    if dropout:
        changes.update(conv_dropout_rate=conv_dropout_rate, dense_dropout_rate=dense_dropout_rate)
    if augmentation:
        changes.update(rotation_range=rotation_range, width_shift_range=width_shift_range,
                       height_shift_range=height_shift_range, zoom_range=zoom_range, shear_range=shear_range)
    return base.replace(**changes)


# The parameters above that are not config fields, as functions of a config (to find base's own point).
DERIVED_PARAMS: dict[str, Callable[[TrainConfig], Any]] = {
    "min_learning_rate_fraction": lambda c: c.min_learning_rate / c.learning_rate,
    **{f"lr_step_factor_{i}": (lambda c, i=i: c.lr_step_factors[i]) for i in range(1, 8)},
}


def _with_base_value(choices: tuple, value) -> tuple:
    # The baseline must be a point of the space, so base's own value is always a choice.
    return choices if value in choices else tuple(sorted((*choices, value)))


class _BaseValues:
    """A stand-in trial that answers every suggestion with ``base``'s own value, recording it."""

    def __init__(self, base: TrainConfig):
        self.base = base
        self.params: dict[str, Any] = {}

    def _value(self, name: str):
        if name in FIELD_NAMES:
            value = getattr(self.base, name)
        elif name in DERIVED_PARAMS:
            value = DERIVED_PARAMS[name](self.base)
        else:
            raise AssertionError(f"search space parameter {name!r} is neither a config field nor in DERIVED_PARAMS")
        self.params[name] = value
        return value

    def suggest_float(self, name, low, high, *, log=False, step=None):
        return self._value(name)

    def suggest_int(self, name, low, high, *, log=False, step=1):
        return self._value(name)

    def suggest_categorical(self, name, choices):
        return self._value(name)


def baseline_params(base: TrainConfig) -> dict[str, Any]:
    """The trial parameters for which ``suggest_config`` returns ``base`` itself (enqueued as trial 0).

    Derived by walking ``suggest_config`` with base's own values, then checked by rebuilding the config.
    """
    walker = _BaseValues(base)
    suggest_config(walker, base)
    rebuilt = config_from_params(walker.params, base).to_dict()
    if any(not math.isclose(v, rebuilt[k], rel_tol=1e-12) if isinstance(v, float) else v != rebuilt[k]
           for k, v in base.to_dict().items()):
        raise SearchSpaceError("the search space cannot reproduce the base config exactly; tune from a base "
                               "whose fields the space covers.")
    return walker.params


def config_from_params(params: dict[str, Any], base: TrainConfig) -> TrainConfig:
    """Re-create a trial's config from its parameters (e.g. ``study.best_params``)."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FixedTrial warns for values outside the ranges (a custom baseline)
        return suggest_config(optuna.trial.FixedTrial(params), base)


def check_base_config(base: TrainConfig) -> None:
    """Tuning selects on the validation split, never on the test set."""
    if base.validation != "split":
        raise ConfigError(
            f"validation={base.validation!r} would tune on the test set; tuning needs validation='split' "
            "(a held-out part of the training images). Drop --set validation=... ."
        )


def _tpe(seed: int | None):
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # multivariate + group model the conditional parameters jointly with their switches.
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True)


def _random(seed: int | None):
    import optuna

    return optuna.samplers.RandomSampler(seed=seed)


def _qmc(seed: int | None):
    import optuna

    return optuna.samplers.QMCSampler(seed=seed, warn_independent_sampling=False)


def _median(epochs: int):
    import optuna

    # Prune from the second epoch on, once three trials have set a median.
    return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)


def _hyperband(epochs: int):
    import optuna

    return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs, reduction_factor=3)


def _no_pruning(epochs: int):
    import optuna

    return optuna.pruners.NopPruner()


SAMPLERS: Registry[Callable[[int | None], Any]] = Registry("sampler", {"tpe": _tpe, "random": _random, "qmc": _qmc})
PRUNERS: Registry[Callable[[int], Any]] = Registry("pruner", {"median": _median, "hyperband": _hyperband,
                                                               "none": _no_pruning})


def build_sampler(name: str, seed: int | None = None):
    """Sampler by name; an unknown name raises ValueError listing the known ones."""
    return SAMPLERS[name](seed)


def build_pruner(name: str, epochs: int):
    """Pruner by name (``epochs`` is the budget of a full trial); unknown names raise ValueError."""
    return PRUNERS[name](epochs)
