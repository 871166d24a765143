#!/usr/bin/env bash
# Two builds of Miyamoto side by side: the rows a change may affect, with
# the two servers alternating in every round and the same load tool (the
# candidate's) driving both, so the ratio compares the servers alone.
#
#   BASE=77b10c3 ROUNDS=5 bash bench/side_by_side.sh
#   BASE=77b10c3 BASE_BIN=/path/to/its/miyamoto bash bench/side_by_side.sh
#   ROWS="delivery pull" N_E2E=30000 BASE=77b10c3 bash bench/side_by_side.sh
#
# BASE is any commit: it is built in release mode in a worktree under
# target/. The candidate is the working tree. Results go to
# target/bench/side-by-side.jsonl; the summary (medians and per-round
# ratios) is printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

BASE=${BASE:?set BASE to the commit to compare with}
ROUNDS=${ROUNDS:-5}
N_HTTP=${N_HTTP:-20000}; N_ZMQ=${N_ZMQ:-50000}; N_E2E=${N_E2E:-10000}
CONC=${CONC:-32}
# Which rows: any of http zmq delivery pull cluster.
ROWS=${ROWS:-http zmq delivery pull cluster}
has() { case " $ROWS " in *" $1 "*) return 0;; esac; return 1; }
OUT=target/bench
mkdir -p "$OUT"
RESULTS=$OUT/side-by-side.jsonl
: > "$RESULTS"

cargo build --release --bin miyamoto
CAND=$PWD/target/release/miyamoto
# BASE_BIN: a release binary of BASE built already, to skip the build.
BASEBIN=${BASE_BIN:-}
if [ -z "$BASEBIN" ]; then
    WT=target/side-by-side/base
    if [ ! -d "$WT" ]; then
        git worktree add -f "$WT" "$BASE" >/dev/null
    else
        git -C "$WT" checkout -q --detach "$BASE"
    fi
    (cd "$WT" && CARGO_TARGET_DIR="$PWD/../target" cargo build --release --bin miyamoto)
    BASEBIN=$PWD/target/side-by-side/target/release/miyamoto
fi
case "$BASEBIN" in /*) ;; *) BASEBIN=$PWD/$BASEBIN ;; esac

source bench/common.sh
trap stop_all EXIT

# A fresh standalone node of binary $1.
single() {
    spawn "$OUT/side-node.log" "$1" standalone --port 7500 --listen 127.0.0.1:7600
    wait_http 7600
}

# A fresh 3-node cluster of binary $1 at RF 2, with a gateway.
cluster() { start_cluster "$1" 2; }

bench() {
    local label=$1; shift
    "$CAND" bench "$@" --json --label "$label" 2>>"$OUT/side-bench.log" | tee -a "$RESULTS" >/dev/null
}

U=http://127.0.0.1:7600
Z=tcp://127.0.0.1:7500
for round in $(seq 1 "$ROUNDS"); do
    echo "== round $round of $ROUNDS" >&2
    echo "{\"round\": $round}" >>"$RESULTS"
    # Alternate which build goes first from round to round.
    if [ $((round % 2)) = 1 ]; then order="base cand"; else order="cand base"; fi
    for who in $order; do
        if [ "$who" = base ]; then bin=$BASEBIN; else bin=$CAND; fi
        if has http; then single "$bin"; bench "$who" enqueue-http --url $U --requests "$N_HTTP" --concurrency "$CONC" --format json; stop_all; fi
        if has zmq; then single "$bin"; bench "$who" enqueue-zmq --broker $Z --requests "$N_ZMQ" --window 64; stop_all; fi
        if has delivery; then single "$bin"; bench "$who" end-to-end --url $U --tasks "$N_E2E" --concurrency "$CONC" --batch 100 --delay 1 --same-eta; stop_all; fi
        if has pull; then single "$bin"; bench "$who" end-to-end --broker $Z --via zmq --tasks "$N_E2E"; stop_all; fi
        if has cluster; then cluster "$bin"; bench "$who" end-to-end --url $U --tasks "$N_E2E" --concurrency "$CONC"; stop_all; fi
    done
done

python3 - "$RESULTS" <<'PY'
import json, statistics, sys
names = {
    "enqueue-http": "HTTP enqueue (JSON), standalone",
    "enqueue-zmq": "ZeroMQ enqueue, standalone",
    "end-to-end http same-eta": "delivery alone (100 per request, one eta), standalone",
    "end-to-end zmq": "pull workers end to end, standalone",
    "end-to-end http": "end to end, 3 nodes at RF 2 with a gateway",
}
rows, rnd = {}, 0
for line in open(sys.argv[1]):
    r = json.loads(line)
    if list(r) == ["round"]:
        rnd = r["round"]
        continue
    extra = r.get("extra") or {}
    key = r["scenario"]
    if key == "end-to-end":
        key += " " + extra.get("via", "") + (" same-eta" if extra.get("same_eta") else "")
    rows.setdefault(key, {}).setdefault(r["label"], {})[rnd] = r["per_sec"]
print("| row | base median /s | candidate median /s | ratio of medians | per-round ratios |")
print("|---|---:|---:|---:|---|")
for key, by in rows.items():
    base, cand = by.get("base", {}), by.get("cand", {})
    ratios = [cand[k] / base[k] for k in sorted(cand) if k in base]
    b, c = statistics.median(base.values()), statistics.median(cand.values())
    print(f"| {names.get(key, key)} | {b:,.0f} | {c:,.0f} | {c / b:.2f} | {', '.join(f'{x:.2f}' for x in ratios)} |")
PY
