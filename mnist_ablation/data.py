"""MNIST from a local directory (IDX, gzip or not, or Keras' mnist.npz) with SHA-256 checks.

With no directory, Keras' own download is used (needs internet). The images come back exactly as the
seed prepares them: float32, shape (N, 28, 28, 1), scaled to [0, 1]; labels are integer classes.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError

DATA_DIR_ENV = "MNIST_DATA_DIR"
KERAS_DOWNLOAD_SOURCE = "keras-download"  # Mnist.source when Keras downloaded the data

# SHA-256 of the uncompressed IDX files, as published with MNIST (and shipped in SHA256SUMS.uncompressed).
IDX_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
# SHA-256 of Keras' https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz
NPZ_SHA256 = "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1"
NUM_CLASSES = 10
# Shapes of the IDX files (which bound how far a corrupted gzip stream is decompressed).
IDX_SHAPES = {
    "train-images-idx3-ubyte": (60000, 28, 28),
    "train-labels-idx1-ubyte": (60000,),
    "t10k-images-idx3-ubyte": (10000, 28, 28),
    "t10k-labels-idx1-ubyte": (10000,),
}

POINT_AT_DATA = (
    f"Point at a directory holding the four MNIST IDX files (gzip or not) or mnist.npz with "
    f"--data-dir DIR or the {DATA_DIR_ENV} environment variable; with neither set, Keras downloads MNIST."
)
REPLACE_IT = (
    "Replace it with a fresh copy of MNIST (the four IDX files, gzip or not, or Keras' mnist.npz), or point at "
    f"another copy with --data-dir DIR or {DATA_DIR_ENV}; with neither set, Keras downloads MNIST."
)


class DataError(UserError, RuntimeError):
    """MNIST is missing, unreadable, or not the MNIST we know."""


@dataclass(frozen=True)
class Mnist:
    """The four MNIST arrays, as the seed prepares them, and where they came from."""

    x_train: np.ndarray  # float32 (60000, 28, 28, 1) in [0, 1]
    y_train: np.ndarray  # int64 (60000,)
    x_test: np.ndarray  # float32 (10000, 28, 28, 1) in [0, 1]
    y_test: np.ndarray  # int64 (10000,)
    source: str  # directory, npz path or KERAS_DOWNLOAD_SOURCE
    checksums: dict  # file name -> SHA-256 of its uncompressed content


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _idx_size(shape: tuple[int, ...]) -> int:
    """Bytes of an IDX file of unsigned bytes with this shape: 4 magic bytes, 4 per dimension, the data."""
    return 4 + 4 * len(shape) + math.prod(shape)


def _corrupted(path: Path, reason: str) -> DataError:
    return DataError(f"cannot read MNIST file {path}: {reason}. The file is truncated or corrupted. " + REPLACE_IT)


def _read_idx(raw: bytes, path: Path) -> np.ndarray:
    """Parse IDX bytes: magic (0, 0, dtype 0x08, ndim), big-endian dims, then uint8 data."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or not 1 <= raw[3] <= 3:
        raise _corrupted(path, f"not an IDX file of unsigned bytes with 1 to 3 dimensions (magic {raw[:4]!r})")
    ndim = raw[3]
    offset = 4 + 4 * ndim
    if len(raw) < offset:
        raise _corrupted(path, f"the IDX header ends after {len(raw)} bytes, expected {offset}")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = math.prod(dims)
    if len(raw) - offset != expected:
        raise _corrupted(path, f"it holds {len(raw) - offset} data bytes, expected {expected} for shape {dims}")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def _find_idx(directory: Path, stem: str) -> Path | None:
    for candidate in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        path = directory / candidate
        if path.is_file():
            return path
    return None


def _read_idx_bytes(path: Path, size_limit: int | None) -> bytes:
    """The file's uncompressed bytes; every read or gzip failure becomes a DataError naming the file.

    ``size_limit`` bounds what a corrupted gzip stream may expand to (a flipped bit can make deflate emit
    garbage far beyond the real size); reading stops one byte past it.
    """
    try:
        if path.suffix != ".gz":
            return path.read_bytes()
        with gzip.open(path, "rb") as stream:
            # Reading to the end checks gzip's CRC-32 and length trailer; a read that stops at the limit does not.
            raw = stream.read(-1 if size_limit is None else size_limit + 1)
    except zlib.error as error:
        raise _corrupted(path, f"its compressed data is invalid ({error})") from error
    except (OSError, EOFError) as error:  # gzip.BadGzipFile (bad header, CRC or length) is an OSError
        raise _corrupted(path, str(error) or type(error).__name__) from error
    if size_limit is not None and len(raw) > size_limit:
        raise _corrupted(path, f"it decompresses to more than the {size_limit} bytes this MNIST file has")
    return raw


def _load_idx_dir(directory: Path, verify: bool) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    arrays, checksums = {}, {}
    # Smallest first: a corrupted label file is reported before 47 MB of training images are decompressed.
    for stem in sorted(IDX_SHA256, key=lambda stem: math.prod(IDX_SHAPES[stem])):
        expected = IDX_SHA256[stem]
        path = _find_idx(directory, stem)
        if path is None:
            raise DataError(
                f"MNIST file {stem}[.gz] not found in {directory} (looked for {stem} and {stem}.gz). "
                + POINT_AT_DATA
            )
        raw = _read_idx_bytes(path, _idx_size(IDX_SHAPES[stem]) if verify else None)
        digest = _sha256(raw)
        if verify and digest != expected:
            raise DataError(
                f"checksum mismatch for {path}: SHA-256 of its content is {digest}, expected {expected}. "
                "The file is corrupted or not the original MNIST. " + REPLACE_IT
            )
        arrays[stem] = _read_idx(raw, path)
        checksums[stem] = digest
    return arrays, {stem: checksums[stem] for stem in IDX_SHA256}  # the published order, as before


def _check_arrays(x_train, y_train, x_test, y_test, source: str) -> None:
    """Shapes and label range the rest of the code relies on (verified files pass; this guards verify=False)."""
    for split, images, labels in (("train", x_train, y_train), ("test", x_test, y_test)):
        if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != (images.shape[0],):
            raise DataError(
                f"{source}: {split} images have shape {images.shape} and labels {labels.shape}; expected "
                "(N, 28, 28) and (N,). " + REPLACE_IT
            )
        if labels.size and not 0 <= labels.min() <= labels.max() < NUM_CLASSES:
            raise DataError(f"{source}: {split} labels outside 0..{NUM_CLASSES - 1}. " + REPLACE_IT)


def _from_uint8(x_train, y_train, x_test, y_test, source: str, checksums: dict) -> Mnist:
    def images(x: np.ndarray) -> np.ndarray:
        # Exactly the seed's preparation: reshape to (N, 28, 28, 1), float32, / 255.
        images = x.reshape((x.shape[0], 28, 28, 1)).astype("float32")
        images /= 255  # in place: the same division, without a second float array (188 MB for train)
        return images

    return Mnist(
        x_train=images(x_train),
        y_train=y_train.astype(np.int64),
        x_test=images(x_test),
        y_test=y_test.astype(np.int64),
        source=source,
        checksums=checksums,
    )


def _load_npz(path: Path, verify: bool) -> Mnist:
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise _corrupted(path, str(error)) from error
    digest = _sha256(raw)
    if verify and digest != NPZ_SHA256:
        raise DataError(
            f"checksum mismatch for {path}: SHA-256 is {digest}, expected {NPZ_SHA256} (Keras' mnist.npz). "
            "The file is corrupted or not Keras' MNIST. " + REPLACE_IT
        )
    names = ("x_train", "y_train", "x_test", "y_test")
    try:
        archive = np.load(io.BytesIO(raw), allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise _corrupted(path, "it is a single .npy array, not an .npz archive")
        with archive:
            missing = [name for name in names if name not in archive.files]
            if missing:
                raise _corrupted(path, f"it lacks the arrays {missing} (it has {archive.files})")
            arrays = [np.asarray(archive[name]) for name in names]
    except DataError:
        raise
    except Exception as error:  # noqa: BLE001 - a damaged archive fails in zipfile, zlib, struct or numpy alike
        raise _corrupted(path, f"{type(error).__name__}: {error}") from error
    _check_arrays(*arrays, source=str(path))
    return _from_uint8(*arrays, str(path), {"mnist.npz": digest})


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """The directory given, else $MNIST_DATA_DIR, else None (Keras download)."""
    chosen = data_dir if data_dir not in (None, "") else os.environ.get(DATA_DIR_ENV) or None
    return Path(chosen).expanduser().resolve() if chosen else None


def load_mnist(data_dir: str | os.PathLike | None = None, verify: bool = True) -> Mnist:
    """Load MNIST from ``data_dir`` (or $MNIST_DATA_DIR), checking SHA-256; else Keras' download."""
    directory = resolve_data_dir(data_dir)
    if directory is None:
        return _load_keras_download()
    if not directory.is_dir():
        raise DataError(f"MNIST data directory {directory} does not exist or is not a directory. " + POINT_AT_DATA)
    npz = directory / "mnist.npz"
    if _find_idx(directory, "train-images-idx3-ubyte") is None and npz.is_file():
        return _load_npz(npz, verify)
    if _find_idx(directory, "train-images-idx3-ubyte") is None:
        listing = sorted(p.name for p in directory.iterdir())[:10]
        raise DataError(
            f"no MNIST files in {directory} (it contains: {listing or 'nothing'}). " + POINT_AT_DATA
        )
    arrays, checksums = _load_idx_dir(directory, verify)
    _check_arrays(arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"],
                  arrays["t10k-images-idx3-ubyte"], arrays["t10k-labels-idx1-ubyte"], str(directory))
    return _from_uint8(
        arrays["train-images-idx3-ubyte"],
        arrays["train-labels-idx1-ubyte"],
        arrays["t10k-images-idx3-ubyte"],
        arrays["t10k-labels-idx1-ubyte"],
        str(directory),
        checksums,
    )


def _load_keras_download() -> Mnist:
    import keras

    try:
        (x_train, y_train), (x_test, y_test) = keras.datasets.mnist.load_data()
    except Exception as error:  # network errors come in many types
        raise DataError(f"Keras could not download MNIST ({error}). " + POINT_AT_DATA) from error
    keras_home = os.environ.get("KERAS_HOME", os.path.join(os.path.expanduser("~"), ".keras"))
    cache = Path(keras_home) / "datasets" / "mnist.npz"
    checksums = {"mnist.npz": _sha256(cache.read_bytes())} if cache.is_file() else {}
    return _from_uint8(x_train, y_train, x_test, y_test, KERAS_DOWNLOAD_SOURCE, checksums)


@dataclass(frozen=True)
class Split:
    """Arrays one run trains, validates and tests on."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    validation_is_test: bool


def stratified_indices(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """``count`` indices drawn with each class in proportion to ``labels``, reproducible by seed."""
    rng = np.random.default_rng(seed)
    classes, class_counts = np.unique(labels, return_counts=True)
    quotas = np.floor(class_counts / len(labels) * count).astype(int)
    # Hand out the remainder to the classes with the largest fractional parts.
    remainder = count - quotas.sum()
    fractions = class_counts / len(labels) * count - quotas
    quotas[np.argsort(-fractions, kind="stable")[:remainder]] += 1
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quotas)]
    return np.sort(np.concatenate(chosen))


def build_split(data: Mnist, validation: str, validation_size: int, split_seed: int,
                train_subset: int | None) -> Split:
    """Hold out a fixed stratified validation set (or use the test set, the seed's protocol)."""
    if validation == "test":
        x_train, y_train = data.x_train, data.y_train
        x_val, y_val = data.x_test, data.y_test
    else:
        held_out = stratified_indices(data.y_train, validation_size, split_seed)
        keep = np.setdiff1d(np.arange(len(data.y_train)), held_out)
        x_train, y_train = data.x_train[keep], data.y_train[keep]
        x_val, y_val = data.x_train[held_out], data.y_train[held_out]
    if train_subset is not None and train_subset < len(y_train):
        subset = stratified_indices(y_train, train_subset, split_seed + 1)
        x_train, y_train = x_train[subset], y_train[subset]
    return Split(x_train, y_train, x_val, y_val, data.x_test, data.y_test, validation == "test")
