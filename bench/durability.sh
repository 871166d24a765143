#!/usr/bin/env bash
# What durability costs (issue 15): the same binary in each durable mode
# (`--fsync always`, the default, and `--fsync never`) beside
# `--in-memory`, alternating the modes in every round; then the recovery
# of a node holding a million pending tasks, and the disk a million tasks
# leave once they have come and gone.
#
#   ROUNDS=3 bash bench/durability.sh
#   ROUNDS=1 N_RECOVER=100000 N_CYCLE=100000 bash bench/durability.sh   # quicker
#
# Results: target/bench/durability.jsonl, and a summary on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
N_HTTP=${N_HTTP:-20000}; N_ZMQ=${N_ZMQ:-50000}; N_E2E=${N_E2E:-10000}; N_LAT=${N_LAT:-5000}
N_RECOVER=${N_RECOVER:-1000000}; N_CYCLE=${N_CYCLE:-1000000}
CONC=${CONC:-32}
OUT=target/bench
BIN=$PWD/target/release/miyamoto
RESULTS=$OUT/durability.jsonl
mkdir -p "$OUT"
: > "$RESULTS"

cargo build --release --bin miyamoto
source bench/common.sh
trap stop_all EXIT

mode_args() {
    case $1 in
        memory) echo --in-memory ;;
        always) echo --fsync always ;;
        never) echo --fsync never ;;
    esac
}

# A fresh standalone node in mode $1 (and any further arguments).
single() {
    local mode=$1; shift
    # shellcheck disable=SC2046
    spawn "$OUT/durability-node.log" "$BIN" standalone --port 7500 --listen 127.0.0.1:7600 $(mode_args "$mode") "$@"
    wait_http 7600
}

bench() {
    local label=$1; shift
    "$BIN" bench "$@" --json --label "$label" 2>>"$OUT/durability-bench.log" | tee -a "$RESULTS" >/dev/null
}

U=http://127.0.0.1:7600
Z=tcp://127.0.0.1:7500
for round in $(seq 1 "$ROUNDS"); do
    echo "== round $round of $ROUNDS" >&2
    echo "{\"round\": $round}" >>"$RESULTS"
    case $((round % 3)) in
        1) order="memory always never" ;;
        2) order="always never memory" ;;
        0) order="never memory always" ;;
    esac
    for mode in $order; do
        single "$mode"; bench "$mode" enqueue-zmq --broker $Z --requests "$N_ZMQ" --window 64; stop_all
        single "$mode"; bench "$mode" enqueue-zmq --broker $Z --requests "$N_ZMQ" --window 256; stop_all
        single "$mode"; bench "$mode" enqueue-http --url $U --requests "$N_HTTP" --concurrency "$CONC" --format json; stop_all
        single "$mode"; bench "$mode" enqueue-http --url $U --requests "$N_HTTP" --concurrency 128 --format json; stop_all
        # One request at a time: the latency of a lone enqueue, sync included.
        single "$mode"; bench "$mode" enqueue-zmq --broker $Z --requests "$N_LAT" --window 1; stop_all
        single "$mode"; bench "$mode" end-to-end --url $U --tasks "$N_E2E" --concurrency "$CONC" --batch 100 --delay 1 --same-eta; stop_all
    done
done

python3 - "$RESULTS" <<'PY'
import json, statistics, sys
rows, rnd = {}, 0
for line in open(sys.argv[1]):
    r = json.loads(line)
    if list(r) == ["round"]:
        rnd = r["round"]; continue
    extra = r.get("extra") or {}
    key = r["scenario"]
    if key == "enqueue-zmq":
        key += " window %s" % extra.get("window", "?")
    if key == "enqueue-http":
        key += " concurrency %s" % extra.get("concurrency", "?")
    rows.setdefault(key, {}).setdefault(r["label"], {})[rnd] = r
names = {
    "enqueue-zmq window 64": "ZeroMQ enqueue (window 64)",
    "enqueue-zmq window 256": "ZeroMQ enqueue (window 256)",
    "enqueue-zmq window 1": "ZeroMQ enqueue, one at a time",
    "enqueue-http concurrency 32": "HTTP enqueue (JSON, 32 connections)",
    "enqueue-http concurrency 128": "HTTP enqueue (JSON, 128 connections)",
    "end-to-end": "delivery alone (100 per request, one eta)",
}
print("| row | mode | median /s | ratio to in-memory (median; per round) | latency p50 / p99 ms |")
print("|---|---|---:|---|---|")
for key, by in rows.items():
    mem = by.get("memory", {})
    for mode in ["memory", "always", "never"]:
        runs = by.get(mode, {})
        if not runs:
            continue
        rate = statistics.median(x["per_sec"] for x in runs.values())
        p50 = statistics.median(x["latency_ms"]["p50"] for x in runs.values())
        p99 = statistics.median(x["latency_ms"]["p99"] for x in runs.values())
        if mode == "memory":
            ratio = "—"
        else:
            per = [runs[k]["per_sec"] / mem[k]["per_sec"] for k in sorted(runs) if k in mem]
            ratio = "%.2f; %s" % (statistics.median(per), ", ".join("%.2f" % x for x in per))
        print(f"| {names.get(key, key)} | {mode} | {rate:,.0f} | {ratio} | {p50:.2f} / {p99:.2f} |")
PY

# Recovery of a node holding N_RECOVER pending tasks: enqueue them (etas an
# hour ahead), note the journal's size, kill -9, and time the restart until
# /health answers.
echo "== recovery of $N_RECOVER pending tasks" >&2
single always
bench recover-fill enqueue-zmq --broker $Z --requests "$N_RECOVER" --window 256
NODE_DIR=$(ls -d "${RUNDIRS[0]}"/miyamoto-data/node-7500)
PID=${PIDS[0]}
BYTES=$(du -sb "$NODE_DIR" | cut -f1)
kill -9 "$PID"; wait "$PID" 2>/dev/null || true
PIDS=()
start=$(date +%s.%N)
(cd "${RUNDIRS[0]}" && exec "$BIN" standalone --port 7500 --listen 127.0.0.1:7600) >"$OUT/durability-recover.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 1200); do
    curl -sf http://127.0.0.1:7600/health >/dev/null && break
    sleep 0.05
done
end=$(date +%s.%N)
RSS=$(awk '/VmRSS/ {print $2 * 1024}' "/proc/${PIDS[0]}/status")
INNER=$(sed 's/\x1b\[[0-9;]*m//g' "$OUT/durability-recover.log" | grep -o 'recovered the data directory.*' | head -1)
python3 - "$N_RECOVER" "$BYTES" "$start" "$end" "$RSS" <<'PY'
import sys
n, b, s, e, rss = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
print(f"recovery: {n:,} pending tasks, data directory {b / 2**20:.0f} MiB ({b / n:.0f} bytes a task), "
      f"restart to /health {e - s:.2f} s, RSS after {rss / 2**20:.0f} MiB")
PY
echo "  node's own line: $INNER"
stop_all

# A million tasks come and go: delivered at once (retention 1 s), then
# forgotten; the disk they leave once the sweeps have run.
echo "== $N_CYCLE tasks come and go" >&2
single always --retention 1
bench cycle end-to-end --url $U --tasks "$N_CYCLE" --concurrency "$CONC" --batch 100
NODE_DIR=$(ls -d "${RUNDIRS[0]}"/miyamoto-data/node-7500)
PEAK=$(du -sb "$NODE_DIR" | cut -f1)
sleep 5
# Wake the node (one more task) so a sweep can start, and give it time.
curl -sf -XPOST $U/queue -d task.url=http://127.0.0.1:9/x -d task.countdown=3600 >/dev/null
sleep 10
AFTER=$(du -sb "$NODE_DIR" | cut -f1)
echo "come and gone: $N_CYCLE tasks; data directory at the end of the load $((PEAK >> 20)) MiB, 15 s later $((AFTER >> 20)) MiB"
echo "sweeps: $(grep -c "journal swept" "$OUT/durability-node.log" || true)"
stop_all
