#!/usr/bin/env bash
# The GPU checks of the Megatron trainer as one command for a lent device machine (one H200, Python 3.12,
# torch 2.11, CUDA; no megatron-core, no network). Nothing here runs in CI.
#
#   bash bench/gpu_check.sh prepare       # here, once: the cp312 megatron-core wheel into .whl/ (git-ignored)
#   device run: command="bash bench/gpu_check.sh run", carry=[".whl"], timeout_s=480
#
# `run` installs megatron-core and looplm (no dependencies: the image has torch, numpy, pyyaml, safetensors and
# pytest) into /tmp/site, prints the GPU, then runs the `gpu`-marked tests: one GPU over NCCL, bf16 params with
# megatron-core's DistributedOptimizer unpatched, against fp32, and kill-and-resume; the FP8 tests (TE spec where
# Transformer Engine is installed, the local FP8 linear on CUDA); then bench/gpu_train.py, the bf16 / FP8
# throughput and MFU table (BENCHMARKS.md). Logs go to $OUT when set.
set -euo pipefail
MEGATRON=megatron-core==0.16.1

case "${1:-}" in
prepare)
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        -d .whl "$MEGATRON"
    ls -la .whl
    ;;
run)
    log="${OUT:-/tmp}/gpu_check.log"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site .
    export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$log"
    python3 -c "import torch, megatron.core; print('torch', torch.__version__, 'megatron-core', megatron.core.__version__)" | tee -a "$log"
    status=0
    python3 -m pytest -m gpu -p no:cacheprovider -rA tests/model/megatron/test_mcore_gpu.py \
        tests/model/megatron/test_fp8.py 2>&1 | tee -a "$log" || status=$?
    timeout 300 python3 bench/gpu_train.py 2>&1 | tee -a "$log" || status=$?
    exit "$status"
    ;;
*)
    echo "usage: bash bench/gpu_check.sh prepare|run" >&2
    exit 2
    ;;
esac
