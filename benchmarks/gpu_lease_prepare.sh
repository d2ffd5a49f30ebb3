#!/usr/bin/env bash
# Fill .lease/ (git-ignored) with what benchmarks/gpu_lease.sh needs on a bare GPU machine that cannot reach a
# package registry: the wheels its Python 3.12 lacks (Keras and what Keras imports that the image does not hold)
# and a copy of MNIST. Run it here, before the lease, from the repository root:
#
#     MNIST_DATA_DIR=/path/to/mnist bash benchmarks/gpu_lease_prepare.sh
#
# then hand .lease to the device tool's `carry` (docs/gpu.md#a-15-minute-lease). It must stay well under the
# 64 MiB that travels with a call (about 14 MiB today). PYTHON (default python3) is the pip it downloads with.
set -euo pipefail
cd "$(dirname "$0")/.."
LEASE=.lease
PYTHON=${PYTHON:-python3}
: "${MNIST_DATA_DIR:?set MNIST_DATA_DIR to the folder with the MNIST IDX files (train-images-idx3-ubyte.gz ...)}"

# Keras and the packages it imports that the GPU image lacks (the image holds numpy, absl-py, rich, h5py,
# ml-dtypes, packaging, typing-extensions: docs/gpu.md; the CPU rehearsal checks the list). Versions from
# constraints.txt, the ones the tests ran with.
WHEELS="keras namex optree"

pin() {  # the version constraints.txt pins for $1
    local line
    line=$(grep -i -E "^$1==" constraints.txt) || { echo "constraints.txt pins no version of $1" >&2; exit 1; }
    echo "${line#*==}"
}

rm -rf "$LEASE/wheels" "$LEASE/mnist"
mkdir -p "$LEASE/wheels" "$LEASE/mnist"
for name in $WHEELS; do
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$LEASE/wheels" "$name==$(pin "$name")"
done

for file in train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz \
            t10k-labels-idx1-ubyte.gz SHA256SUMS.uncompressed; do
    if [ ! -f "$MNIST_DATA_DIR/$file" ]; then
        echo "no $file in MNIST_DATA_DIR=$MNIST_DATA_DIR: point it at the folder with the MNIST IDX files" >&2
        exit 1
    fi
    cp "$MNIST_DATA_DIR/$file" "$LEASE/mnist/"
done

ls -1 "$LEASE/wheels"
size=$(du -sm "$LEASE" | cut -f1)
echo "$LEASE: ${size} MiB (the call carries at most 64 MiB with the working tree)"
if [ "$size" -gt 48 ]; then
    echo "$LEASE is over 48 MiB: too close to the 64 MiB a call carries" >&2
    exit 1
fi
