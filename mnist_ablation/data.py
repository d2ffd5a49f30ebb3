"""MNIST from a local directory (IDX, gzip or not, or Keras' mnist.npz) with SHA-256 checks.

With no directory, Keras' own download is used (needs internet). The images come back exactly as the
seed prepares them: float32, shape (N, 28, 28, 1), scaled to [0, 1]; labels are integer classes.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError

DATA_DIR_ENV = "MNIST_DATA_DIR"

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

POINT_AT_DATA = (
    f"Point at a directory holding the four MNIST IDX files (gzip or not) or mnist.npz with "
    f"--data-dir DIR or the {DATA_DIR_ENV} environment variable; with neither set, Keras downloads MNIST."
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
    source: str  # directory, npz path or "keras-download"
    checksums: dict  # file name -> SHA-256 of its uncompressed content


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_idx(raw: bytes, name: str) -> np.ndarray:
    """Parse IDX bytes: magic (0, 0, dtype 0x08, ndim), big-endian dims, then uint8 data."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{name} is not an IDX file of unsigned bytes (bad magic {raw[:4]!r}).")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims))
    if len(raw) - offset != expected:
        raise DataError(f"{name} holds {len(raw) - offset} data bytes, expected {expected} for shape {dims}.")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def _find_idx(directory: Path, stem: str) -> Path | None:
    for candidate in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        path = directory / candidate
        if path.is_file():
            return path
    return None


def _load_idx_dir(directory: Path, verify: bool) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    arrays, checksums = {}, {}
    for stem, expected in IDX_SHA256.items():
        path = _find_idx(directory, stem)
        if path is None:
            raise DataError(
                f"MNIST file {stem}[.gz] not found in {directory} (looked for {stem} and {stem}.gz). "
                + POINT_AT_DATA
            )
        try:
            raw = path.read_bytes()
            if path.suffix == ".gz":
                raw = gzip.decompress(raw)
        except (OSError, EOFError, gzip.BadGzipFile) as error:
            raise DataError(f"cannot read {path}: {error}. The file is truncated or corrupted; restore it.") from error
        digest = _sha256(raw)
        if verify and digest != expected:
            raise DataError(
                f"checksum mismatch for {path}: SHA-256 of its content is {digest}, expected {expected}. "
                "The file is corrupted or not the original MNIST; replace it with a fresh copy."
            )
        arrays[stem] = _read_idx(raw, str(path))
        checksums[stem] = digest
    return arrays, checksums


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
    raw = path.read_bytes()
    digest = _sha256(raw)
    if verify and digest != NPZ_SHA256:
        raise DataError(
            f"checksum mismatch for {path}: SHA-256 is {digest}, expected {NPZ_SHA256} (Keras' mnist.npz). "
            "Replace it with a fresh copy."
        )
    with np.load(path) as f:
        return _from_uint8(f["x_train"], f["y_train"], f["x_test"], f["y_test"], str(path), {"mnist.npz": digest})


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
    return _from_uint8(x_train, y_train, x_test, y_test, "keras-download", checksums)


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
