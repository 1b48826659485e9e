#!/usr/bin/env bash
# After training: DeepSpeed checkpoint -> plain artifacts, then test metrics (settings chosen on valid).
#   RAY_API=http://127.0.0.1:8265 RUN=/shared/runs/beauty_ray EXPORT=/shared/exports/beauty cluster/jobs/export_eval.sh
set -euo pipefail
RAY_API=${RAY_API:-http://127.0.0.1:8265}
submit() { ray job submit --address "$RAY_API" --runtime-env cluster/runtime_env.yaml -- python -m cobra_scale.cli "$@"; }
submit export --run "${RUN:?}" --out "${EXPORT:?}"
submit eval --run "$EXPORT" --split-name test grid_tau=[0.5,1,2] grid_psi=[10,20,40] modes=[cobra,no_fusion]
