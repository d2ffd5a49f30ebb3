"""Learning-rate schedules by name."""

import dataclasses

import pytest

from mnist_ablation.config import BASELINE
from mnist_ablation.schedules import SCHEDULES, build_schedule


def test_step_is_the_seeds_lr_scheduler():
    def seed_lr_scheduler(epoch):  # verbatim from the seed
        if epoch < 5:
            return 0.001
        elif epoch < 10:
            return 0.0005
        else:
            return 0.0001

    schedule = build_schedule(BASELINE)
    for epoch in range(15):
        assert schedule(epoch) == pytest.approx(seed_lr_scheduler(epoch), rel=1e-12)


def test_constant_and_cosine():
    assert [build_schedule(BASELINE.replace(lr_schedule="constant"))(e) for e in (0, 7, 14)] == [1e-3] * 3
    cosine = build_schedule(BASELINE.replace(lr_schedule="cosine", min_learning_rate=1e-5, epochs=10))
    assert cosine(0) == pytest.approx(1e-3) and 1e-5 < cosine(9) < 5e-5
    assert cosine(5) == pytest.approx((1e-3 + 1e-5) / 2)
    values = [cosine(e) for e in range(10)]
    assert values == sorted(values, reverse=True)


def test_onecycle_warms_up_then_decays():
    schedule = build_schedule(BASELINE.replace(lr_schedule="onecycle", learning_rate=3e-3))
    values = [schedule(e) for e in range(15)]
    peak = values.index(max(values))
    assert 0 < peak < 14 and max(values) == pytest.approx(3e-3)
    assert values[0] < values[peak] and values[-1] < values[0]


def test_every_registered_schedule_is_positive():
    for name in SCHEDULES:
        schedule = build_schedule(BASELINE.replace(lr_schedule=name))
        assert all(schedule(e) > 0 for e in range(BASELINE.epochs)), name


def test_unknown_schedule_lists_known():
    config = dataclasses.replace(BASELINE)
    object.__setattr__(config, "lr_schedule", "warmup")
    with pytest.raises(ValueError, match="unknown lr_schedule 'warmup'.*step, constant, cosine"):
        build_schedule(config)
