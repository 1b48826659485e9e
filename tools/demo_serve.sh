#!/usr/bin/env bash
# Serve a trained run on 127.0.0.1, print one recommendation fetched over HTTP, stop what was started.
#
#   tools/demo_serve.sh data/demo/run data/demo/splits/loo/test
#
# Starts `cobra serve` (its own in-process Ray, loopback only) in the background, waits until
# it reports ready, POSTs /recommend for the first user of the history table with curl, then
# sends SIGTERM to that one process (it shuts down its own Ray) and waits for it to exit.
set -euo pipefail
RUN=${1:-data/demo/run}
HISTORY=${2:-data/demo/splits/loo/test}
BIN=${BIN:-.venv/bin}
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0

PORT=$("$BIN/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
USER_ID=$("$BIN/python" -c 'import sys; from cobra_scale.data.io import read_table; print(read_table(sys.argv[1], columns=["user_id"]).column(0)[0].as_py())' "$HISTORY")
LOG=$(mktemp)
"$BIN/cobra" serve --run "$RUN" --history-table "$HISTORY" --port "$PORT" --shards 2 >"$LOG" 2>&1 &
SERVER=$!
stop() {
    kill -TERM "$SERVER" 2>/dev/null || true
    wait "$SERVER" 2>/dev/null || true
    rm -f "$LOG"
}
trap stop EXIT

for _ in $(seq 1 900); do
    grep -q '^serving ' "$LOG" && break
    if ! kill -0 "$SERVER" 2>/dev/null; then
        echo "cobra serve exited before it was ready:" >&2
        tail -20 "$LOG" >&2
        exit 1
    fi
    sleep 1
done
grep -q '^serving ' "$LOG" || { echo "cobra serve not ready after 15 min" >&2; tail -20 "$LOG" >&2; exit 1; }
grep '^serving ' "$LOG"
echo "POST /recommend {\"user_id\": $USER_ID, \"k\": 5}"
curl -sS --fail-with-body -X POST "http://127.0.0.1:$PORT/recommend" \
    -H 'content-type: application/json' -d "{\"user_id\": $USER_ID, \"k\": 5}" | "$BIN/python" -c '
import json, sys
r = json.load(sys.stdin)
print("model %s, mode %s, %d history items, %d beams" % (r["model_version"], r["mode"], r["history_length"], r["beams"]))
for rank, item in enumerate(r["items"], 1):
    print("  %d. item %7d  score %.4f  sid %s" % (rank, item["item_id"], item["score"], item["sid"]))
'
