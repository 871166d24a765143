#!/usr/bin/env bash
# HTTP enqueue with an API token beside without (issue 16): the same
# binary, a fresh in-memory node for each run, the two alternating.
#
#   ROUNDS=5 bash bench/tokens.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-5}; N_HTTP=${N_HTTP:-20000}; CONC=${CONC:-32}
OUT=target/bench; BIN=$PWD/target/release/miyamoto
mkdir -p "$OUT"
cargo build --release --bin miyamoto
source bench/common.sh; trap stop_all EXIT
T=bench-token-0123456789abcdef
for round in $(seq 1 "$ROUNDS"); do
    for mode in plain token; do
        if [ $mode = token ]; then a=(--api-token "$T"); export MIYAMOTO_BENCH_TOKEN=$T
        else a=(); unset MIYAMOTO_BENCH_TOKEN; fi
        spawn "$OUT/tokens-node.log" "$BIN" standalone --port 7500 --listen 127.0.0.1:7600 --in-memory "${a[@]}"
        wait_http 7600
        r=$("$BIN" bench enqueue-http --url http://127.0.0.1:7600 --requests "$N_HTTP" --concurrency "$CONC" --format json --json 2>/dev/null \
            | python3 -c "import json,sys; d=json.load(sys.stdin); print(int(d['per_sec']), d['errors'])")
        stop_all
        echo "round $round $mode $r"
    done
done
