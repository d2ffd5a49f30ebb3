"""Augmentation with ImageDataGenerator's semantics, as one batched TensorFlow op.

The seed uses ``ImageDataGenerator(rotation_range=10, width_shift_range=0.1, height_shift_range=0.1,
zoom_range=0.1, shear_range=0.1)``. Per image it draws a rotation (degrees), two shifts (fractions of the
image size), a shear (degrees, so 0.1 is a tenth of a degree) and independent x/y zooms, composes one
affine matrix about the image centre and resamples once, bilinearly, extending edge pixels. This module
does the same maths in a single ``ImageProjectiveTransformV3`` call per batch, so it runs inside the
``tf.data`` pipeline instead of in Python per image, and draws from stateless seeds so that a run
resumed at epoch k sees exactly the images an uninterrupted run would have seen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import tensorflow as tf


@dataclass(frozen=True)
class AugmentationParams:
    """Strengths in ImageDataGenerator's units."""

    rotation_range: float = 10.0
    width_shift_range: float = 0.1
    height_shift_range: float = 0.1
    zoom_range: float = 0.1
    shear_range: float = 0.1

    @classmethod
    def from_config(cls, config) -> "AugmentationParams":
        return cls(
            rotation_range=config.rotation_range,
            width_shift_range=config.width_shift_range,
            height_shift_range=config.height_shift_range,
            zoom_range=config.zoom_range,
            shear_range=config.shear_range,
        )


def affine_transforms(theta, tx, ty, shear, zx, zy, height: int, width: int) -> tf.Tensor:
    """ImageDataGenerator's matrix (rotation @ shift @ shear @ zoom about the centre) as (B, 8) rows.

    Angles are in degrees. Like ImageDataGenerator since Keras 2.4, the matrix acts on (x, y) = (column,
    row) coordinates, so ``tx`` (drawn from height_shift_range) moves columns; at 28x28 with equal
    ranges that is symmetric. Each row maps an output pixel to the input point it samples from.
    """
    theta = theta * (math.pi / 180.0)
    shear = shear * (math.pi / 180.0)
    cos_t, sin_t = tf.cos(theta), tf.sin(theta)
    sin_s, cos_s = tf.sin(shear), tf.cos(shear)
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
    zeros = tf.zeros_like(l00)
    return tf.stack([l00, l01, a2, l10, l11, b2, zeros, zeros], axis=1)


def random_transforms(seed: tf.Tensor, batch: int, height: int, width: int,
                      params: AugmentationParams) -> tf.Tensor:
    """Draw one transform per image from stateless ``seed`` (shape (2,), int)."""
    u = tf.random.stateless_uniform([batch, 6], seed=seed, minval=-1.0, maxval=1.0, dtype=tf.float32)
    theta = u[:, 0] * params.rotation_range
    tx = u[:, 1] * params.height_shift_range * height
    ty = u[:, 2] * params.width_shift_range * width
    shear = u[:, 3] * params.shear_range
    zx = 1.0 + u[:, 4] * params.zoom_range
    zy = 1.0 + u[:, 5] * params.zoom_range
    return affine_transforms(theta, tx, ty, shear, zx, zy, height, width)


def apply_transforms(images: tf.Tensor, transforms: tf.Tensor) -> tf.Tensor:
    """Resample (B, H, W, C) ``images`` bilinearly, extending edge pixels (fill_mode='nearest')."""
    shape = tf.shape(images)
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images,
        transforms=tf.cast(transforms, tf.float32),
        output_shape=shape[1:3],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="NEAREST",
    )


def augment_batch(images: tf.Tensor, seed: tf.Tensor, params: AugmentationParams) -> tf.Tensor:
    """Augment a batch of (B, 28, 28, 1) float images with stateless ``seed``."""
    height, width = int(images.shape[1]), int(images.shape[2])
    transforms = random_transforms(seed, tf.shape(images)[0], height, width, params)
    return apply_transforms(images, transforms)


def image_data_generator(params: AugmentationParams):
    """The seed's own ``ImageDataGenerator`` with these strengths (reference for tests and benchmarks)."""
    return tf.keras.preprocessing.image.ImageDataGenerator(
        rotation_range=params.rotation_range,
        width_shift_range=params.width_shift_range,
        height_shift_range=params.height_shift_range,
        zoom_range=params.zoom_range,
        shear_range=params.shear_range,
    )
