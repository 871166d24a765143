#!/usr/bin/env bash
# The benchmark suite: builds in release mode, then runs every scenario
# side by side with its baseline, alternating the candidates over ROUNDS
# rounds, and prints a report with medians, min–max ranges and ratios.
#
#   bash bench/run.sh                 # full run (about 20 minutes here)
#   ROUNDS=1 SMALL=1 bash bench/run.sh  # a quick smoke run
#
# Results: target/bench/results.jsonl (one JSON object per measurement)
# and target/bench/report.md. Everything runs on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
if [ -n "${SMALL:-}" ]; then
    N_HTTP=2000; N_ZMQ=5000; N_E2E=2000; N_CELERY=500; N_TIMERS=20000; TIMER_WINDOW=10
else
    N_HTTP=${N_HTTP:-20000}; N_ZMQ=${N_ZMQ:-50000}; N_E2E=${N_E2E:-10000}
    N_CELERY=${N_CELERY:-3000}; N_TIMERS=${N_TIMERS:-1000000}; TIMER_WINDOW=${TIMER_WINDOW:-200}
fi
CONC=${CONC:-32}
OUT=target/bench
BIN=$PWD/target/release/miyamoto
mkdir -p "$OUT"
: > "$OUT/results.jsonl"

cargo build --release --bins
bash bench/baselines/setup.sh
PY=${BENCH_VENV:-target/bench-venv}/bin/python

source bench/common.sh
trap stop_all EXIT

# A fresh single node: broker on 7500..7503, HTTP on 7600.
single() {
    spawn "$OUT/node.log" "$BIN" standalone --port 7500 --listen 127.0.0.1:7600
    wait_http 7600
}

# One broker and a gateway as separate processes (the cluster's layout,
# for the 3-nodes-beside-1 rows): broker on 7500..7503, HTTP on 7600.
separate() {
    spawn "$OUT/b1.log" "$BIN" broker --port 7500 --node-id b1
    spawn "$OUT/gw.log" "$BIN" gateway --listen 127.0.0.1:7600 --broker tcp://127.0.0.1:7500
    wait_http 7600  # /health answers once the gateway reaches the broker
}

# A fresh 3-node cluster (replication factor $1) and a gateway on 7600.
cluster() { start_cluster "$BIN" "$1"; }

bench() {
    local label=$1; shift
    "$BIN" bench "$@" --json --label "$label" 2>>"$OUT/bench.log" | tee -a "$OUT/results.jsonl" >/dev/null
}

U=http://127.0.0.1:7600
Z=tcp://127.0.0.1:7500
for round in $(seq 1 "$ROUNDS"); do
    echo "== round $round of $ROUNDS" >&2
    echo "{\"round\": $round}" >>"$OUT/results.jsonl"
    # HTTP enqueue beside the bare hyper server.
    bench ceiling http-ceiling --requests "$N_HTTP" --concurrency "$CONC"
    single; bench form enqueue-http --url $U --requests "$N_HTTP" --concurrency "$CONC" --format form; stop_all
    single; bench json enqueue-http --url $U --requests "$N_HTTP" --concurrency "$CONC" --format json; stop_all
    # ZeroMQ enqueue beside the bare DEALER/ROUTER echo.
    bench ceiling zmq-ceiling --requests "$N_ZMQ" --window 64
    single; bench single enqueue-zmq --broker $Z --requests "$N_ZMQ" --window 64; stop_all
    # End to end beside the bare hyper client, beanstalkd and Celery.
    bench ceiling dispatch-ceiling --tasks "$N_E2E" --concurrency "$CONC"
    single; bench http-delay0 end-to-end --url $U --tasks "$N_E2E" --concurrency "$CONC"; stop_all
    single; bench http-batch-delay0 end-to-end --url $U --tasks "$N_E2E" --concurrency "$CONC" --batch 100; stop_all
    single; bench zmq-delay0 end-to-end --broker $Z --via zmq --tasks "$N_E2E"; stop_all
    single; bench http-delay1 end-to-end --url $U --tasks "$N_E2E" --concurrency "$CONC" --delay 1; stop_all
    # Delivery alone: every task due at the same eta, stored before it.
    single; bench http-delivery end-to-end --url $U --tasks "$N_E2E" --concurrency "$CONC" --batch 100 --delay 1 --same-eta; stop_all
    "$PY" bench/baselines/beanstalkd_e2e.py --jobs "$N_E2E" --delay 0 >>"$OUT/results.jsonl" 2>>"$OUT/bench.log"
    "$PY" bench/baselines/beanstalkd_e2e.py --jobs "$N_E2E" --delay 1 >>"$OUT/results.jsonl" 2>>"$OUT/bench.log"
    "$PY" bench/baselines/celery_e2e.py --jobs "$N_CELERY" --delay 0 >>"$OUT/results.jsonl" 2>>"$OUT/bench.log"
    "$PY" bench/baselines/celery_e2e.py --jobs "$N_CELERY" --delay 1 >>"$OUT/results.jsonl" 2>>"$OUT/bench.log"
    single; bench celery-size end-to-end --url $U --tasks "$N_CELERY" --concurrency "$CONC"; stop_all
    # Three nodes at RF 1 and RF 2 beside one node.
    for rf in 1 2; do
        cluster $rf
        bench "cluster-rf$rf" enqueue-zmq --broker $Z --requests "$N_ZMQ" --window 64
        bench "cluster-rf$rf" end-to-end --url $U --tasks "$N_E2E" --concurrency "$CONC"
        stop_all
    done
    separate
    bench single-node enqueue-zmq --broker $Z --requests "$N_ZMQ" --window 64
    bench single-node end-to-end --url $U --tasks "$N_E2E" --concurrency "$CONC"
    stop_all
done

# A million timers: firing lateness (the first run, etas over $TIMER_WINDOW s),
# then enqueue rate with the store filling and memory per pending task (every
# run; the later ones fire over 30 s to save time). A fresh broker each run.
TIMER_RUNS=${TIMER_RUNS:-3}
LEAD=$(( N_TIMERS / 15000 + 10 ))
for run in $(seq 1 "$TIMER_RUNS"); do
    window=$TIMER_WINDOW
    [ "$run" -gt 1 ] && window=$(( TIMER_WINDOW < 30 ? TIMER_WINDOW : 30 ))
    spawn "$OUT/timers.log" "$BIN" broker --port 7500
    TIMER_PID=$!
    sleep 1
    bench timers timers --broker $Z --tasks "$N_TIMERS" --window "$window" --lead "$LEAD" --pid "$TIMER_PID" --window-requests 256
    stop_all
done

# Enqueue rate with a million pending beside an empty broker: both brokers
# run at once and probes of $N_PROBE enqueues alternate between them.
N_PROBE=${N_PROBE:-100000}
[ -n "${SMALL:-}" ] && N_PROBE=5000
spawn "$OUT/pending-full.log" "$BIN" broker --port 7500
spawn "$OUT/pending-empty.log" "$BIN" broker --port 7510
sleep 1
bench pending enqueue-pending --broker $Z --empty-broker tcp://127.0.0.1:7510 --pending "$N_TIMERS" --probe "$N_PROBE" --rounds 5 --window 256
stop_all

python3 bench/report.py "$OUT/results.jsonl" | tee "$OUT/report.md"
