"""Turn a free-hand drawing into an image the way MNIST digits were made.

MNIST's recipe (LeCun et al.): the digit's bounding box is scaled, keeping its aspect ratio, so its longer
side is 20 pixels (with anti-aliasing), then it is placed in a 28x28 field so that its intensity-weighted
centre of mass sits at the field's centre. Measured on the MNIST test set the centre of mass lies at
(14.0, 14.0) in pixel-index coordinates with a spread of +-0.3, i.e. whole-pixel shifts; we do the same.

Pure NumPy, so the web app's preprocessing is the one tested here.
"""

from __future__ import annotations

import numpy as np

FIELD_SIZE = 28  # MNIST images are 28x28
BOX_SIZE = 20  # the digit's longer side after scaling
CENTER = (14.0, 14.0)  # where MNIST puts the centre of mass (row, column), measured on the test set
INK_THRESHOLD = 0.05  # pixels brighter than this count as ink for the bounding box; lighter is paper noise


def area_resize_matrix(source_size: int, target_size: int) -> np.ndarray:
    """(target_size, source_size) matrix averaging source pixels by their overlap with each target pixel.

    Shrinking averages (anti-aliasing, like MNIST's resampling); enlarging repeats pixels.
    """
    if source_size < 1 or target_size < 1:
        raise ValueError(f"sizes must be >= 1, got source_size={source_size}, target_size={target_size}.")
    scale = source_size / target_size
    starts = np.arange(target_size) * scale
    ends = starts + scale
    source_starts = np.arange(source_size)
    overlap = np.clip(
        np.minimum(ends[:, None], source_starts[None, :] + 1) - np.maximum(starts[:, None], source_starts[None, :]),
        0.0, None,
    )
    return overlap / overlap.sum(axis=1, keepdims=True)


def area_resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """``image`` (2-D) resampled to ``height`` x ``width`` by area averaging."""
    rows = area_resize_matrix(image.shape[0], height)
    columns = area_resize_matrix(image.shape[1], width)
    return rows @ image @ columns.T


def center_of_mass(image: np.ndarray) -> tuple[float, float]:
    """Intensity-weighted (row, column) centre of a 2-D image; the middle of the image if it is blank."""
    total = float(image.sum())
    if total <= 0:
        return ((image.shape[0] - 1) / 2, (image.shape[1] - 1) / 2)
    rows = np.arange(image.shape[0], dtype=np.float64)
    columns = np.arange(image.shape[1], dtype=np.float64)
    return float(image.sum(axis=1) @ rows / total), float(image.sum(axis=0) @ columns / total)


def bounding_box(image: np.ndarray, threshold: float = INK_THRESHOLD) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right) of the pixels brighter than ``threshold`` (bottom/right exclusive)."""
    ink = image > threshold
    ink_rows = np.flatnonzero(ink.any(axis=1))
    ink_columns = np.flatnonzero(ink.any(axis=0))
    if ink_rows.size == 0:
        return None
    return int(ink_rows[0]), int(ink_rows[-1]) + 1, int(ink_columns[0]), int(ink_columns[-1]) + 1


def check_drawing(image: np.ndarray) -> np.ndarray:
    """``image`` as float64 2-D in [0, 1], or ValueError saying what is wrong."""
    array = np.asarray(image, dtype=np.float64)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 2 or min(array.shape) < 1:
        raise ValueError(f"a drawing must be a 2-D array of pixels, got shape {array.shape}.")
    if not np.all(np.isfinite(array)):
        raise ValueError("a drawing must hold finite numbers; it contains NaN or infinity.")
    if array.min() < 0 or array.max() > 1:
        raise ValueError(
            f"drawing pixels must lie in [0, 1] (white ink on black, as MNIST); got values in "
            f"[{array.min():g}, {array.max():g}]. Divide 0-255 values by 255."
        )
    return array


def mnist_preprocess(drawing: np.ndarray, threshold: float = INK_THRESHOLD) -> np.ndarray:
    """A 28x28 float32 MNIST-style image of ``drawing`` (2-D, white ink on black, values in [0, 1]).

    Crop to the ink's bounding box, scale (aspect ratio kept) so the longer side is 20 pixels, rescale
    intensities so the brightest pixel is 1 (nearly every MNIST digit reaches 255), and shift by whole
    pixels so the centre of mass is at (14, 14). The shift is clamped so the digit never leaves the field.
    A blank drawing gives a blank image.
    """
    array = check_drawing(drawing)
    box = bounding_box(array, threshold)
    field = np.zeros((FIELD_SIZE, FIELD_SIZE), dtype=np.float64)
    if box is None:
        return field.astype(np.float32)
    top, bottom, left, right = box
    digit = array[top:bottom, left:right]
    height, width = digit.shape
    scale = BOX_SIZE / max(height, width)
    new_height = max(1, min(BOX_SIZE, round(height * scale)))
    new_width = max(1, min(BOX_SIZE, round(width * scale)))
    scaled = area_resize(digit, new_height, new_width)
    if scaled.max() > 0:
        scaled = scaled / scaled.max()
    center_row, center_column = center_of_mass(scaled)
    # Whole-pixel offsets that put the centre of mass on CENTER, kept inside the field.
    row = int(np.clip(round(CENTER[0] - center_row), 0, FIELD_SIZE - new_height))
    column = int(np.clip(round(CENTER[1] - center_column), 0, FIELD_SIZE - new_width))
    field[row:row + new_height, column:column + new_width] = scaled
    return np.clip(field, 0.0, 1.0).astype(np.float32)
