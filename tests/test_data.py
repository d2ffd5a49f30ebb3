"""MNIST loading: shapes and scaling as the seed, checksums, and clear errors."""

import gzip
import shutil

import numpy as np
import pytest

from mnist_ablation.data import DataError, build_split, load_mnist, stratified_indices


def test_loads_as_the_seed_prepares_it(mnist):
    assert mnist.x_train.shape == (60000, 28, 28, 1) and mnist.x_test.shape == (10000, 28, 28, 1)
    assert mnist.x_train.dtype == np.float32 and 0.0 == mnist.x_train.min() and mnist.x_train.max() == 1.0
    assert sorted(np.unique(mnist.y_train)) == list(range(10))
    assert set(mnist.checksums) == {"train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                    "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"}


def test_uncompressed_and_npz_copies_load_the_same(tmp_path, data_dir, mnist):
    for path in data_dir.glob("*.gz"):
        (tmp_path / path.stem).write_bytes(gzip.decompress(path.read_bytes()))
    plain = load_mnist(tmp_path)
    assert np.array_equal(plain.x_test, mnist.x_test) and plain.checksums == mnist.checksums


def _copy(data_dir, target):
    target.mkdir()
    for path in data_dir.glob("*.gz"):
        shutil.copy(path, target / path.name)
    return target


def test_corrupted_file_fails_checksum_naming_it(tmp_path, data_dir):
    directory = _copy(data_dir, tmp_path / "mnist")
    labels = directory / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(labels.read_bytes()))
    raw[100] = (raw[100] + 1) % 10  # one label changed: still a valid IDX file
    labels.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DataError, match="checksum mismatch for .*t10k-labels-idx1-ubyte.gz"):
        load_mnist(directory)


def test_truncated_file_is_a_clear_error(tmp_path, data_dir):
    directory = _copy(data_dir, tmp_path / "mnist")
    images = directory / "train-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[: 1000])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz.*(truncated|corrupted)"):
        load_mnist(directory)


def test_missing_directory_and_files_say_where_and_how(tmp_path):
    with pytest.raises(DataError, match=r"does not exist.*--data-dir.*MNIST_DATA_DIR"):
        load_mnist(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no MNIST files in .*empty.*--data-dir"):
        load_mnist(tmp_path / "empty")


def test_validation_split_is_fixed_stratified_and_disjoint(mnist):
    split = build_split(mnist, "split", 5000, split_seed=0, train_subset=None)
    again = build_split(mnist, "split", 5000, split_seed=0, train_subset=None)
    assert len(split.y_val) == 5000 and len(split.y_train) == 55000
    assert np.array_equal(split.y_val, again.y_val) and np.array_equal(split.x_val, again.x_val)
    val_share = np.bincount(split.y_val, minlength=10) / 5000
    all_share = np.bincount(mnist.y_train, minlength=10) / 60000
    assert np.abs(val_share - all_share).max() < 0.001
    assert not split.validation_is_test


def test_test_protocol_is_the_seeds(mnist):
    split = build_split(mnist, "test", 5000, split_seed=0, train_subset=None)
    assert len(split.y_train) == 60000 and split.validation_is_test
    assert np.array_equal(split.x_val, mnist.x_test)


def test_stratified_subset_has_every_class():
    labels = np.repeat(np.arange(10), [50, 60, 70, 80, 90, 100, 110, 120, 130, 190])
    chosen = stratified_indices(labels, 100, seed=1)
    assert len(chosen) == 100 and len(np.unique(chosen)) == 100
    assert set(labels[chosen]) == set(range(10))
