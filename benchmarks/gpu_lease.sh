#!/usr/bin/env bash
# One command for a 15-minute GPU lease (issue 22; docs/gpu.md#a-15-minute-lease). On the device machine, from the
# repository root, with .lease/ carried (benchmarks/gpu_lease_prepare.sh fills it here first):
#
#     bash benchmarks/gpu_lease.sh            # run tool: carry [".lease"], timeout_s 570
#
# The machine is bare (Python 3.12 with JAX on CUDA, no Keras, TensorFlow, MLflow or Optuna, no network): this
# installs .lease/wheels into $LEASE_SITE, then runs each stage under its own deadline, so a slow stage cannot eat
# the next, and writes what it measured under $OUT (what comes back: at most 8 files, 16 MiB each):
#
#   setup      wheels, the GPU, JAX's devices                                         ->  lease.log
#   benchmark  python -m benchmarks.packing: today's route (one unpacked JAX run per  ->  packing.json
#              process: TensorFlow is not there) and packs of K, 55,000 images x 2
#              epochs each, in its own process; K in an order that measures the
#              packs that matter first, skipping the rest when its deadline comes
#   accuracy   ablate --offline --pack: the architecture study's no_pool arms, 5      ->  cells/cells-<n>.tar
#              seeds each as one pack of 5, one arm after the other (each arm saved
#              as soon as it ends), at the study's own 20 epochs
#   collect    python -m benchmarks.gpu_lease: stages, per-arm accuracy and           ->  lease.json
#              ensemble accuracy, the cell folders tarred
#
# Estimates for an H100 (not measured: no GPU was lent to the session that wrote this; the lease measures them).
# Seed recipe: 89.5 MFLOP per training image; the goal, 3,000 full-length runs/hour (15 epochs x 55,000 images),
# is 690,000 images/s, 62 TFLOP/s. The no_pool nets: 0.82 (5x5), 0.89 (7x7), 1.04 (3x3) GFLOP per training image.
#   machine start                    1-4 min of the 15 (not in this script's budget)
#   setup                            ~20 s (pip from wheels ~5 s, JAX's first CUDA call ~10 s)
#   benchmark (deadline 250 s)       per row ~10 s start-up + 20-40 s compiling + 2 epochs of K x 55,000 images
#                                    (K=64: 7 M images, ~10 s at the goal rate); today's route is host-bound
#                                    (NumPy augmentation), ~5,000 images/s: ~25 s an epoch. About 5 rows fit.
#   accuracy (deadline 200 s)        per arm: 5 x 20 x 55,000 images = 4.5-5.7 PFLOP, ~75-95 s at 60 TFLOP/s
#                                    sustained, plus ~30 s compiling and the test evaluation: about 2 arms fit.
#                                    At 150 epochs an arm is 34-43 PFLOP (~10 min at 60 TFLOP/s): a lease of its
#                                    own (LEASE_EPOCHS=150 LEASE_ARMS=no_pool_5x5 LEASE_STAGES=accuracy).
#   collect                          ~10 s
# CPU rehearsal (LEASE_SCALE=smoke, 2-core VM, a venv with the GPU image's packages; docs/gpu.md): see the docs.
#
# Switches (environment): LEASE_SCALE=full|smoke (smoke: a few hundred images, 1-2 epochs, K up to 4, for the CPU
# rehearsal); LEASE_STAGES (default benchmark,accuracy); LEASE_SECONDS (the whole budget, default 500; the stages'
# deadlines scale with it); LEASE_ARMS, LEASE_SEEDS, LEASE_EPOCHS, LEASE_PACKS; LEASE_SITE (default /tmp/site);
# PYTHON (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?OUT: the folder whose files come back (the device tool sets it)}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/lease.log") 2>&1

SCALE=${LEASE_SCALE:-full}
STAGES=${LEASE_STAGES:-benchmark,accuracy}
TOTAL=${LEASE_SECONDS:-500}
PYTHON=${PYTHON:-python3}
SITE=${LEASE_SITE:-/tmp/site}
CELLS=${LEASE_CELLS:-/tmp/lease-cells}
STAGE_FILE=$(mktemp)
STARTED=$(date +%s)
case "$SCALE" in
    full)
        PACKS=${LEASE_PACKS:-1,8,64,32,16,4,2}
        BENCH_ARGS="--train-subset 55000 --epochs 2"
        ARMS=${LEASE_ARMS:-no_pool_5x5,no_pool_7x7,no_pool_3x3}
        SEEDS=${LEASE_SEEDS:-5}
        ACCURACY_ARGS="--epochs ${LEASE_EPOCHS:-20}"
        ;;
    smoke)
        PACKS=${LEASE_PACKS:-1,4,2}
        BENCH_ARGS="--train-subset 256 --epochs 2"
        ARMS=${LEASE_ARMS:-no_pool_7x7}
        SEEDS=${LEASE_SEEDS:-2}
        ACCURACY_ARGS="--epochs ${LEASE_EPOCHS:-1} --train-subset 256 --set validation_size=500"
        ;;
    *) echo "LEASE_SCALE=$SCALE: expected full or smoke" >&2; exit 2 ;;
esac
# The stages' shares of the budget: setup 40 s at most; benchmark half of it; accuracy what is left but collect's.
for name in ${STAGES//,/ }; do
    case "$name" in benchmark|accuracy|none) ;; *) echo "LEASE_STAGES: $name? expected benchmark, accuracy or none" >&2
                                                  exit 2 ;; esac
done
BENCH_SECONDS=$((TOTAL / 2))
COLLECT_SECONDS=30

stage() {  # stage NAME DEADLINE COMMAND...: run it under its deadline, record its status and seconds
    local name=$1 deadline=$2 begin status
    shift 2
    begin=$(date +%s)
    if [ "$deadline" -lt 10 ]; then  # (timeout 0 would mean no deadline at all)
        echo "=== stage $name: skipped, the budget is spent"
        echo "$name skipped 0 $deadline" >> "$STAGE_FILE"
        return 0
    fi
    echo "=== stage $name (deadline ${deadline} s, $(( $(date +%s) - STARTED )) s into the lease)"
    timeout --signal=TERM --kill-after=15 "$deadline" "$@"
    status=$?
    case $status in 0) status=ok ;; 124|137) status=timeout ;; *) status="exit-$status" ;; esac
    echo "$name $status $(( $(date +%s) - begin )) $deadline" >> "$STAGE_FILE"
    echo "=== stage $name: $status after $(( $(date +%s) - begin )) s"
}

left() {  # seconds of the budget left after keeping $1 seconds back
    echo $(( TOTAL - ($(date +%s) - STARTED) - $1 ))
}

setup() {
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        .lease/wheels/*.whl || return 1
    command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    "$PYTHON" -c "import jax, keras; print('jax', jax.__version__, jax.devices(), '| keras', keras.__version__, \
keras.backend.backend())"
}

export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export KERAS_BACKEND=jax MNIST_DATA_DIR="$PWD/.lease/mnist" XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
export TF_CPP_MIN_LOG_LEVEL=2
echo "gpu_lease: scale $SCALE, stages $STAGES, budget $TOTAL s, $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
export -f setup
export PYTHON SITE
stage setup 40 bash -c setup

if [[ ",$STAGES," == *",benchmark,"* ]]; then
    deadline=$BENCH_SECONDS
    [ "$(left $((COLLECT_SECONDS + 60)))" -lt "$deadline" ] && deadline=$(left $((COLLECT_SECONDS + 60)))
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
    stage benchmark "$deadline" "$PYTHON" -m benchmarks.packing --packs "$PACKS" $BENCH_ARGS \
        --time-limit $((deadline - 20)) --output "$OUT/packing.json"
fi

if [[ ",$STAGES," == *",accuracy,"* ]]; then
    # shellcheck disable=SC2086  # ACCURACY_ARGS is a list of arguments
    stage accuracy "$(left $COLLECT_SECONDS)" "$PYTHON" -m experiments.ablate --study architecture --arms "$ARMS" \
        --seeds "$SEEDS" $ACCURACY_ARGS --offline "$CELLS" --pack "$SEEDS"
fi

stage collect "$COLLECT_SECONDS" "$PYTHON" -m benchmarks.gpu_lease --cells "$CELLS" --stages "$STAGE_FILE" \
    --out "$OUT" --scale "$SCALE"
echo "gpu_lease: done after $(( $(date +%s) - STARTED )) s; files under \$OUT:"
ls -l "$OUT" "$OUT/cells" 2>/dev/null
