"""Named ablation studies: each arm is a small override of the seed's recipe. Adding an arm is one line.

A study is a question ("which part matters?") and the arms that answer it; its cells are (arm, seed)
pairs (``sweep.Cell``). Everything here is plain data over ``TrainConfig``: the report, the explorer, the doctor and the
command layer all read the same definitions.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field

from .config import BASELINE, TrainConfig, effective_settings
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


def get_study(name: str) -> Study:
    """The study called ``name``; an unknown name raises ValueError listing the known ones."""
    return STUDIES[name]
