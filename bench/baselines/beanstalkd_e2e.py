#!/usr/bin/env python3
"""End-to-end beanstalkd baseline for Miyamoto's benchmark suite.

Workload: one producer puts N no-op jobs (with `--delay D` seconds, or none),
W worker processes reserve + delete them as fast as they can. The clock runs
from just before the first `put` until the moment the N-th job is deleted.

Starts its own beanstalkd on a free loopback port (in-memory, no binlog) and
kills it at exit. Client: greenstalk (the idiomatic modern Python client).

Prints exactly one JSON line on stdout, e.g.
  {"system": "beanstalkd", "jobs": 2000, "delay": 0, "workers": 2,
   "seconds": 0.61, "seconds_total": 0.61, "seconds_after_delay": 0.61,
   "jobs_per_sec": 3278.7, "jobs_per_sec_total": 3278.7, ...}
`seconds` / `jobs_per_sec` use `seconds_after_delay` (= seconds_total - delay),
i.e. the time from when the first job could become ready to the last
completion. With delay 0 both are the same.

Run with the venv made by setup.sh:
  target/bench-venv/bin/python bench/baselines/beanstalkd_e2e.py --jobs 10000 --delay 1
"""

import argparse
import ctypes
import json
import multiprocessing as mp
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

try:
    import greenstalk
except ImportError:  # pragma: no cover - environment problem
    sys.exit("beanstalkd_e2e: greenstalk is not installed; run bench/baselines/setup.sh "
             "and use its venv's python (target/bench-venv/bin/python)")

HOST = "127.0.0.1"
TUBE = "miyamoto-bench"
START_TIMEOUT = 10.0


def die(msg, code=1):
    print(f"beanstalkd_e2e: error: {msg}", file=sys.stderr, flush=True)
    sys.exit(code)


def _set_pdeathsig():
    """Child-side: get SIGKILL if this script dies, so no server is left behind."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def find_beanstalkd():
    override = os.environ.get("BENCH_BEANSTALKD")  # e.g. a custom build
    if override:
        return override
    for cand in (shutil.which("beanstalkd"), "/usr/bin/beanstalkd", "/usr/sbin/beanstalkd"):
        if cand and os.access(cand, os.X_OK):
            return cand
    die("beanstalkd binary not found; run bench/baselines/setup.sh")


def start_beanstalkd(log):
    exe = find_beanstalkd()
    last_err = None
    for _attempt in range(3):  # retry in case another process grabbed the port
        port = free_port()
        try:
            proc = subprocess.Popen([exe, "-l", HOST, "-p", str(port)],
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    preexec_fn=_set_pdeathsig)
        except OSError as e:
            die(f"beanstalkd failed to start: cannot run {exe}: {e}")
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                last_err = f"beanstalkd exited with code {proc.returncode}"
                break
            try:
                with greenstalk.Client((HOST, port)) as c:
                    c.stats()
                return proc, port
            except OSError as e:
                last_err = str(e)
                time.sleep(0.02)
        else:
            last_err = f"not reachable on {HOST}:{port} after {START_TIMEOUT:.0f}s ({last_err})"
        stop_process(proc)
    log.flush()
    log.seek(0)
    tail = log.read()[-2000:]
    die(f"beanstalkd failed to start: {last_err}\n{tail}")


def stop_process(proc, grace=3.0):
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def worker_main(port, n, counter, end_time, done, ready, go):
    """Reserve/delete until all N jobs are done. The no-op job does nothing."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles ^C
    _set_pdeathsig()  # die with the parent even if it is SIGKILLed
    client = greenstalk.Client((HOST, port), watch=TUBE)
    ready.release()
    go.wait()
    try:
        while True:
            try:
                job = client.reserve(timeout=1)
            except greenstalk.TimedOutError:
                if done.is_set():
                    return
                continue
            client.delete(job)
            with counter.get_lock():
                counter.value += 1
                v = counter.value
            if v == n:
                end_time.value = time.monotonic()  # CLOCK_MONOTONIC: system-wide
                done.set()
                return
    finally:
        client.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=10000, help="number of jobs N (default 10000)")
    ap.add_argument("--delay", type=float, default=0,
                    help="put every job with this delay in seconds (beanstalkd: whole seconds; default 0)")
    ap.add_argument("--workers", type=int, default=2, help="worker processes W (default 2)")
    ap.add_argument("--timeout", type=float, default=300, help="abort after this many seconds (default 300)")
    args = ap.parse_args()
    if args.jobs < 1:
        die("--jobs must be >= 1", 2)
    if args.workers < 1:
        die("--workers must be >= 1", 2)
    if args.delay < 0 or args.delay != int(args.delay):
        die("--delay must be a non-negative whole number of seconds for beanstalkd", 2)
    delay = int(args.delay)
    n, w = args.jobs, args.workers
    script_deadline = time.monotonic() + args.timeout

    # Make SIGTERM run the cleanup in `finally` below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    ctx = mp.get_context("fork")
    server = None
    procs = []
    log = tempfile.TemporaryFile(mode="w+")
    try:
        server, port = start_beanstalkd(log)

        counter = ctx.Value("q", 0)
        end_time = ctx.Value("d", 0.0)
        done = ctx.Event()
        ready = ctx.Semaphore(0)
        go = ctx.Event()
        for _ in range(w):
            p = ctx.Process(target=worker_main, args=(port, n, counter, end_time, done, ready, go),
                            daemon=True)
            p.start()
            procs.append(p)
        for _ in range(w):  # all workers connected and watching before the clock starts
            if not ready.acquire(timeout=START_TIMEOUT):
                die("workers did not connect to beanstalkd in time")

        producer = greenstalk.Client((HOST, port), use=TUBE)
        go.set()
        t0 = time.monotonic()
        for i in range(n):
            producer.put(str(i), delay=delay)
            if (i & 1023) == 0 and time.monotonic() > script_deadline:
                die(f"timeout after {args.timeout:.0f}s while enqueueing ({i} of {n} put)")
        t_enq = time.monotonic()
        producer.close()

        while not done.wait(0.05):
            if time.monotonic() > script_deadline:
                die(f"timeout after {args.timeout:.0f}s: {counter.value} of {n} jobs done")
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead:
                die(f"a worker died (exit code {dead[0].exitcode}); {counter.value} of {n} jobs done")
            if server.poll() is not None:
                die(f"beanstalkd exited with code {server.returncode} mid-run")
        t_end = end_time.value

        total = t_end - t0
        after = max(total - delay, 1e-9)
        result = {
            "system": "beanstalkd",
            "jobs": n,
            "delay": delay,
            "workers": w,
            "seconds": round(after, 6),
            "seconds_total": round(total, 6),
            "seconds_after_delay": round(after, 6),
            "jobs_per_sec": round(n / after, 2),
            "jobs_per_sec_total": round(n / total, 2),
            "enqueue_seconds": round(t_enq - t0, 6),
            "client": f"greenstalk {greenstalk_version()}",
            "server": server_version(),
        }
        print(json.dumps(result), flush=True)
    finally:
        for p in procs:  # idle workers may sit in reserve-with-timeout for up to 1 s
            if p.is_alive():
                p.join(0.2)
            if p.is_alive():
                p.terminate()
                p.join(2.0)
        stop_process(server)
        log.close()


def greenstalk_version():
    try:
        from importlib.metadata import version
        return version("greenstalk")
    except Exception:
        return "?"


def server_version():
    try:
        out = subprocess.run([find_beanstalkd(), "-v"], capture_output=True, text=True, timeout=5)
        return (out.stdout or out.stderr).strip()
    except Exception:
        return "beanstalkd ?"


if __name__ == "__main__":
    main()
