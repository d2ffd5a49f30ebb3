"""Augmentation with ImageDataGenerator's semantics, as one batched TensorFlow op.

The seed uses ``ImageDataGenerator(rotation_range=10, width_shift_range=0.1, height_shift_range=0.1,
zoom_range=0.1, shear_range=0.1)``. Per image it draws a rotation (degrees), two shifts (fractions of the
image size), a shear (degrees, so 0.1 is a tenth of a degree) and independent x/y zooms, composes one
affine matrix about the image centre and resamples once, bilinearly, extending edge pixels. This module
does the same maths in a single ``ImageProjectiveTransformV3`` call per batch, so it runs inside the
``tf.data`` pipeline instead of in Python per image, and draws from stateless seeds so that a run
resumed at epoch k sees exactly the images an uninterrupted run would have seen.

Keras backends other than TensorFlow (JAX on a GPU machine without TensorFlow, say) get the same maths in
NumPy: ``numpy_augment_batch`` resamples exactly as the TensorFlow op does (to float rounding), drawing
from NumPy generators seeded the same way. The packed trainer (``packed.py``) resamples on the device with
``jax_apply_transforms``, the same arithmetic in JAX. TensorFlow and JAX are imported only by their functions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType

import numpy as np


@dataclass(frozen=True)
class AugmentationParams:
    """Strengths in ImageDataGenerator's units."""

    rotation_range: float = 10.0
    width_shift_range: float = 0.1
    height_shift_range: float = 0.1
    zoom_range: float = 0.1
    shear_range: float = 0.1

    @classmethod
    def from_config(cls, config) -> AugmentationParams:
        return cls(
            rotation_range=config.rotation_range,
            width_shift_range=config.width_shift_range,
            height_shift_range=config.height_shift_range,
            zoom_range=config.zoom_range,
            shear_range=config.shear_range,
        )


def affine_transforms(theta, tx, ty, shear, zx, zy, height: int, width: int, xp: ModuleType | None = None):
    """ImageDataGenerator's matrix (rotation @ shift @ shear @ zoom about the centre) as (B, 8) rows.

    Angles are in degrees. Like ImageDataGenerator since Keras 2.4, the matrix acts on (x, y) = (column,
    row) coordinates, so ``tx`` (drawn from height_shift_range) moves columns; at 28x28 with equal
    ranges that is symmetric. Each row maps an output pixel to the input point it samples from.
    ``xp`` is the array module the inputs belong to: ``tensorflow`` (the default) or ``numpy``.
    """
    if xp is None:
        import tensorflow as xp
    theta = theta * (math.pi / 180.0)
    shear = shear * (math.pi / 180.0)
    cos_t, sin_t = xp.cos(theta), xp.sin(theta)
    sin_s, cos_s = xp.sin(shear), xp.cos(shear)
    # L = R @ Sh @ Z; translation t = R @ (tx, ty).
    l00 = cos_t * zx
    l01 = (-cos_t * sin_s - sin_t * cos_s) * zy
    l10 = sin_t * zx
    l11 = (-sin_t * sin_s + cos_t * cos_s) * zy
    t0 = cos_t * tx - sin_t * ty
    t1 = sin_t * tx + cos_t * ty
    # About the centre, as transform_matrix_offset_center does (o = size / 2 - 0.5).
    o_x = width / 2 - 0.5
    o_y = height / 2 - 0.5
    a2 = t0 + o_x - (l00 * o_x + l01 * o_y)
    b2 = t1 + o_y - (l10 * o_x + l11 * o_y)
    zeros = xp.zeros_like(l00)
    return xp.stack([l00, l01, a2, l10, l11, b2, zeros, zeros], axis=1)


def random_transforms(seed, batch: int, height: int, width: int, params: AugmentationParams):
    """Draw one transform per image from stateless ``seed`` (shape (2,), int)."""
    import tensorflow as tf

    u = tf.random.stateless_uniform([batch, 6], seed=seed, minval=-1.0, maxval=1.0, dtype=tf.float32)
    return _transforms_from_uniform(u, height, width, params, tf)


def _transforms_from_uniform(u, height: int, width: int, params: AugmentationParams, xp: ModuleType):
    """Scale (B, 6) uniform draws in [-1, 1) to ImageDataGenerator's ranges and build the matrices."""
    theta = u[:, 0] * params.rotation_range
    tx = u[:, 1] * params.height_shift_range * height
    ty = u[:, 2] * params.width_shift_range * width
    shear = u[:, 3] * params.shear_range
    zx = 1.0 + u[:, 4] * params.zoom_range
    zy = 1.0 + u[:, 5] * params.zoom_range
    return affine_transforms(theta, tx, ty, shear, zx, zy, height, width, xp=xp)


def apply_transforms(images, transforms):
    """Resample (B, H, W, C) ``images`` bilinearly, extending edge pixels (fill_mode='nearest')."""
    import tensorflow as tf

    shape = tf.shape(images)
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images,
        transforms=tf.cast(transforms, tf.float32),
        output_shape=shape[1:3],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="NEAREST",
    )


def augment_batch(images, seed, params: AugmentationParams):
    """Augment a batch of (B, 28, 28, 1) float images with stateless ``seed`` (TensorFlow tensors)."""
    import tensorflow as tf

    height, width = int(images.shape[1]), int(images.shape[2])
    transforms = random_transforms(seed, tf.shape(images)[0], height, width, params)
    return apply_transforms(images, transforms)


def numpy_random_transforms(seed: tuple[int, int], batch: int, height: int, width: int,
                            params: AugmentationParams) -> np.ndarray:
    """``random_transforms`` for NumPy: the same ranges, drawn from ``default_rng(seed)``.

    The draws follow the same distribution as the TensorFlow path but are a different random stream.
    """
    rng = np.random.default_rng([int(value) for value in seed])
    u = rng.uniform(-1.0, 1.0, size=(batch, 6)).astype(np.float32)
    return _transforms_from_uniform(u, height, width, params, np).astype(np.float32)


def _bilinear_sample(xp, images, transforms, index_dtype):
    """Each output pixel (x, y) samples the input at (a0 x + a1 y + a2, b0 x + b1 y + b2); fill_mode 'nearest'
    clamps that point into [0, size - 1], then bilinear interpolation weighs the four pixels around it (a
    neighbour past the last row or column has weight 0). ``xp`` is NumPy or ``jax.numpy``: one arithmetic for
    both paths."""
    images = xp.asarray(images, dtype=xp.float32)
    batch, height, width, _ = images.shape
    m = xp.asarray(transforms, dtype=xp.float32)[:, :6, None, None]
    y_out, x_out = xp.meshgrid(xp.arange(height, dtype=xp.float32), xp.arange(width, dtype=xp.float32),
                               indexing="ij")
    x = xp.clip(m[:, 0] * x_out + m[:, 1] * y_out + m[:, 2], 0.0, width - 1.0)
    y = xp.clip(m[:, 3] * x_out + m[:, 4] * y_out + m[:, 5], 0.0, height - 1.0)
    x0, y0 = xp.floor(x), xp.floor(y)
    wx, wy = (x - x0)[..., None], (y - y0)[..., None]
    x0, y0 = x0.astype(index_dtype), y0.astype(index_dtype)
    x1, y1 = xp.minimum(x0 + 1, width - 1), xp.minimum(y0 + 1, height - 1)
    b = xp.arange(batch)[:, None, None]
    top = (1 - wx) * images[b, y0, x0] + wx * images[b, y0, x1]
    bottom = (1 - wx) * images[b, y1, x0] + wx * images[b, y1, x1]
    return (1 - wy) * top + wy * bottom


def numpy_apply_transforms(images: np.ndarray, transforms: np.ndarray) -> np.ndarray:
    """``apply_transforms`` in NumPy, with ``ImageProjectiveTransformV3``'s arithmetic (``_bilinear_sample``)."""
    return _bilinear_sample(np, images, transforms, np.intp).astype(np.float32)


def numpy_augment_batch(images: np.ndarray, seed: tuple[int, int], params: AugmentationParams) -> np.ndarray:
    """``augment_batch`` for NumPy arrays (used when Keras runs on a backend other than TensorFlow)."""
    transforms = numpy_random_transforms(seed, len(images), images.shape[1], images.shape[2], params)
    return numpy_apply_transforms(images, transforms)


def jax_apply_transforms(images, transforms):
    """``numpy_apply_transforms`` in JAX (jit- and vmap-able): the packed trainer augments on the device.

    ``images`` (B, H, W, C) and ``transforms`` (B, 8) are JAX (or NumPy) arrays; the result equals the
    TensorFlow op and the NumPy path to float rounding (tested).
    """
    import jax.numpy as jnp

    return _bilinear_sample(jnp, images, transforms, jnp.int32)


def jax_transforms_from_uniform(u, height: int, width: int, params: AugmentationParams):
    """(B, 8) matrices from (B, 6) uniform draws in [-1, 1), in JAX; ``params`` fields may be traced scalars."""
    import jax.numpy as jnp

    return _transforms_from_uniform(jnp.asarray(u, jnp.float32), height, width, params, jnp)


def image_data_generator(params: AugmentationParams):
    """The seed's own ``ImageDataGenerator`` with these strengths (reference for tests and benchmarks)."""
    import tensorflow as tf

    return tf.keras.preprocessing.image.ImageDataGenerator(
        rotation_range=params.rotation_range,
        width_shift_range=params.width_shift_range,
        height_shift_range=params.height_shift_range,
        zoom_range=params.zoom_range,
        shear_range=params.shear_range,
    )
