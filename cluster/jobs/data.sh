#!/usr/bin/env bash
# Data stages as Ray jobs: synthetic logs -> sequences -> splits (each a CPU job on the head).
#   RAY_API=http://127.0.0.1:8265 OUT=/shared/data/synth_1m USERS=1000000 cluster/jobs/data.sh
set -euo pipefail
RAY_API=${RAY_API:-http://127.0.0.1:8265}
OUT=${OUT:?set OUT to a folder every node can read}
USERS=${USERS:-1000000}
ITEMS=${ITEMS:-100000}
submit() { ray job submit --address "$RAY_API" --runtime-env cluster/runtime_env.yaml -- python -m cobra_scale.cli "$@"; }
submit data synth --users "$USERS" --items "$ITEMS" --days 14 --out "$OUT/raw"
submit data sessionize --events "$OUT/raw/events" --items "$OUT/raw/items.parquet" --out "$OUT/sequences"
submit data split --sequences "$OUT/sequences" --out "$OUT/splits/loo" kind=loo
