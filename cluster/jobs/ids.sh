#!/usr/bin/env bash
# Semantic IDs as a Ray job; item embeddings run as a Ray Data actor pool across the cluster.
#   RAY_API=http://127.0.0.1:8265 ITEMS=/shared/data/synth_1m/raw/items.parquet OUT=/shared/data/synth_1m/ids cluster/jobs/ids.sh
set -euo pipefail
RAY_API=${RAY_API:-http://127.0.0.1:8265}
exec ray job submit --address "$RAY_API" --runtime-env cluster/runtime_env.yaml -- \
    python -m cobra_scale.cli ids --items "${ITEMS:?}" --out "${OUT:?}" embed.backend=ray "$@"
