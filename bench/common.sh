# Helpers shared by bench/run.sh and bench/side_by_side.sh (sourced, not
# run). They expect OUT (the output folder) to be set.

PIDS=()
RUNDIRS=()

# Starts a command (an absolute path to a miyamoto binary and its
# arguments) in the background, its output to the log file $1, in a fresh
# empty directory: a node's default ./miyamoto-data is new at every start,
# so no run inherits another's tasks.
spawn() {
    local log=$1; shift
    local d
    d=$(mktemp -d "$PWD/$OUT/run.XXXXXX")
    RUNDIRS+=("$d")
    (cd "$d" && exec "$@") >"$log" 2>&1 &
    PIDS+=($!)
}

# Stops every process started so far and removes their directories.
stop_all() {
    for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]:-}"; do [ -n "$p" ] && wait "$p" 2>/dev/null || true; done
    PIDS=()
    for d in "${RUNDIRS[@]:-}"; do [ -n "$d" ] && rm -rf "$d"; done
    RUNDIRS=()
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
    shift 2
    # Further arguments ("$@") go to every broker (e.g. --fsync never).
    spawn "$OUT/b1.log" "$bin" broker --port 7500 --node-id b1 --replicas "$rf" "$@"
    sleep 0.5
    spawn "$OUT/b2.log" "$bin" broker --port 7510 --node-id b2 --replicas "$rf" --join tcp://127.0.0.1:7500 "$@"
    sleep 0.5
    spawn "$OUT/b3.log" "$bin" broker --port 7520 --node-id b3 --replicas "$rf" --join tcp://127.0.0.1:7510 "$@"
    spawn "$OUT/gw.log" "$bin" gateway --listen 127.0.0.1:7600 --broker tcp://127.0.0.1:7500
    wait_http 7600
    for _ in $(seq 1 100); do
        n=$(curl -sf http://127.0.0.1:7600/cluster | python3 -c 'import json,sys; d=json.load(sys.stdin); print(len(d["nodes"]) if d["leader"] else 0)' 2>/dev/null || echo 0)
        [ "$n" = 3 ] && sleep 2 && return 0
        sleep 0.1
    done
    echo "cluster never formed" >&2; exit 1
}
