#!/usr/bin/env bash
# The GPU checks, as one short script for a lent GPU machine (see docs/serving.md, "GPU checks").
#
# That machine's image has torch, triton, pytest, numpy, pyarrow, safetensors and transformers, but not omegaconf,
# faiss, ray or deepspeed, and it reaches no package registry. So, here first:
#     make device-deps                  # omegaconf (pure Python) into build/device_pkgs, which the run carries
# then, on the device, from the repository root (the device tool: carry=["build/device_pkgs"]):
#     bash tools/gpu_check.sh           # writes its figures under $OUT (default /tmp/gpu_check)
#
# 1. the CUDA-only tests: inference on CUDA equals CPU for every mode; the compiled Triton contrastive kernels;
# 2. the recommender's own batching on the GPU (tools/bench_batching.py), Beauty-sized and at 1M items.
# Ray Serve's load test itself cannot run there (no ray); batching's ratio at the model step bounds it.
set -euo pipefail
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/build/device_pkgs:$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$OUT/gpu.txt"
$PY -m pytest -q -p no:cacheprovider tests/retrieve/test_cuda_inference.py tests/kernels/test_triton_contrastive.py \
    tests/kernels/test_dispatch.py tests/test_devices.py > "$OUT/pytest.txt" 2>&1 \
    || echo "some tests failed: $OUT/pytest.txt (the figures below still run)"
tail -15 "$OUT/pytest.txt"
$PY tools/bench_batching.py --device cuda --batches 1 4 16 64 --requests 256 | tee "$OUT/batching_beauty.jsonl"
$PY tools/bench_batching.py --device cuda --items 1000000 --batches 1 16 64 --requests 256 | tee "$OUT/batching_1m.jsonl"
