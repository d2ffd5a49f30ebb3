"""MNIST loading: shapes and scaling as the seed, checksums, and clear errors."""

import gzip
import shutil

import numpy as np
import pytest

from mnist_ablation.data import IDX_SHA256, DataError, build_split, load_mnist, stratified_indices


def test_loads_as_the_seed_prepares_it(mnist):
    assert mnist.x_train.shape == (60000, 28, 28, 1) and mnist.x_test.shape == (10000, 28, 28, 1)
    assert mnist.x_train.dtype == np.float32 and mnist.x_train.min() == 0.0 and mnist.x_train.max() == 1.0
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


# --- Corruption: every damaged file is a DataError naming it and the fix, never another exception. ---


def _linked_copy(data_dir, target):
    """A data directory whose files are links to the real ones (each test then replaces one of them)."""
    target.mkdir()
    for path in data_dir.glob("*.gz"):
        (target / path.name).symlink_to(path)
    return target


def _flip(data: bytes, position: int) -> bytes:
    """``data`` with one bit flipped: bit ``position % 8`` of byte ``position`` (so positions vary the bit too)."""
    damaged = bytearray(data)
    damaged[position] ^= 1 << (position % 8)
    return bytes(damaged)


def _assert_names_file_and_fix(error: DataError, file_name: str) -> None:
    message = str(error)
    assert file_name in message, message
    assert "Replace it" in message and "--data-dir" in message and "MNIST_DATA_DIR" in message, message


# gzip member layout: bytes 0-1 magic, 2 method, 3 flags, 4-7 mtime, 8 extra flags, 9 OS, then the deflate
# stream, then CRC-32 (4 bytes) and the uncompressed length (4 bytes).
GZIP_METADATA = (4, 8, 9)  # mtime, extra flags, OS: gzip ignores them, so the content stays intact


def _gzip_positions(size: int, stride: int | None) -> tuple[list[int], list[int]]:
    """(positions to flip, positions whose flip must be an error) in a gzip file of ``size`` bytes.

    Without ``stride`` (the large image files, where each load costs a decompression): magic, flags, the
    first deflate byte, the middle of the stream, CRC-32 and length. With it, more of each and every
    ``stride``-th byte, where a flip may also be harmless (e.g. the last byte's padding bits).
    """
    if stride is None:
        must_fail = [0, 3, 10, size // 2, size - 8, size - 4, size - 1]
        return must_fail, must_fail
    must_fail = [0, 1, 2, 3, 10, 11, size // 4, size // 2, 3 * size // 4,
                 size - 8, size - 6, size - 5, size - 4, size - 2, size - 1]
    return sorted(set(must_fail) | set(range(12, size - 8, stride)) | {size - 9}), must_fail


@pytest.mark.parametrize("stem, stride", [
    ("t10k-labels-idx1-ubyte", 5),  # 4.5 kB
    ("train-labels-idx1-ubyte", 29),  # 29 kB
    ("t10k-images-idx3-ubyte", None),  # 1.6 MB
    ("train-images-idx3-ubyte", None),  # 9.7 MB
])
def test_a_bit_flip_in_a_gzip_file_is_a_data_error_naming_it(tmp_path, data_dir, stem, stride):
    directory = _linked_copy(data_dir, tmp_path / "mnist")
    name = f"{stem}.gz"
    original = (data_dir / name).read_bytes()
    target = directory / name
    target.unlink()
    positions, must_fail = _gzip_positions(len(original), stride)
    outcomes = {}
    for position in positions:
        target.write_bytes(_flip(original, position))
        try:
            data = load_mnist(directory)
        except DataError as error:
            _assert_names_file_and_fix(error, name)
            outcomes[position] = "error"
        else:
            # A flip may load only if the uncompressed content is intact (the SHA-256 check guarantees it).
            assert data.checksums[stem] == IDX_SHA256[stem]
            outcomes[position] = "intact"
    failed_to_fail = [position for position in must_fail if outcomes[position] != "error"]
    assert not failed_to_fail, f"flips at {failed_to_fail} of {name} loaded"
    assert sum(outcome == "error" for outcome in outcomes.values()) >= 0.95 * len(outcomes)


def test_a_bit_flip_in_gzip_metadata_loads_the_intact_content(tmp_path, data_dir):
    directory = _linked_copy(data_dir, tmp_path / "mnist")
    name = "t10k-labels-idx1-ubyte.gz"
    original = (data_dir / name).read_bytes()
    (directory / name).unlink()
    for position in GZIP_METADATA:
        (directory / name).write_bytes(_flip(original, position))
        assert load_mnist(directory).checksums["t10k-labels-idx1-ubyte"] == IDX_SHA256["t10k-labels-idx1-ubyte"]


@pytest.mark.parametrize("stem", ["t10k-labels-idx1-ubyte", "t10k-images-idx3-ubyte"])
def test_a_truncated_gzip_file_is_a_data_error_naming_it(tmp_path, data_dir, stem):
    directory = _linked_copy(data_dir, tmp_path / "mnist")
    name = f"{stem}.gz"
    original = (data_dir / name).read_bytes()
    target = directory / name
    target.unlink()
    size = len(original)
    for length in (0, 1, 2, 9, 10, 11, size // 2, size - 8, size - 4, size - 1):
        target.write_bytes(original[:length])
        with pytest.raises(DataError, match=r"(truncated or corrupted|checksum mismatch)") as caught:
            load_mnist(directory)
        _assert_names_file_and_fix(caught.value, name)


def test_a_gzip_file_with_data_appended_or_a_second_member_is_a_data_error(tmp_path, data_dir):
    directory = _linked_copy(data_dir, tmp_path / "mnist")
    name = "t10k-labels-idx1-ubyte.gz"
    original = (data_dir / name).read_bytes()
    (directory / name).unlink()
    for damaged in (original + b"garbage", original + original, original + gzip.compress(b"\x00" * 10)):
        (directory / name).write_bytes(damaged)
        with pytest.raises(DataError) as caught:
            load_mnist(directory)
        _assert_names_file_and_fix(caught.value, name)


@pytest.mark.parametrize("stem, positions", [
    ("t10k-labels-idx1-ubyte", [0, 2, 3, 4, 7, 8, 5000, 10007]),  # magic, dtype, ndim, length, labels
    ("t10k-images-idx3-ubyte", [3, 9, 4_000_000]),
])
def test_a_bit_flip_in_an_uncompressed_idx_file_fails_its_checksum(tmp_path, data_dir, stem, positions):
    directory = _linked_copy(data_dir, tmp_path / "mnist")
    (directory / f"{stem}.gz").unlink()
    original = gzip.decompress((data_dir / f"{stem}.gz").read_bytes())
    for position in positions:
        (directory / stem).write_bytes(_flip(original, position))
        with pytest.raises(DataError, match=f"checksum mismatch for .*{stem}:") as caught:
            load_mnist(directory)
        _assert_names_file_and_fix(caught.value, stem)


def test_without_verification_a_damaged_idx_header_is_still_a_data_error(tmp_path, data_dir):
    directory = _linked_copy(data_dir, tmp_path / "mnist")
    stem = "t10k-labels-idx1-ubyte"
    (directory / f"{stem}.gz").unlink()
    original = gzip.decompress((data_dir / f"{stem}.gz").read_bytes())
    damaged = {
        "magic": b"\x01" + original[1:],
        "ndim": original[:3] + b"\x09" + original[4:],
        "header cut": original[:6],
        "length field": original[:7] + bytes([original[7] ^ 1]) + original[8:],
        "data cut": original[:-1],
    }
    for what, data in damaged.items():
        (directory / stem).write_bytes(data)
        with pytest.raises(DataError) as caught:
            load_mnist(directory, verify=False)
        _assert_names_file_and_fix(caught.value, stem)
        assert "truncated or corrupted" in str(caught.value), what


def _tiny_npz(path, **overrides):
    arrays = {"x_train": np.zeros((6, 28, 28), np.uint8), "y_train": np.arange(6, dtype=np.uint8),
              "x_test": np.full((4, 28, 28), 255, np.uint8), "y_test": np.arange(4, dtype=np.uint8)}
    arrays.update(overrides)
    np.savez_compressed(path, **{name: value for name, value in arrays.items() if value is not None})
    return path.read_bytes()


def test_a_bad_npz_is_a_data_error_naming_it(tmp_path):
    directory = tmp_path / "npz"
    directory.mkdir()
    npz = directory / "mnist.npz"
    valid = _tiny_npz(npz)
    assert load_mnist(directory, verify=False).x_test.max() == 1.0  # the archive itself is sound
    # Verified (the default): anything but Keras' own file fails its checksum, damaged or not.
    for data in (valid, _flip(valid, len(valid) // 2), valid[: len(valid) // 2], b"", b"not a zip file"):
        npz.write_bytes(data)
        with pytest.raises(DataError, match=r"checksum mismatch for .*mnist\.npz") as caught:
            load_mnist(directory)
        _assert_names_file_and_fix(caught.value, "mnist.npz")
    # Unverified: damage is still a DataError, whichever layer (zip, zlib, npy) notices it.
    damaged = [valid[: len(valid) // 2], b"", b"not a zip file", valid[:30] + valid[31:]]
    damaged += [_flip(valid, position) for position in range(0, len(valid), max(1, len(valid) // 40))]
    outcomes = []
    for data in damaged:
        npz.write_bytes(data)
        try:
            loaded = load_mnist(directory, verify=False)
        except DataError as error:
            _assert_names_file_and_fix(error, "mnist.npz")
            outcomes.append("error")
        else:  # a flip in zip metadata the reader ignores: the arrays must be the originals
            assert loaded.x_test.shape == (4, 28, 28, 1) and loaded.y_train.tolist() == list(range(6))
            outcomes.append("intact")
    assert outcomes[:4] == ["error"] * 4 and outcomes.count("error") >= len(outcomes) // 2
    # Sound archives with the wrong content.
    for overrides, expected in (({"y_test": None}, "lacks the arrays"), ({"x_test": np.zeros((4, 28, 27))}, "shape"),
                                ({"y_train": np.full(6, 10, np.uint8)}, "labels outside")):
        _tiny_npz(npz, **overrides)
        with pytest.raises(DataError, match=expected) as caught:
            load_mnist(directory, verify=False)
        _assert_names_file_and_fix(caught.value, "mnist.npz")
