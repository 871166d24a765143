# Helpers shared by bench/run.sh and bench/side_by_side.sh (sourced, not
# run). They expect OUT (the output folder) to be set.

PIDS=()

# Stops every process started so far.
stop_all() {
    for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]:-}"; do [ -n "$p" ] && wait "$p" 2>/dev/null || true; done
    PIDS=()
}

# Waits until the gateway on 127.0.0.1:$1 answers /health.
wait_http() {
    for _ in $(seq 1 200); do
        curl -sf "http://127.0.0.1:$1/health" >/dev/null && return 0
        sleep 0.05
    done
    echo "node on :$1 never became ready" >&2; exit 1
}

# A fresh 3-node cluster of binary $1 at replication factor $2 (brokers on
# 7500, 7510, 7520, each joining through the one before) and a gateway on
# 7600; returns once the gateway sees three nodes and a leader.
start_cluster() {
    local bin=$1 rf=$2
    "$bin" broker --port 7500 --node-id b1 --replicas "$rf" >"$OUT/b1.log" 2>&1 &
    PIDS+=($!)
    sleep 0.5
    "$bin" broker --port 7510 --node-id b2 --replicas "$rf" --join tcp://127.0.0.1:7500 >"$OUT/b2.log" 2>&1 &
    PIDS+=($!)
    sleep 0.5
    "$bin" broker --port 7520 --node-id b3 --replicas "$rf" --join tcp://127.0.0.1:7510 >"$OUT/b3.log" 2>&1 &
    PIDS+=($!)
    "$bin" gateway --listen 127.0.0.1:7600 --broker tcp://127.0.0.1:7500 >"$OUT/gw.log" 2>&1 &
    PIDS+=($!)
    wait_http 7600
    for _ in $(seq 1 100); do
        n=$(curl -sf http://127.0.0.1:7600/cluster | python3 -c 'import json,sys; d=json.load(sys.stdin); print(len(d["nodes"]) if d["leader"] else 0)' 2>/dev/null || echo 0)
        [ "$n" = 3 ] && sleep 2 && return 0
        sleep 0.1
    done
    echo "cluster never formed" >&2; exit 1
}
