"""Every path of the speed benchmark trains the seed's model on the seed's augmentation (not how fast)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from benchmarks.speed import PATHS, RUNNERS, training_flops_per_image
from mnist_ablation.augment import AugmentationParams, image_data_generator
from mnist_ablation.config import BASELINE
from mnist_ablation.model import seed_sequential_model
from mnist_ablation.train import build_dataset

from helpers import command_env, run_module

SEED_PARAMETERS = 469_578
SPEED_FIELDS = {"steps_per_execution", "threads"}  # may change how fast, never what is computed
TRAINER_PATHS = [name for name, path in PATHS.items() if path.runner == "trainer"]


def _layer_signature(model):
    return [
        (type(layer).__name__, tuple(layer.output.shape[1:]), layer.count_params())
        for layer in model.layers
        if type(layer).__name__ != "InputLayer"  # a Functional model lists its input, a Sequential does not
    ]


@pytest.fixture(scope="module")
def runners(mnist):
    return {name: RUNNERS[path.runner](mnist, path) for name, path in PATHS.items()}


@pytest.mark.parametrize("name", list(PATHS))
def test_every_path_builds_the_seed_model(runners, name):
    model = runners[name].build_model()
    assert model.count_params() == SEED_PARAMETERS
    assert _layer_signature(model) == _layer_signature(seed_sequential_model())
    assert runners[name].batch_size == 32


@pytest.mark.parametrize("name", TRAINER_PATHS)
def test_trainer_paths_change_only_speed_fields(runners, name):
    assert set(PATHS[name].overrides) <= SPEED_FIELDS, (
        f"path {name!r} overrides {sorted(PATHS[name].overrides)}; only {sorted(SPEED_FIELDS)} leave the "
        "computation unchanged"
    )
    config = runners[name].config
    assert config.augmentation and config.batch_size == 32
    assert (config.rotation_range, config.width_shift_range, config.height_shift_range,
            config.zoom_range, config.shear_range) == (10.0, 0.1, 0.1, 0.1, 0.1)


def test_training_flops_are_counted_from_the_layers():
    # Conv 26x26x32x9x1 + 24x24x64x9x32 + 10x10x64x9x64, Dense 1600x256 + 256x10, 2 FLOPs per MAC, x3.
    expected = 3 * 2 * (26 * 26 * 32 * 9 + 24 * 24 * 64 * 9 * 32 + 10 * 10 * 64 * 9 * 64 + 1600 * 256 + 2560)
    assert training_flops_per_image(seed_sequential_model()) == expected
    assert abs(expected / 1e6 - 89.5) < 0.05


# ---- Augmentation statistics: ImageDataGenerator.flow against build_dataset, many copies of one digit.

COPIES = 1024


def _centroids(images: np.ndarray) -> np.ndarray:
    """Pixel-mass centroid (row, column) of each (N, 28, 28, 1) image."""
    mass = images[..., 0]
    total = mass.sum(axis=(1, 2))
    grid = np.arange(28, dtype=np.float64)
    rows = (mass.sum(axis=2) * grid).sum(axis=1) / total
    columns = (mass.sum(axis=1) * grid).sum(axis=1) / total
    return np.stack([rows, columns], axis=1)


def _statistics(augmented: np.ndarray, original: np.ndarray) -> dict[str, np.ndarray]:
    shift = _centroids(augmented) - _centroids(original[None])
    return {
        "row_shift": shift[:, 0],
        "column_shift": shift[:, 1],
        "mean_pixel_change": np.abs(augmented - original[None]).mean(axis=(1, 2, 3)),
        "mass_ratio": augmented.sum(axis=(1, 2, 3)) / original.sum(),
    }


def _generator_copies(image: np.ndarray) -> np.ndarray:
    generator = image_data_generator(AugmentationParams())
    images = np.repeat(image[None], COPIES, axis=0)
    labels = np.zeros((COPIES, 10), np.float32)
    batches = generator.flow(images, labels, batch_size=32, shuffle=False, seed=1)
    return np.concatenate([batches[index][0] for index in range(len(batches))])


def _dataset_copies(image: np.ndarray, config) -> np.ndarray:
    images = np.repeat(image[None], COPIES, axis=0)
    dataset = build_dataset(config.replace(epochs=1), images, np.zeros(COPIES, np.int64))
    return np.concatenate([x.numpy() for x, _ in dataset])


def _smallest_p_value(ours: dict, theirs: dict) -> float:
    return min(stats.ks_2samp(ours[key], theirs[key]).pvalue for key in ours)


@pytest.fixture(scope="module")
def digits(mnist):
    # One image per class 0, 1 and 7: round, thin and asymmetric shapes.
    return [mnist.x_train[np.flatnonzero(mnist.y_train == label)[0]] for label in (0, 1, 7)]


@pytest.fixture(scope="module")
def generator_statistics(digits):
    return [_statistics(_generator_copies(digit), digit) for digit in digits]


@pytest.mark.slow
@pytest.mark.parametrize("name", TRAINER_PATHS)
def test_dataset_augmentation_matches_image_data_generator(runners, digits, generator_statistics, name):
    config = runners[name].config
    for digit, theirs in zip(digits, generator_statistics):
        ours = _statistics(_dataset_copies(digit, config), digit)
        assert _smallest_p_value(ours, theirs) > 1e-3
        for key in ours:
            assert abs(ours[key].mean() - theirs[key].mean()) < 0.15 * theirs[key].std() + 1e-6, key


@pytest.mark.slow
def test_augmentation_statistics_detect_a_wrong_strength(digits, generator_statistics):
    # Guards the test above: twice the seed's shifts must be told apart from ImageDataGenerator's.
    stronger = BASELINE.replace(width_shift_range=0.2, height_shift_range=0.2)
    ours = _statistics(_dataset_copies(digits[0], stronger), digits[0])
    assert _smallest_p_value(ours, generator_statistics[0]) < 1e-3


# ---- The command itself, a few steps per path.


@pytest.mark.slow
def test_benchmark_command_writes_table_and_json(tmp_path, data_dir):
    output = tmp_path / "speed.json"
    completed = run_module("benchmarks.speed", "--paths", "seed,trainer", "--rounds", "1", "--steps", "4",
                           "--warmup", "2", "--output", str(output), env=command_env("sqlite:///unused.db", data_dir))
    summary = json.loads(output.read_text())
    assert [row["path"] for row in summary["paths"]] == ["seed", "trainer"]
    for row in summary["paths"]:
        assert row["parameters"] == SEED_PARAMETERS
        assert row["images_per_second"]["median"] > 0
        assert row["peak_rss_megabytes"] > 100
        assert row["rounds"][0]["timed_steps"] >= 4
    assert summary["paths"][0]["ratio_to_seed"]["median"] == pytest.approx(1.0)
    assert summary["matmul_peak_gflops"] > 0
    assert "images/s" in completed.stdout and "trainer" in completed.stdout


def test_unknown_path_is_refused():
    from benchmarks.speed import run_benchmark

    with pytest.raises(ValueError, match="known paths"):
        run_benchmark("short", ["seed", "turbo"], 1, 1, 1)
