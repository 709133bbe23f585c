#!/usr/bin/env bash
# Every GPU figure the README and the issues ask for, in stages of < 10 min each
# on one H100 (estimates; first compile included):
#
#   bash benchmarks/gpu_suite.sh gb      # GB clustering: 10k CIFAR-10 images, images/s, peak memory
#   bash benchmarks/gpu_suite.sh train   # training images/s per model (gbjax step vs nnx.jit baseline)
#   bash benchmarks/gpu_suite.sh ttt     # ResNet-18 CIFAR-10: time to 93% test accuracy
#   bash benchmarks/gpu_suite.sh airbench  # airbench94 (bfloat16): time to 93% test accuracy
#   bash benchmarks/gpu_suite.sh main    # the main job, experiments/fgsm_cifar.py, default mode
#   bash benchmarks/gpu_suite.sh tests   # the test suite on the GPU
#
# Needs jax with CUDA, flax, optax, orbax-checkpoint, chex, scikit-learn and
# pillow importable (gbjax itself is taken from this checkout via PYTHONPATH),
# data in $GBJAX_DATA_DIR (mnist/ and cifar10/ as in ../shared/data).  Logs and
# JSON go to $RESULTS (default ./gpu_results).
set -uo pipefail   # a failed stage is reported, the next ones still run
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
: "${GBJAX_DATA_DIR:?set GBJAX_DATA_DIR to the folder holding mnist/ and cifar10/}"
export GBJAX_CACHE_DIR="${GBJAX_CACHE_DIR:-/tmp/gbjax_cache}"
RESULTS="${RESULTS:-gpu_results}"
mkdir -p "$RESULTS"
PY="${PYTHON:-python3}"

"$PY" -c "import jax; print(jax.__version__, jax.devices())" | tee "$RESULTS/devices.txt"

for stage in "$@"; do
  case "$stage" in
    gb)
      "$PY" benchmarks/gb_throughput.py --n 10000 --n-ref 32 \
        --json "$RESULTS/gb_throughput.json" 2>&1 | tee "$RESULTS/gb_throughput.log" ;;
    train)
      "$PY" benchmarks/train_throughput.py --steps 50 --rounds 3 --warmup 5 \
        --json "$RESULTS/train_throughput.json" 2>&1 | tee "$RESULTS/train_throughput.log" ;;
    ttt)
      "$PY" benchmarks/time_to_target.py --config gbjax/configs/resnet18_cifar10.py \
        --target 0.93 --budget-s 60 --set progress=False \
        --json "$RESULTS/time_to_target.json" 2>&1 | tee "$RESULTS/time_to_target.log" ;;
    airbench)
      "$PY" benchmarks/time_to_target.py --config gbjax/configs/airbench_cifar10.py \
        --target 0.93 --budget-s 60 --set progress=False --set "compute_dtype='bfloat16'" \
        --json "$RESULTS/time_to_target_airbench.json" 2>&1 | tee "$RESULTS/time_to_target_airbench.log" ;;
    main)
      "$PY" experiments/fgsm_cifar.py --no-progress --out "$RESULTS/fgsm_cifar" \
        2>&1 | tee "$RESULTS/fgsm_cifar.log" ;;
    tests)
      "$PY" -m pytest -q -x -p no:cacheprovider tests 2>&1 | tee "$RESULTS/tests.log" ;;
    *)
      echo "unknown stage $stage (gb, train, ttt, airbench, main, tests)" >&2; exit 2 ;;
  esac
  echo "[gpu_suite] stage $stage exit status $?" | tee -a "$RESULTS/status.txt"
done
