"""Named ablation studies: each arm is a small override of the seed's recipe. Adding an arm is one line."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from mnist_ablation.config import BASELINE, TrainConfig

# The four components of the seed's recipe that the ablations switch, as "off" overrides.
COMPONENTS_OFF = {
    "augmentation": {"augmentation": False},
    "batch_norm": {"batch_norm": False},
    "dropout": {"dropout": False},
    "lr_schedule": {"lr_schedule": "constant"},
}
ALL_OFF = BASELINE.replace(**{k: v for off in COMPONENTS_OFF.values() for k, v in off.items()})


@dataclass(frozen=True)
class Study:
    """A question ("which part matters?") and the arms that answer it."""

    name: str
    description: str
    arms: dict[str, TrainConfig]
    baseline_arm: str = "baseline"

    def arm(self, name: str) -> TrainConfig:
        if name not in self.arms:
            raise ValueError(f"unknown arm {name!r} in study {self.name!r}; known arms: {', '.join(self.arms)}.")
        return self.arms[name]


def _factorial_arms() -> dict[str, TrainConfig]:
    arms = {}
    for switches in itertools.product((True, False), repeat=len(COMPONENTS_OFF)):
        overrides, off_names = {}, []
        for (component, off), on in zip(COMPONENTS_OFF.items(), switches):
            if not on:
                overrides.update(off)
                off_names.append(component)
        name = "baseline" if not off_names else "no_" + "+".join(off_names)
        arms[name] = BASELINE.replace(**overrides)
    return arms


STUDIES: dict[str, Study] = {
    study.name: study
    for study in (
        Study(
            "leave-one-out",
            "Which component of the seed's recipe matters? Each arm switches off exactly one of augmentation, "
            "batch norm, dropout and the step LR schedule; the baseline is the full recipe.",
            {
                "baseline": BASELINE,
                "no_augmentation": BASELINE.replace(augmentation=False),
                "no_batch_norm": BASELINE.replace(batch_norm=False),
                "no_dropout": BASELINE.replace(dropout=False),
                "constant_lr": BASELINE.replace(lr_schedule="constant"),
            },
        ),
        Study(
            "add-one-in",
            "How much does each component give on its own? From everything off (the 'baseline' of this study), "
            "each arm switches on exactly one component.",
            {
                "baseline": ALL_OFF,
                "augmentation_only": ALL_OFF.replace(augmentation=True),
                "batch_norm_only": ALL_OFF.replace(batch_norm=True),
                "dropout_only": ALL_OFF.replace(dropout=True),
                "step_lr_only": ALL_OFF.replace(lr_schedule="step"),
            },
        ),
        Study(
            "factorial",
            "Do the components interact? All 16 on/off combinations of augmentation, batch norm, dropout and the "
            "step LR schedule, for main effects and two-way interactions.",
            _factorial_arms(),
        ),
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
    )
}
DEFAULT_STUDY = "leave-one-out"


def get_study(name: str) -> Study:
    """The study called ``name``; an unknown name raises ValueError listing the known ones."""
    if name not in STUDIES:
        raise ValueError(f"unknown study {name!r}; known studies: {', '.join(STUDIES)}.")
    return STUDIES[name]
