#!/usr/bin/env bash
# Distributed training as a Ray job (Ray Train + DeepSpeed ZeRO-2 by default).
#   RAY_API=http://127.0.0.1:8265 cluster/jobs/train.sh -c configs/train/beauty.yaml out=/shared/runs/beauty_ray
# Arguments go to `cobra train` (flags first, then key=value); WORKERS / DEEPSPEED choose the scale; paths must be visible to every node (shared storage).
set -euo pipefail
RAY_API=${RAY_API:-http://127.0.0.1:8265}
WORKERS=${WORKERS:-2}
DEEPSPEED=${DEEPSPEED:-configs/deepspeed/zero2.json}
exec ray job submit --address "$RAY_API" --runtime-env cluster/runtime_env.yaml -- \
    python -m cobra_scale.cli train "$@" launcher=ray distributed.workers="$WORKERS" distributed.deepspeed="$DEEPSPEED"
