#!/usr/bin/env bash
# What issue 17 costs: HTTP enqueue and delivery alone with a Prometheus
# scrape of /metrics every second beside without any scrape (the same
# binary, a fresh in-memory node per run, alternating); then the time
# GET /queue/{q}/tasks and GET /queue/{q} take through a gateway of a
# 3-node cluster holding 100,000 tasks.
#
#   ROUNDS=5 bash bench/metrics.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-5}; N_HTTP=${N_HTTP:-20000}; N_E2E=${N_E2E:-10000}; N_LIST=${N_LIST:-100000}
CONC=${CONC:-32}
OUT=target/bench; BIN=$PWD/target/release/miyamoto
RESULTS=$OUT/metrics.jsonl
mkdir -p "$OUT"; : > "$RESULTS"
cargo build --release --bin miyamoto
source bench/common.sh
SCRAPER=
stop_scraper() {
    if [ -n "$SCRAPER" ]; then
        kill "$SCRAPER" 2>/dev/null || true
        wait "$SCRAPER" 2>/dev/null || true
        SCRAPER=
    fi
}
trap 'stop_scraper; stop_all' EXIT

U=http://127.0.0.1:7600
node() {
    spawn "$OUT/metrics-node.log" "$BIN" standalone --port 7500 --listen 127.0.0.1:7600 --in-memory
    wait_http 7600
    if [ "$1" = scraped ]; then
        ( while :; do curl -s -o /dev/null "$U/metrics"; sleep 1; done ) &
        SCRAPER=$!
    fi
}
bench() {
    local label=$1; shift
    "$BIN" bench "$@" --json --label "$label" 2>>"$OUT/metrics-bench.log" | tee -a "$RESULTS" >/dev/null
}
for round in $(seq 1 "$ROUNDS"); do
    echo "== round $round of $ROUNDS" >&2
    echo "{\"round\": $round}" >>"$RESULTS"
    if [ $((round % 2)) = 1 ]; then order="plain scraped"; else order="scraped plain"; fi
    for mode in $order; do
        node $mode; bench $mode enqueue-http --url $U --requests "$N_HTTP" --concurrency "$CONC" --format json; stop_scraper; stop_all
        node $mode; bench $mode end-to-end --url $U --tasks "$N_E2E" --concurrency "$CONC" --batch 100 --delay 1 --same-eta; stop_scraper; stop_all
    done
done
python3 - "$RESULTS" <<'PY'
import json, statistics, sys
rows, rnd = {}, 0
for line in open(sys.argv[1]):
    r = json.loads(line)
    if list(r) == ["round"]:
        rnd = r["round"]; continue
    rows.setdefault(r["scenario"], {}).setdefault(r["label"], {})[rnd] = r["per_sec"]
print("| row | no scrape, median /s | scraped every second, median /s | ratio of medians | per round |")
print("|---|---:|---:|---:|---|")
for key, by in rows.items():
    p, s = by.get("plain", {}), by.get("scraped", {})
    mp, ms = statistics.median(p.values()), statistics.median(s.values())
    per = ", ".join("%.2f" % (s[k] / p[k]) for k in sorted(p) if k in s)
    print(f"| {key} | {mp:,.0f} | {ms:,.0f} | {ms / mp:.2f} | {per} |")
PY

# The listing through a gateway of a 3-node cluster holding N_LIST tasks.
echo "== listing $N_LIST tasks through a 3-node cluster" >&2
spawn "$OUT/metrics-n1.log" "$BIN" broker --port 7700 --node-id n1 --in-memory
sleep 1
spawn "$OUT/metrics-n2.log" "$BIN" broker --port 7710 --node-id n2 --in-memory --join tcp://127.0.0.1:7700
spawn "$OUT/metrics-n3.log" "$BIN" broker --port 7720 --node-id n3 --in-memory --join tcp://127.0.0.1:7700
spawn "$OUT/metrics-gw.log" "$BIN" gateway --listen 127.0.0.1:7790 --broker tcp://127.0.0.1:7700
wait_http 7790
G=http://127.0.0.1:7790
until [ "$(curl -s $G/cluster | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["nodes"]))')" = 3 ]; do sleep 0.5; done
sleep 3   # the gateway learns the roster every 2 s
"$BIN" bench enqueue-zmq --broker tcp://127.0.0.1:7700 --requests "$N_LIST" --window 256 --json >/dev/null 2>>"$OUT/metrics-bench.log"
python3 - "$G" "$N_LIST" <<'PY'
import json, statistics, sys, time, urllib.request
g, n = sys.argv[1], int(sys.argv[2])
def get(path):
    t = time.perf_counter()
    body = urllib.request.urlopen(g + path, timeout=120).read()
    return time.perf_counter() - t, json.loads(body)
first = [get("/queue/bench/tasks?limit=100")[0] for _ in range(5)]
figures = [get("/queue/bench")[0] for _ in range(5)]
_, q = get("/queue/bench")
walks, counts = [], []
for _ in range(3):
    t = time.perf_counter(); seen = 0; cursor = ""
    while True:
        _, page = get("/queue/bench/tasks?limit=1000&cursor=" + cursor)
        seen += len(page["tasks"])
        cursor = page.get("next_cursor") or ""
        if not cursor:
            break
    walks.append(time.perf_counter() - t); counts.append(seen)
print(f"| tasks held (each on 2 of 3 nodes) | {q['stats']['scheduled']:,} scheduled |")
print(f"| GET /queue/bench/tasks?limit=100 (first page), median of 5 | {statistics.median(first) * 1000:.1f} ms |")
print(f"| GET /queue/bench (figures: each node counts what it owns), median of 5 | {statistics.median(figures) * 1000:.1f} ms |")
print(f"| every page, limit=1000, median of 3 | {statistics.median(walks):.2f} s for {counts[0]:,} tasks |")
PY
