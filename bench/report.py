#!/usr/bin/env python3
"""Turns bench/run.sh's results.jsonl into a Markdown report: the median and
min–max of every figure, and the ratios the targets are stated in."""
import json
import statistics
import sys
from collections import defaultdict

rows = defaultdict(list)
# by_round[round][key]: the figure of `key` in that round (run.sh writes a
# {"round": N} line before each round), for ratios of paired runs.
by_round = defaultdict(dict)
extra = {}
round_no = 0
for line in open(sys.argv[1]):
    line = line.strip()
    if not line.startswith("{"):
        continue
    r = json.loads(line)
    if set(r) == {"round"}:
        round_no = r["round"]
        continue
    if "system" in r:  # beanstalkd / celery baselines
        key = f"{r['system']} delay{r['delay']}"
        rows[key].append(r["jobs_per_sec"])
        by_round[round_no][key] = r["jobs_per_sec"]
        continue
    key = f"{r['scenario']} {r['label']}".strip()
    rows[key].append(r["per_sec"])
    by_round[round_no][key] = r["per_sec"]
    extra.setdefault(key, []).append(r)


def med(key):
    v = rows.get(key)
    return statistics.median(v) if v else None


def fmt(x):
    return "—" if x is None else f"{x:,.0f}"


print("| measurement | median /s | min–max /s | runs |")
print("|---|---:|---:|---:|")
for key in sorted(rows):
    if key.startswith("timers") or key.startswith("enqueue-pending"):
        continue
    v = rows[key]
    print(f"| {key} | {fmt(statistics.median(v))} | {fmt(min(v))}–{fmt(max(v))} | {len(v)} |")

ratios = [
    ("HTTP enqueue (form) / bare hyper server", "enqueue-http form", "http-ceiling ceiling", 0.5),
    ("HTTP enqueue (JSON) / bare hyper server", "enqueue-http json", "http-ceiling ceiling", 0.5),
    ("ZeroMQ enqueue / bare DEALER→ROUTER echo", "enqueue-zmq single", "zmq-ceiling ceiling", 0.25),
    ("end-to-end webhooks / bare hyper client", "end-to-end http-delay0", "dispatch-ceiling ceiling", 0.5),
    ("end-to-end webhooks, enqueued 100 per request / bare hyper client", "end-to-end http-batch-delay0", "dispatch-ceiling ceiling", 0.5),
    ("webhook delivery alone (all due at once) / bare hyper client", "end-to-end http-delivery", "dispatch-ceiling ceiling", 0.5),
    ("end-to-end webhooks, delay 1 s (paced by the enqueue) / bare hyper client", "end-to-end http-delay1", "dispatch-ceiling ceiling", None),
    ("end-to-end webhooks / beanstalkd (delay 0)", "end-to-end http-delay0", "beanstalkd delay0", 5),
    ("end-to-end webhooks / beanstalkd (delay 1 s)", "end-to-end http-delay1", "beanstalkd delay1", 5),
    ("end-to-end webhooks / Celery (delay 0, same job count)", "end-to-end celery-size", "celery delay0", 10),
    ("end-to-end webhooks / Celery (delay 1 s)", "end-to-end http-delay1", "celery delay1", 10),
    ("end-to-end pull workers / bare hyper client", "end-to-end zmq-delay0", "dispatch-ceiling ceiling", None),
    ("3 nodes RF 1 / 1 node: ZeroMQ enqueue", "enqueue-zmq cluster-rf1", "enqueue-zmq single-node", None),
    ("3 nodes RF 2 / 1 node: ZeroMQ enqueue", "enqueue-zmq cluster-rf2", "enqueue-zmq single-node", None),
    ("3 nodes RF 1 / 1 node: end-to-end", "end-to-end cluster-rf1", "end-to-end single-node", None),
    ("3 nodes RF 2 / 1 node: end-to-end", "end-to-end cluster-rf2", "end-to-end single-node", None),
]
print()
print("Ratios: the ratio of the medians, and the median and min–max of the")
print("ratios within each round (candidate and baseline run minutes apart).")
print()
print("| ratio | of medians | per round: median | min–max | target |")
print("|---|---:|---:|---:|---:|")
for name, a, b, target in ratios:
    ma, mb = med(a), med(b)
    value = "—" if ma is None or not mb else f"{ma / mb:.2f}"
    paired = [r[a] / r[b] for r in by_round.values() if a in r and r.get(b)]
    pm = f"{statistics.median(paired):.2f}" if paired else "—"
    pr = f"{min(paired):.2f}–{max(paired):.2f}" if paired else "—"
    tgt = "—" if target is None else f"≥ {target}"
    print(f"| {name} | {value} | {pm} | {pr} | {tgt} |")

timer_runs = extra.get("timers timers", [])
if len(timer_runs) > 1:
    ratios_t = [r["extra"]["enqueue_per_sec_last_tenth"] / max(r["extra"]["enqueue_per_sec_first_tenth"], 1e-9)
                for r in timer_runs]
    mem = [r["extra"]["rss_bytes_per_pending_task"] - r["extra"].get("payload_bytes_per_task", 0)
           for r in timer_runs if r["extra"].get("rss_bytes_per_pending_task") is not None]
    print()
    print(f"Timers over {len(timer_runs)} runs: enqueue rate last tenth / first tenth "
          f"median {statistics.median(ratios_t):.2f} (min–max {min(ratios_t):.2f}–{max(ratios_t):.2f})"
          + (f"; bytes per pending task beyond the payload median {statistics.median(mem):.0f} "
             f"(min–max {min(mem):.0f}–{max(mem):.0f})" if mem else "") + ".")
for r in timer_runs:
    e, lat = r["extra"], r["latency_ms"]
    print()
    print(f"Timers: {r['count']:,} tasks over {e['window']} s.")
    print(f"* firing lateness: p50 {lat['p50']:.3f} ms, p99 {lat['p99']:.3f} ms, max {lat['max']:.3f} ms")
    print(f"* enqueue: {e['enqueue_per_sec']:,.0f}/s overall; first tenth {e['enqueue_per_sec_first_tenth']:,.0f}/s, "
          f"last tenth (store ≥ 90 % full) {e['enqueue_per_sec_last_tenth']:,.0f}/s, "
          f"ratio {e['enqueue_per_sec_last_tenth'] / max(e['enqueue_per_sec_first_tenth'], 1e-9):.2f}")
    if e.get("rss_bytes_per_pending_task") is not None:
        payload = e.get("payload_bytes_per_task", 0)
        print(f"* broker memory: {e['rss_bytes_per_pending_task']:.0f} bytes of RSS per pending task, "
              f"{e['rss_bytes_per_pending_task'] - payload:.0f} beyond its {payload:.1f}-byte payload "
              f"({e['rss_before'] / 2**20:.1f} MiB before, {e['rss_after'] / 2**20:.1f} MiB after)")

for r in extra.get("enqueue-pending pending", []):
    e = r["extra"]
    rs = e["ratios"]
    print()
    print(f"Enqueue with {e['pending']:,} pending beside an empty broker (both running, "
          f"{len(rs)} alternating probes of {e['probe']:,} enqueues, window {e['window']}): "
          f"full {e['full_per_sec_median']:,.0f}/s, empty {e['empty_per_sec_median']:,.0f}/s (medians); "
          f"ratio per probe pair median {e['ratio_median']:.2f} (min–max {min(rs):.2f}–{max(rs):.2f}; target ≥ 0.8).")
