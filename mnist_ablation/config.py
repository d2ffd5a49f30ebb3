"""One frozen config holds every knob of a run; its defaults are the seed's recipe.

"Off" is a value of a field (``augmentation=False``, ``lr_schedule="constant"``), never a separate code
path, and a variant is a diff: ``dataclasses.replace(BASELINE, batch_norm=False)``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import UserError
from .model import ARCHITECTURES
from .optimizers import OPTIMIZERS, USES_WEIGHT_DECAY
from .pipelines import DEFAULT_PIPELINE, PIPELINES
from .schedules import SCHEDULES


class ConfigError(UserError, ValueError):
    """A config field has a value outside what is allowed."""


# The registries (schedules, architectures, optimizers) own their names; validation reads them from there
# without importing Keras, so a bad name fails before any heavy import or any run is created.
VALIDATION_PROTOCOLS = ("split", "test")
SPEED_FIELDS = ("steps_per_execution", "threads")
SCHEDULE_FIELDS = ("lr_schedule", "learning_rate", "lr_step_boundaries", "lr_step_factors", "min_learning_rate")
AUGMENTATION_STRENGTHS = ("rotation_range", "width_shift_range", "height_shift_range", "zoom_range", "shear_range")
DROPOUT_RATES = ("conv_dropout_rate", "dense_dropout_rate")


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of one training run. Defaults reproduce the seed exactly (except ``validation``)."""

    # Run identity.
    seed: int = 0  # seeds Python, NumPy, TensorFlow, weight init, shuffling and augmentation
    epochs: int = 15  # seed: 15
    batch_size: int = 32  # seed: datagen.flow(..., batch_size=32)

    # Data protocol.
    validation: str = "split"  # "split": stratified hold-out from train; "test": the seed's own protocol
    validation_size: int = 5000  # images held out of the 60,000 when validation="split"
    split_seed: int = 0  # fixes the hold-out split independently of `seed`, so arms share it
    train_subset: int | None = None  # train on the first N (stratified) images; None = all

    # Augmentation: ImageDataGenerator semantics (shear in degrees, zoom independent per axis).
    augmentation: bool = True
    rotation_range: float = 10.0  # degrees
    width_shift_range: float = 0.1  # fraction of width
    height_shift_range: float = 0.1  # fraction of height
    zoom_range: float = 0.1  # zoom factor drawn from [1 - z, 1 + z] per axis
    shear_range: float = 0.1  # degrees, as ImageDataGenerator reads it

    # Model.
    architecture: str = "seed"  # registry name in model.py
    conv_filters: tuple[int, ...] = (32, 64, 64)  # seed: Conv2D 32, 64, 64
    dense_units: int = 256  # seed: Dense(256)
    batch_norm: bool = True
    dropout: bool = True
    conv_dropout_rate: float = 0.25  # seed: Dropout(0.25) after each pooling
    dense_dropout_rate: float = 0.5  # seed: Dropout(0.5) before the classifier

    # Optimisation.
    optimizer: str = "adam"  # seed: optimizer='adam'
    learning_rate: float = 1e-3  # initial (peak for onecycle) learning rate; seed: 1e-3
    lr_schedule: str = "step"  # seed: 1e-3, 5e-4 at epoch 5, 1e-4 at epoch 10
    lr_step_boundaries: tuple[int, ...] = (5, 10)  # epochs where the step schedule drops
    lr_step_factors: tuple[float, ...] = (1.0, 0.5, 0.1)  # multiples of learning_rate per step
    min_learning_rate: float = 0.0  # floor for cosine/exponential; start/end scale for onecycle
    weight_decay: float = 0.0  # decoupled decay for adamw
    label_smoothing: float = 0.0

    # Evaluation.
    tta_views: int = 0  # test-time augmentation: extra augmented views averaged at test; 0 = off

    # Code path.
    pipeline: str = DEFAULT_PIPELINE  # registry name in pipelines.py: "trainer", or "seed_script" (seed's code)

    # Speed (do not change what is computed, only how fast).
    steps_per_execution: int = 16  # training steps per compiled call: same maths, less per-step overhead
    threads: int = 0  # TensorFlow intra-op threads; 0 = TensorFlow's default

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every field (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=2)

    def hash(self, extra: Mapping[str, Any] | None = None) -> str:
        """Stable short hash of the config (and ``extra``, e.g. data checksums).

        Speed-only fields (SPEED_FIELDS) are left out: they change how fast a run goes, not what it
        computes, so a study resumed with more workers or threads still recognises its finished cells.
        ``pipeline`` is left out at its default: finished cells in users' stores (and checkpoints) are found
        by this hash, and they were all trained by the trainer before the field existed, so leaving the
        default out keeps every earlier config's hash, and their resume, unchanged.
        """
        values = {k: v for k, v in self.to_dict().items() if k not in SPEED_FIELDS}
        if values["pipeline"] == DEFAULT_PIPELINE:
            del values["pipeline"]
        payload = {"config": values, "extra": dict(extra or {})}
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def replace(self, **changes: Any) -> TrainConfig:
        return with_overrides(self, changes)


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(TrainConfig))


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _unknown_field_error(name: str) -> ConfigError:
    import difflib

    close = difflib.get_close_matches(name, FIELD_NAMES, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return ConfigError(
        f"unknown config field {name!r}.{hint} Known fields: {', '.join(FIELD_NAMES)}."
    )


def _parse_bool(name: str, text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={text!r} is not a boolean; use true/false (or on/off, 1/0).")


def _parse_scalar(name: str, text: str, kind: type) -> Any:
    if kind is bool:
        return _parse_bool(name, text)
    try:
        if kind is int:
            as_float = float(text)
            if not as_float.is_integer():
                raise ValueError
            return int(as_float)
        return kind(text)
    except ValueError:
        raise ConfigError(f"{name}={text!r} is not a valid {kind.__name__}.") from None


def parse_value(name: str, text: str) -> Any:
    """Parse the text of ``--set name=text`` into the field's type."""
    types_by_name = _field_types()
    if name not in types_by_name:
        raise _unknown_field_error(name)
    hint = types_by_name[name]
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        if text.strip().lower() in ("none", "null", ""):
            return None
        (hint,) = [a for a in args if a is not type(None)]
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        parts = [p for p in text.replace("(", "").replace(")", "").split(",") if p.strip()]
        return tuple(_parse_scalar(name, p.strip(), args[0]) for p in parts)
    return _parse_scalar(name, text, hint)


def _coerce(name: str, value: Any) -> Any:
    """Accept JSON-ish values (lists for tuples, ints for floats, strings from the CLI)."""
    if isinstance(value, str) and _field_types()[name] is not str:
        return parse_value(name, value)
    if isinstance(value, list):
        return tuple(value)
    if isinstance(value, int) and not isinstance(value, bool) and _field_types()[name] is float:
        return float(value)
    return value


def with_overrides(base: TrainConfig, overrides: Mapping[str, Any]) -> TrainConfig:
    """``base`` with ``overrides`` applied; unknown fields and bad values raise ConfigError."""
    for name in overrides:
        if name not in FIELD_NAMES:
            raise _unknown_field_error(name)
    return dataclasses.replace(base, **{k: _coerce(k, v) for k, v in overrides.items()})


def parse_set_arguments(pairs: Sequence[str]) -> dict[str, Any]:
    """Turn ``["batch_norm=false", "learning_rate=3e-4"]`` into typed overrides."""
    overrides: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(
                f"--set {pair!r} is not FIELD=VALUE; for example --set batch_norm=false."
            )
        name, text = pair.split("=", 1)
        overrides[name.strip()] = parse_value(name.strip(), text.strip())
    return overrides


def from_dict(values: Mapping[str, Any]) -> TrainConfig:
    """Re-create a config from ``to_dict()`` output (e.g. a logged ``config.json``)."""
    return with_overrides(BASELINE, values)


def _check(condition: bool, name: str, value: Any, allowed: str) -> None:
    if not condition:
        raise ConfigError(f"{name}={value!r} is invalid: expected {allowed}.")


def _check_type(config: TrainConfig, name: str, hint: Any) -> None:
    value = getattr(config, name)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return
        (hint,) = [a for a in args if a is not type(None)]
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        ok = isinstance(value, tuple) and all(
            isinstance(v, args[0]) and not isinstance(v, bool) or (args[0] is float and isinstance(v, int))
            for v in value
        )
        _check(ok, name, value, f"a tuple of {args[0].__name__}")
        return
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, hint)
    _check(ok, name, value, f"a value of type {hint.__name__}")


SEED_LIMIT = 2**32  # seeds must fit in 32 bits (NumPy's and TensorFlow's seed arguments)


def validate(config: TrainConfig) -> None:
    """Raise ConfigError naming the field, the value and what is allowed."""
    for name, hint in _field_types().items():
        _check_type(config, name, hint)
    c = config
    _check(c.epochs >= 1, "epochs", c.epochs, "an integer >= 1")
    _check(c.batch_size >= 1, "batch_size", c.batch_size, "an integer >= 1")
    # NumPy and TensorFlow take 32-bit seeds: a larger one would pass here and fail once the MLflow run started.
    _check(0 <= c.seed < SEED_LIMIT, "seed", c.seed, f"an integer in [0, 2**32 - 1 = {SEED_LIMIT - 1}]")
    _check(0 <= c.split_seed < SEED_LIMIT, "split_seed", c.split_seed, f"an integer in [0, {SEED_LIMIT - 1}]")
    _check(c.validation in VALIDATION_PROTOCOLS, "validation", c.validation, f"one of {VALIDATION_PROTOCOLS}")
    _check(0 < c.validation_size < 60000, "validation_size", c.validation_size, "an integer in (0, 60000)")
    _check(
        c.train_subset is None or c.train_subset >= 10,
        "train_subset", c.train_subset, "None (all images) or an integer >= 10 (one per class)",
    )
    for name in ("rotation_range", "shear_range"):
        _check(0 <= getattr(c, name) <= 180, name, getattr(c, name), "degrees in [0, 180]")
    for name in ("width_shift_range", "height_shift_range", "zoom_range"):
        _check(0 <= getattr(c, name) < 1, name, getattr(c, name), "a fraction in [0, 1)")
    for name in ("conv_dropout_rate", "dense_dropout_rate", "label_smoothing"):
        _check(0 <= getattr(c, name) < 1, name, getattr(c, name), "a rate in [0, 1)")
    _check(c.architecture in ARCHITECTURES, "architecture", c.architecture, f"one of {ARCHITECTURES.names}")
    architecture = ARCHITECTURES[c.architecture]
    _check(
        architecture.min_conv_layers <= len(c.conv_filters) <= architecture.max_conv_layers
        and all(f >= 1 for f in c.conv_filters),
        "conv_filters", c.conv_filters, architecture.conv_layers_allowed(c.architecture),
    )
    _check(c.dense_units >= 1, "dense_units", c.dense_units, "an integer >= 1")
    _check(c.optimizer in OPTIMIZERS, "optimizer", c.optimizer, f"one of {OPTIMIZERS.names}")
    _check(0 < c.learning_rate <= 10, "learning_rate", c.learning_rate, "a float in (0, 10]")
    _check(c.lr_schedule in SCHEDULES, "lr_schedule", c.lr_schedule, f"one of {SCHEDULES.names}")
    _check(
        list(c.lr_step_boundaries) == sorted(set(c.lr_step_boundaries)) and all(b > 0 for b in c.lr_step_boundaries),
        "lr_step_boundaries", c.lr_step_boundaries, "strictly increasing positive epochs, e.g. 5,10",
    )
    _check(
        len(c.lr_step_factors) == len(c.lr_step_boundaries) + 1 and all(f > 0 for f in c.lr_step_factors),
        "lr_step_factors", c.lr_step_factors,
        f"{len(c.lr_step_boundaries) + 1} positive factors (one more than lr_step_boundaries)",
    )
    _check(
        0 <= c.min_learning_rate < c.learning_rate,
        "min_learning_rate", c.min_learning_rate, f"a float in [0, learning_rate={c.learning_rate})",
    )
    _check(0 <= c.weight_decay < 1, "weight_decay", c.weight_decay, "a float in [0, 1)")
    _check(c.tta_views >= 0, "tta_views", c.tta_views, "an integer >= 0 (0 = off)")
    _check(c.steps_per_execution >= 1, "steps_per_execution", c.steps_per_execution, "an integer >= 1")
    _check(c.threads >= 0, "threads", c.threads, "an integer >= 0 (0 = TensorFlow's default)")
    _check(c.pipeline in PIPELINES, "pipeline", c.pipeline, f"one of {PIPELINES.names}")
    _check_pipeline_fields(c)


def _check_pipeline_fields(config: TrainConfig) -> None:
    """A pipeline with fixed code (the seed's script) accepts only the seed's value of what its code fixes."""
    pipeline = PIPELINES[config.pipeline]
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}  # the seed's recipe
    for name, where in pipeline.fixed_fields.items():
        value = getattr(config, name)
        if value != defaults[name]:
            raise ConfigError(
                f"{name}={value!r} is not possible with pipeline={config.pipeline!r}: {pipeline.title} has no such "
                f"knob ({where} fixes {name}={defaults[name]!r}). Leave {name} at {defaults[name]!r}, or use "
                f"pipeline={DEFAULT_PIPELINE!r}, which has it."
            )


def effective_settings(config: TrainConfig) -> dict[str, Any]:
    """What a run of ``config`` actually trains with, for telling arms apart (seed and speed fields left out).

    Settings that cannot matter are dropped: the schedule's fields become the learning rate of each epoch
    (``constant`` and ``step`` are the same run when training ends before the first step), augmentation
    strengths without augmentation, dropout rates without dropout, weight decay without an optimizer that
    uses it, dense and dropout fields for architectures without them.
    """
    from .schedules import build_schedule

    settings = {k: v for k, v in config.to_dict().items() if k not in (*SPEED_FIELDS, "seed", *SCHEDULE_FIELDS)}
    schedule = build_schedule(config)
    settings["learning_rate_per_epoch"] = [schedule(epoch) for epoch in range(config.epochs)]
    ignored = []
    if not config.augmentation:
        ignored += AUGMENTATION_STRENGTHS
    if not config.dropout:
        ignored += DROPOUT_RATES
    if config.optimizer not in USES_WEIGHT_DECAY:
        ignored.append("weight_decay")
    if not ARCHITECTURES[config.architecture].uses_dense_and_dropout:
        ignored += ["dense_units", "dropout", *DROPOUT_RATES]
    for name in ignored:
        settings.pop(name, None)
    return settings


# Fields that may differ between the members of one pack (``packed.train_pack``): the packed step reads them per
# member (seed: weights, data order, augmentation and dropout draws; augmentation and its strengths; the
# learning-rate schedule, set per member every epoch), or only the evaluation reads them (tta_views); the speed
# fields are the pack's. Every other field is a Python constant of the compiled graph (layers, dropout rates,
# loss, optimizer and its weight decay) or fixes the data every member walks (split, subset, batch size, epochs),
# so it must be equal across a pack.
PACK_MEMBER_FIELDS = ("seed", "augmentation", *AUGMENTATION_STRENGTHS, *SCHEDULE_FIELDS, "tta_views", *SPEED_FIELDS)


def pack_signature(config: TrainConfig) -> str:
    """Configs with the same signature can train in one pack: every field but PACK_MEMBER_FIELDS is equal."""
    shared = {k: v for k, v in config.to_dict().items() if k not in PACK_MEMBER_FIELDS}
    return hashlib.sha256(json.dumps(shared, sort_keys=True).encode()).hexdigest()[:16]


def pack_group_key(config: TrainConfig, pack: int) -> str | None:
    """The key that groups ``config``'s cell with others into packs of ``pack``: its ``pack_signature``, or None
    where it trains alone (``pack`` is 1, or its pipeline is not the trainer's: the seed script never packs)."""
    return pack_signature(config) if pack > 1 and config.pipeline == DEFAULT_PIPELINE else None


def check_packable(configs: Sequence[TrainConfig]) -> None:
    """Raise ConfigError naming the first field that differs between ``configs`` and cannot differ in a pack."""
    if not configs:
        raise ConfigError("a pack needs at least one config; got none.")
    first = configs[0].to_dict()
    for config in configs[1:]:
        for name, value in config.to_dict().items():
            if name not in PACK_MEMBER_FIELDS and value != first[name]:
                raise ConfigError(
                    f"{name}={value!r} differs from {first[name]!r} within one pack: only "
                    f"{', '.join(PACK_MEMBER_FIELDS)} may differ between members. Train these configs in "
                    "separate packs (group them by config.pack_signature)."
                )
    if configs[0].pipeline != DEFAULT_PIPELINE:
        raise ConfigError(f"pipeline={configs[0].pipeline!r} cannot be packed: only pipeline={DEFAULT_PIPELINE!r} "
                          "(the trainer) trains in packs. Use --pack 1 for it.")


BASELINE = TrainConfig()  # the seed's recipe
