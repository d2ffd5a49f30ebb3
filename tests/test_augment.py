"""Our batched augmentation equals ImageDataGenerator: pixel-wise for given parameters, and in distribution."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

from mnist_ablation.augment import (
    AugmentationParams,
    affine_transforms,
    apply_transforms,
    image_data_generator,
    jax_apply_transforms,
    jax_transforms_from_uniform,
    numpy_apply_transforms,
    numpy_random_transforms,
    random_transforms,
)

# (theta degrees, tx pixels, ty pixels, shear degrees, zx, zy): single transforms, the seed's extremes,
# and strong ones, so that a wrong axis, sign or centre shows up as a large pixel error.
TRANSFORMS = [
    (0.0, 0.0, 0.0, 0.0, 1.0, 1.0),
    (10.0, 0.0, 0.0, 0.0, 1.0, 1.0),
    (0.0, 2.8, 0.0, 0.0, 1.0, 1.0),
    (0.0, 0.0, -2.8, 0.0, 1.0, 1.0),
    (0.0, 0.0, 0.0, 0.1, 1.0, 1.0),
    (0.0, 0.0, 0.0, 0.0, 1.1, 0.9),
    (-10.0, 2.8, -2.8, -0.1, 0.9, 1.1),
    (35.0, -5.5, 3.3, 20.0, 1.3, 0.8),
]


def _ours(image: np.ndarray, theta, tx, ty, shear, zx, zy, implementation: str = "tensorflow") -> np.ndarray:
    if implementation == "jax":  # the packed trainer's, on the device
        pytest.importorskip("jax")
        matrix = affine_transforms(*(np.array([value], np.float32) for value in (theta, tx, ty, shear, zx, zy)),
                                   height=28, width=28, xp=np)
        return np.asarray(jax_apply_transforms(image[None], matrix))[0]
    if implementation == "numpy":  # the path for Keras backends other than TensorFlow
        matrix = affine_transforms(*(np.array([value], np.float32) for value in (theta, tx, ty, shear, zx, zy)),
                                   height=28, width=28, xp=np)
        return numpy_apply_transforms(image[None], matrix)[0]
    matrix = affine_transforms(*(tf.constant([value], tf.float32) for value in (theta, tx, ty, shear, zx, zy)),
                               height=28, width=28)
    return apply_transforms(tf.constant(image[None]), matrix).numpy()[0]


IMPLEMENTATIONS = ["tensorflow", "numpy", "jax"]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_pixelwise_equal_to_image_data_generator(mnist, transform, implementation):
    generator = image_data_generator(AugmentationParams())
    theta, tx, ty, shear, zx, zy = transform
    for image in mnist.x_train[:5]:
        expected = generator.apply_transform(
            image, {"theta": theta, "tx": tx, "ty": ty, "shear": shear, "zx": zx, "zy": zy}
        )
        error = np.max(np.abs(_ours(image, *transform, implementation=implementation) - expected))
        assert error < 1e-4, f"transform {transform}: max abs error {error} vs ImageDataGenerator"


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_pixelwise_check_detects_a_swapped_shift(mnist, implementation):
    # Guards the test above: swapping the meaning of tx and ty must be caught.
    generator = image_data_generator(AugmentationParams())
    image = mnist.x_train[0]
    expected = generator.apply_transform(image, {"tx": 2.8, "ty": -1.0})
    swapped = _ours(image, 0.0, -1.0, 2.8, 0.0, 1.0, 1.0, implementation=implementation)
    assert np.max(np.abs(swapped - expected)) > 0.1


def test_numpy_resampling_equals_the_tensorflow_op_on_strong_random_transforms(mnist):
    # Far outside the seed's ranges, so that edge clamping and every interpolation weight are exercised.
    strong = AugmentationParams(rotation_range=60.0, width_shift_range=0.4, height_shift_range=0.4,
                                zoom_range=0.5, shear_range=30.0)
    images = mnist.x_train[:256].astype(np.float32)
    transforms = numpy_random_transforms((5, 6), len(images), 28, 28, strong)
    expected = apply_transforms(tf.constant(images), tf.constant(transforms)).numpy()
    assert np.max(np.abs(numpy_apply_transforms(images, transforms) - expected)) < 1e-5
    # Draws are reproducible from the seed and differ between seeds.
    np.testing.assert_array_equal(transforms, numpy_random_transforms((5, 6), len(images), 28, 28, strong))
    assert not np.allclose(transforms, numpy_random_transforms((5, 7), len(images), 28, 28, strong))


def test_jax_resampling_equals_the_tensorflow_op_on_strong_random_transforms(mnist):
    pytest.importorskip("jax")
    strong = AugmentationParams(rotation_range=60.0, width_shift_range=0.4, height_shift_range=0.4,
                                zoom_range=0.5, shear_range=30.0)
    images = mnist.x_train[:256].astype(np.float32)
    transforms = numpy_random_transforms((5, 6), len(images), 28, 28, strong)
    expected = apply_transforms(tf.constant(images), tf.constant(transforms)).numpy()
    assert np.max(np.abs(np.asarray(jax_apply_transforms(images, transforms)) - expected)) < 1e-5
    # The matrices built on the device from the same draws equal NumPy's (float rounding of cos/sin).
    draws = np.random.default_rng([5, 6]).uniform(-1.0, 1.0, size=(len(images), 6)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(jax_transforms_from_uniform(draws, 28, 28, strong)), transforms, atol=1e-4)


def _generator_matrices(params: AugmentationParams, count: int) -> np.ndarray:
    """Matrices for ``count`` of ImageDataGenerator's own random draws."""
    generator = image_data_generator(params)
    draws = [generator.get_random_transform((28, 28, 1), seed=index) for index in range(count)]
    columns = [tf.constant([float(draw[key]) for draw in draws], tf.float32)
               for key in ("theta", "tx", "ty", "shear", "zx", "zy")]
    return affine_transforms(*columns, height=28, width=28).numpy()


def _our_matrices(params: AugmentationParams, count: int, implementation: str = "tensorflow") -> np.ndarray:
    if implementation == "jax":  # the packed trainer: draws from the batch's NumPy generator, matrices on the device
        pytest.importorskip("jax")
        draws = np.random.default_rng([3, 4]).uniform(-1.0, 1.0, size=(count, 6)).astype(np.float32)
        return np.asarray(jax_transforms_from_uniform(draws, 28, 28, params))
    if implementation == "numpy":
        return numpy_random_transforms((3, 4), count, 28, 28, params)
    return random_transforms(tf.constant([3, 4], tf.int64), count, 28, 28, params).numpy()


def _smallest_p_value(ours: np.ndarray, theirs: np.ndarray) -> float:
    # The six entries of the affine part (rotation/shear/zoom and the two translations).
    return min(stats.ks_2samp(ours[:, entry], theirs[:, entry]).pvalue for entry in range(6))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_random_draws_match_image_data_generator_in_distribution(implementation):
    params = AugmentationParams()
    count = 3000
    theirs = _generator_matrices(params, count)
    ours = _our_matrices(params, count, implementation)
    assert _smallest_p_value(ours, theirs) > 1e-3
    # The draws cover the configured ranges: translations reach close to +-(0.1 * 28 + rotation effect).
    assert np.max(np.abs(ours[:, 2] - theirs[:, 2].mean())) > 2.5


@pytest.mark.parametrize("changed", [
    {"rotation_range": 20.0},
    {"width_shift_range": 0.2},
    {"height_shift_range": 0.2},
    {"zoom_range": 0.2},
])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_distribution_check_detects_a_wrong_range(changed, implementation):
    # Our draws with one range doubled must be told apart from ImageDataGenerator's at the seed's ranges.
    count = 3000
    theirs = _generator_matrices(AugmentationParams(), count)
    ours = _our_matrices(AugmentationParams(**changed), count, implementation)
    assert _smallest_p_value(ours, theirs) < 1e-3
