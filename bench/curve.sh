#!/usr/bin/env bash
# ZeroMQ enqueue over CURVE beside plain (issue 16): the same binary, a
# fresh in-memory node for each run, the two alternating, at two windows.
#
#   ROUNDS=5 bash bench/curve.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-5}; N=${N:-50000}
OUT=target/bench; BIN=$PWD/target/release/miyamoto
mkdir -p "$OUT"
cargo build --release --bin miyamoto
source bench/common.sh; trap stop_all EXIT
KEYS=$PWD/$OUT/curve-keys; rm -rf "$KEYS"; mkdir -p "$KEYS/producers"
"$BIN" curve-keygen "$KEYS/server" >/dev/null 2>&1
"$BIN" curve-keygen "$KEYS/peer" >/dev/null 2>&1
"$BIN" curve-keygen "$KEYS/bench" >/dev/null 2>&1
cp "$KEYS/bench.key" "$KEYS/producers/"
for round in $(seq 1 "$ROUNDS"); do
    for window in 64 256; do
        for mode in plain curve; do
            if [ $mode = curve ]; then
                a=(--curve-dir "$KEYS")
                export MIYAMOTO_CURVE_SERVER_KEY=$KEYS/server.key MIYAMOTO_CURVE_KEY=$KEYS/bench.key_secret
            else
                a=(); unset MIYAMOTO_CURVE_SERVER_KEY MIYAMOTO_CURVE_KEY
            fi
            spawn "$OUT/curve-node.log" "$BIN" standalone --port 7500 --listen 127.0.0.1:7600 --in-memory "${a[@]}"
            wait_http 7600
            r=$("$BIN" bench enqueue-zmq --broker tcp://127.0.0.1:7500 --requests "$N" --window "$window" --json 2>/dev/null \
                | python3 -c "import json,sys; d=json.load(sys.stdin); print(int(d['per_sec']), d['errors'])")
            stop_all
            echo "round $round window $window $mode $r"
        done
    done
done
