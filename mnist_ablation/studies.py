"""Named ablation studies: each arm is a small override of the seed's recipe. Adding an arm is one line.

A study is a question ("which part matters?") and the arms that answer it; its cells are (arm, seed)
pairs (``sweep.Cell``). Everything here is plain data over ``TrainConfig``: the report, the explorer, the doctor and the
command layer all read the same definitions.
"""

from __future__ import annotations

import difflib
import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from .config import BASELINE, FIELD_NAMES, ConfigError, TrainConfig, effective_settings, with_overrides
from .errors import StudyError
from .registry import Registry
from .seed_pipeline import SEED_SCRIPT

# Each component of the seed's recipe that the ablations switch: the overrides that remove it, the name of
# an arm without it (leave-one-out and factorial), of an arm with only it (add-one-in), and how the report says it.
# The factorial analysis takes its components from a study's ``factors``, so a component added here reaches it.
COMPONENTS: dict[str, dict] = {
    "augmentation": {"off": {"augmentation": False}, "removed": "no_augmentation", "alone": "augmentation_only",
                     "label": "augmentation"},
    "batch_norm": {"off": {"batch_norm": False}, "removed": "no_batch_norm", "alone": "batch_norm_only",
                   "label": "batch norm"},
    "dropout": {"off": {"dropout": False}, "removed": "no_dropout", "alone": "dropout_only", "label": "dropout"},
    "step_lr": {"off": {"lr_schedule": "constant"}, "removed": "constant_lr", "alone": "step_lr_only",
                "label": "the step LR schedule"},
}
ALL_OFF = BASELINE.replace(**{k: v for c in COMPONENTS.values() for k, v in c["off"].items()})


@dataclass(frozen=True)
class Study:
    """A question ("which part matters?") and the arms that answer it.

    ``factors`` (factorial studies only) says, per arm, which components are on: the report then analyses
    main effects and interactions instead of arm-versus-baseline comparisons.
    """

    name: str
    description: str
    arms: dict[str, TrainConfig]
    baseline_arm: str = "baseline"
    factors: dict[str, dict[str, bool]] | None = field(default=None)
    # A study of the user's own: the definition it was built from (``study_from_definition``), recorded with
    # the study in the store so that later commands rebuild it without the file. None for built-in studies.
    definition: Mapping | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.baseline_arm not in self.arms:
            raise ValueError(f"study {self.name!r}: baseline arm {self.baseline_arm!r} is not one of its arms "
                             f"{list(self.arms)}.")

    def arm(self, name: str) -> TrainConfig:
        if name not in self.arms:
            raise StudyError(f"unknown arm {name!r} in study {self.name!r}; known arms: {', '.join(self.arms)}.")
        return self.arms[name]

    def overrides(self, arm: str) -> dict:
        """The fields where ``arm`` differs from the study's baseline arm (what ``--list`` shows)."""
        base = self.arms[self.baseline_arm].to_dict()
        return {k: v for k, v in self.arms[arm].to_dict().items() if v != base[k]}


def identical_arms(configs: Mapping[str, TrainConfig]) -> list[list[str]]:
    """Groups of two or more arms that train exactly the same thing at these settings (seed aside).

    For example ``constant_lr`` and the step schedule at 5 epochs or fewer: the step schedule never steps.
    Such arms can only differ by chance, so a study flags them before training.
    """
    groups: dict[str, list[str]] = {}
    for arm, config in configs.items():
        groups.setdefault(repr(sorted(effective_settings(config).items())), []).append(arm)
    return [arms for arms in groups.values() if len(arms) > 1]


def describe_identical(configs: Mapping[str, TrainConfig], arms: list[str]) -> str:
    """Why ``arms`` (a group of ``identical_arms``) are the same run: the settings that differ but do nothing."""
    first = configs[arms[0]].to_dict()
    differing = sorted({k for arm in arms[1:] for k, v in configs[arm].to_dict().items() if first[k] != v} - {"seed"})
    epochs = configs[arms[0]].epochs
    reason = ", ".join(differing) or "no field"
    return (f"arms {', '.join(arms)} differ only in {reason}, which changes nothing at {epochs} epoch(s) "
            "(e.g. a schedule step after the last epoch); they are the same training run and can differ only by "
            "chance")


def _factorial() -> Study:
    arms, factors = {}, {}
    for switches in itertools.product((True, False), repeat=len(COMPONENTS)):
        overrides, removed = {}, []
        for component, on in zip(COMPONENTS.values(), switches):
            if not on:
                overrides.update(component["off"])
                removed.append(component["removed"])
        name = "+".join(removed) or "baseline"
        arms[name] = BASELINE.replace(**overrides)
        factors[name] = dict(zip(COMPONENTS, switches))
    return Study(
        "factorial",
        "Do the components interact? All 16 on/off combinations of augmentation, batch norm, dropout and the "
        "step LR schedule, for main effects and interactions. Arms are named by what they remove.",
        arms,
        factors=factors,
    )


STUDIES: Registry[Study] = Registry("study", plural="studies", entries={
    study.name: study
    for study in (
        Study(
            "leave-one-out",
            "Which component of the seed's recipe matters? Each arm switches off exactly one of augmentation, "
            "batch norm, dropout and the step LR schedule; the baseline is the full recipe.",
            {"baseline": BASELINE,
             **{c["removed"]: BASELINE.replace(**c["off"]) for c in COMPONENTS.values()}},
        ),
        Study(
            "add-one-in",
            "How much does each component give on its own? From everything off (the 'baseline' of this study), "
            "each arm switches on exactly one component.",
            {"baseline": ALL_OFF,
             **{c["alone"]: ALL_OFF.replace(**{k: getattr(BASELINE, k) for k in c["off"]})
                for c in COMPONENTS.values()}},
        ),
        _factorial(),
        Study(
            "dropout-strength",
            "How strong should dropout be? The seed's rates (0.25 after conv blocks, 0.5 before the classifier) "
            "against no dropout, half and 1.5x.",
            {
                "baseline": BASELINE,
                "no_dropout": BASELINE.replace(dropout=False),
                "half_dropout": BASELINE.replace(conv_dropout_rate=0.125, dense_dropout_rate=0.25),
                "strong_dropout": BASELINE.replace(conv_dropout_rate=0.375, dense_dropout_rate=0.75),
            },
        ),
        Study(
            "augmentation-strength",
            "How strong should augmentation be? The seed's magnitudes against none, half and double.",
            {
                "baseline": BASELINE,
                "no_augmentation": BASELINE.replace(augmentation=False),
                "half_augmentation": BASELINE.replace(rotation_range=5.0, width_shift_range=0.05,
                                                      height_shift_range=0.05, zoom_range=0.05, shear_range=0.05),
                "double_augmentation": BASELINE.replace(rotation_range=20.0, width_shift_range=0.2,
                                                        height_shift_range=0.2, zoom_range=0.2, shear_range=0.2),
            },
        ),
        Study(
            "lr-schedule",
            "Which learning-rate schedule? The seed's step schedule against constant, cosine and one-cycle.",
            {
                "baseline": BASELINE,
                "constant_lr": BASELINE.replace(lr_schedule="constant"),
                "cosine_lr": BASELINE.replace(lr_schedule="cosine"),
                "onecycle_lr": BASELINE.replace(lr_schedule="onecycle", learning_rate=3e-3),
            },
        ),
        Study(
            "architecture",
            "Can a stronger single model beat the seed? Wider convolutions, an extra conv block, a one-cycle "
            "schedule and An et al. 2020's pooling-free BN nets, each an override of the seed's recipe (choose on "
            "validation accuracy).",
            {
                "baseline": BASELINE,
                "wide": BASELINE.replace(conv_filters=(64, 128, 128)),
                "extra_block": BASELINE.replace(architecture="extra_block"),
                "onecycle_30_epochs": BASELINE.replace(lr_schedule="onecycle", learning_rate=3e-3, epochs=30),
                "extra_block_label_smoothing": BASELINE.replace(architecture="extra_block", label_smoothing=0.1),
                # An et al. 2020's three no-pooling BN networks (their M3, M5, M7), 20 epochs with exponential
                # decay 1e-3 -> 1e-5 and the seed's augmentation; a top-3 ensemble of one seed is their design.
                **{
                    f"no_pool_{k}x{k}": BASELINE.replace(architecture=f"no_pool_{k}x{k}", conv_filters=filters,
                                                         lr_schedule="exponential", epochs=20)
                    for k, filters in ((3, (32, 48, 64, 80, 96, 112, 128, 144, 160, 176)),
                                       (5, (32, 64, 96, 128, 160)),
                                       (7, (48, 96, 144, 192)))
                },
            },
        ),
        Study(
            "parity",
            "Is the trainer's baseline the seed's pipeline? The trainer at the seed's recipe against the seed's own "
            "code as written (Sequential, ImageDataGenerator(...).flow(batch_size=32), model.fit with its "
            "LearningRateScheduler), on the same split, subset, epochs and seeds; read it with the equivalence test.",
            {"baseline": BASELINE, SEED_SCRIPT: BASELINE.replace(pipeline=SEED_SCRIPT)},
        ),
    )
})
DEFAULT_STUDY = "leave-one-out"


# -- studies of the user's own ------------------------------------------------------------------------------

# The keys of a study definition (a user's study file, or the copy recorded with the study in the store).
DEFINITION_KEYS = ("name", "question", "description", "baseline", "arms", "components")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")  # an MLflow experiment and queue-study name part
ARM_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,99}")  # a run name part, "arm-seed0"
PER_CELL_FIELDS = ("seed",)  # set by the sweep for each cell (--seeds), never by a study


class DefinitionError(StudyError):
    """A study definition that cannot be used; ``key`` is where, e.g. ``("arms", "narrow", "dense_units")``."""

    def __init__(self, message: str, key: tuple[str, ...] = ()):
        super().__init__(message)
        self.key = tuple(key)


def _closest(name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=2)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def _table(definition: Mapping, key: str) -> dict:
    value = definition.get(key, {})
    if not isinstance(value, Mapping):
        raise DefinitionError(f"{key} must be a table ([{key}] followed by FIELD = VALUE lines), not "
                              f"{type(value).__name__} {value!r}.", (key,))
    return dict(value)


def _overrides(base: TrainConfig, overrides: Mapping, where: tuple[str, ...]) -> TrainConfig:
    """``base`` with ``overrides`` (a table of config fields), each error naming the key at fault."""
    for name, value in overrides.items():
        if name in PER_CELL_FIELDS:
            raise DefinitionError(f"{name} is set per cell by the sweep, not by a study: remove it and choose the "
                                  f"seeds with --seeds N.", (*where, name))
        if name not in FIELD_NAMES:
            raise DefinitionError(f"unknown config field {name!r}.{_closest(name, FIELD_NAMES)} The fields of "
                                  f"TrainConfig (docs/studies.md lists them): {', '.join(FIELD_NAMES)}.",
                                  (*where, name))
        if isinstance(value, Mapping):
            raise DefinitionError(f"{name} is a config field, not a table: write {name} = VALUE.", (*where, name))
    try:
        return with_overrides(base, overrides)
    except ConfigError as error:
        # The message names the field; point at its key when it is one of this table's.
        culprit = next((name for name in overrides if str(error).startswith((f"{name}=", f"{name} "))), None)
        raise DefinitionError(str(error), (*where, culprit) if culprit else where) from None


def _check_name(kind: str, name: object, pattern: re.Pattern, where: tuple[str, ...], example: str) -> str:
    if not isinstance(name, str) or not pattern.fullmatch(name):
        raise DefinitionError(f"{kind} {name!r} is not a usable name: use letters, digits and _ . - (up to 100, "
                              f"starting with a letter or digit), e.g. {example!r}.", where)
    return name


def study_from_definition(definition: Mapping) -> Study:
    """A study of the user's own from its definition (a parsed study file, or the copy a study recorded).

    ``name`` and ``question`` are required; ``[baseline]`` holds overrides of the seed's recipe that every arm
    shares; each ``[arms.NAME]`` the overrides of one arm on top of the baseline (the baseline arm is always
    ``baseline``); or, instead of arms, ``[components.NAME]`` tables hold the overrides that switch a component
    off, and the study is their full factorial (arms named by what they remove, ``no_a+no_b``). Everything is
    checked before anything runs: an unknown key or field, a bad value, an arm that is empty, repeats another or
    the baseline, a name taken by a built-in study; each error is a DefinitionError naming the key.
    """
    if not isinstance(definition, Mapping):
        raise DefinitionError(f"a study definition is a table of {', '.join(DEFINITION_KEYS)}, not "
                              f"{type(definition).__name__}.")
    for key in definition:
        if key not in DEFINITION_KEYS:
            raise DefinitionError(f"unknown key {key!r}.{_closest(key, DEFINITION_KEYS)} A study file has "
                                  f"{', '.join(DEFINITION_KEYS)} (docs/studies.md).", (key,))
    for key in ("name", "question"):
        if not isinstance(definition.get(key), str) or not definition[key].strip():
            raise DefinitionError(f"{key} is required: a non-empty string, e.g. "
                                  + ('name = "my-study"' if key == "name" else
                                     'question = "Does a narrower dense layer cost accuracy?"') + ".", (key,))
    name = _check_name("study name", definition["name"], NAME_PATTERN, ("name",), "my-study")
    if name in STUDIES:
        raise DefinitionError(f"name {name!r} is a built-in study's; choose another name (built-in studies: "
                              f"{', '.join(STUDIES.names)}).", ("name",))
    description = definition.get("description", "")
    if not isinstance(description, str):
        raise DefinitionError(f"description must be a string, not {description!r}.", ("description",))
    baseline = _overrides(BASELINE, _table(definition, "baseline"), ("baseline",))
    arm_tables, component_tables = _table(definition, "arms"), _table(definition, "components")
    if arm_tables and component_tables:
        raise DefinitionError("a study has either [arms.NAME] tables or [components.NAME] tables (a factorial "
                              "study), not both: keep one kind.", ("components",))
    if not arm_tables and not component_tables:
        raise DefinitionError("no arms: add at least one [arms.NAME] table of overrides (e.g. [arms.narrow_dense] "
                              "then dense_units = 128), or [components.NAME] tables for a factorial study.", ("arms",))
    kind = "arms" if arm_tables else "components"
    changes = {}
    for entry, overrides in (arm_tables or component_tables).items():
        where = (kind, entry)
        _check_name(kind[:-1], entry, ARM_PATTERN, where, "narrow_dense")
        if entry == "baseline":
            raise DefinitionError("the baseline arm is always `baseline`, built from [baseline]: rename this arm, "
                                  "or move its overrides into [baseline].", where)
        if not isinstance(overrides, Mapping):
            raise DefinitionError(f"{kind}.{entry} must be a table of config overrides ([{kind}.{entry}] then "
                                  "FIELD = VALUE lines).", where)
        if not overrides:
            raise DefinitionError(f"{kind[:-1]} {entry!r} is empty: it would train the baseline again. Give it the "
                                  f"config fields it changes (e.g. dense_units = 128) or remove it.", where)
        config = _overrides(baseline, overrides, where)
        if config == baseline:
            raise DefinitionError(f"{kind[:-1]} {entry!r} sets every field to the baseline's value: it would train "
                                  "the baseline again. Change a value or remove it.", where)
        twin = next((other for other, seen in changes.items() if seen[1] == config), None)
        if twin is not None:
            raise DefinitionError(f"{kind[:-1]} {entry!r} has the same config as {twin!r}: one of them is a "
                                  "duplicate. Remove it or change a value.", where)
        changes[entry] = (dict(overrides), config)
    factors = None
    if kind == "arms":
        arms = {"baseline": baseline, **{arm: config for arm, (_, config) in changes.items()}}
    else:
        if len(changes) < 2:
            raise DefinitionError("a factorial study needs at least two [components.NAME] tables (one component "
                                  "is an arm: use [arms.NAME] instead).", ("components",))
        arms, factors = {}, {}
        for switches in itertools.product((True, False), repeat=len(changes)):
            overrides, removed = {}, []
            for (component, (off, _)), on in zip(changes.items(), switches):
                if not on:
                    overrides.update(off)
                    removed.append(f"no_{component}")
            arm = "+".join(removed) or "baseline"
            arms[arm] = _overrides(baseline, overrides, ("components",))
            factors[arm] = dict(zip(changes, switches))
    question = definition["question"].strip()
    recorded = {"name": name, "question": question, "description": description,
                "baseline": _table(definition, "baseline"), kind: {k: v for k, (v, _) in changes.items()}}
    return Study(name, f"{question} {description}".strip(), arms, factors=factors,
                 definition=_plain(recorded))


def _plain(value):
    """The definition as JSON-able plain data (TOML's tables and arrays become dicts and lists)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def baseline_arm_of(study: str, definition: Mapping | None) -> str:
    """The baseline arm of ``study``: as its ``study.json`` (``definition``) records it, else the built-in study's,
    else ``baseline``. What the report compares with and the explorer offers first."""
    if definition and definition.get("baseline_arm"):
        return definition["baseline_arm"]
    return STUDIES[study].baseline_arm if study in STUDIES else "baseline"


def get_study(name: str) -> Study:
    """The built-in study called ``name``; an unknown name raises UnknownNameError listing the known ones.

    A study a ``--study-file`` recorded in the tracking store is ``store.get_study``'s (this module reads no store).
    """
    return STUDIES[name]
