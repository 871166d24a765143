#!/usr/bin/env python3
"""End-to-end Celery (Redis broker) baseline for Miyamoto's benchmark suite.

Workload: the driver enqueues N no-op tasks with the idiomatic client,
`noop.apply_async(countdown=D)` (no countdown when D is 0); one Celery worker
(prefork pool, concurrency W, `-O fair`) runs them. The clock runs from just
before the first `apply_async` until the N-th task has run.

Starts its own redis-server on a free loopback port (no RDB/AOF persistence)
and the Celery worker as a subprocess; kills both at exit.

Completion detection (cheap and honest): no result backend. The no-op task
does one Redis `INCR` on a counter key with a plain redis-py client; the task
whose INCR reaches the target also stores its CLOCK_MONOTONIC timestamp, which
is the end of the measured interval. The driver polls the counter every 10 ms.
Before the clock starts, 2*W warm-up tasks are run so that the worker, its
pool processes and their Redis connections are up.

With a countdown, Celery's Redis transport delivers the task at once and the
worker holds it in memory until its ETA (the idiomatic path; Redis has no
native delayed delivery in Celery).

Prints exactly one JSON line on stdout; fields as in beanstalkd_e2e.py:
`seconds` / `jobs_per_sec` use `seconds_after_delay` (= seconds_total - delay).

Run with the venv made by setup.sh:
  target/bench-venv/bin/python bench/baselines/celery_e2e.py --jobs 10000 --delay 1
"""

import os
import sys
import time

try:
    import redis
    from celery import Celery, signals
except ImportError:  # pragma: no cover - environment problem
    sys.exit("celery_e2e: celery/redis are not installed; run bench/baselines/setup.sh "
             "and use its venv's python (target/bench-venv/bin/python)")

HOST = "127.0.0.1"
QUEUE = "miyamoto-bench"
COUNT_KEY = "bench:done"
END_KEY = "bench:end"
READY_KEY = "bench:worker-ready"
BROKER_URL = os.environ.get("BENCH_BROKER_URL", f"redis://{HOST}:6379/0")
TARGET = int(os.environ.get("BENCH_TARGET", "0"))

# ---------------------------------------------------------------------------
# The Celery app (imported both by the driver and by the worker via -A).
app = Celery("miyamoto_bench", broker=BROKER_URL)
app.conf.update(
    result_backend=None,            # no per-task result storage
    task_ignore_result=True,
    task_default_queue=QUEUE,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)

_redis = None  # one plain redis-py client per (pool) process, made lazily


@app.task(name="bench.noop", ignore_result=True)
def noop():
    global _redis
    if _redis is None:
        _redis = redis.Redis.from_url(BROKER_URL)
    n = _redis.incr(COUNT_KEY)
    if n == TARGET:
        _redis.set(END_KEY, repr(time.monotonic()))  # CLOCK_MONOTONIC: system-wide


@signals.worker_ready.connect
def _announce_ready(**_kwargs):
    redis.Redis.from_url(BROKER_URL).set(READY_KEY, "1")


# ---------------------------------------------------------------------------
# The driver.
def main():
    import argparse
    import ctypes
    import json
    import shutil
    import signal
    import socket
    import subprocess
    import tempfile

    START_TIMEOUT = 10.0
    WORKER_START_TIMEOUT = 60.0

    def die(msg, code=1):
        print(f"celery_e2e: error: {msg}", file=sys.stderr, flush=True)
        sys.exit(code)

    def set_pdeathsig():
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass

    def free_port():
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((HOST, 0))
            return s.getsockname()[1]

    def tail(f, limit=3000):
        f.flush()
        f.seek(0)
        return f.read()[-limit:]

    def find_redis_server():
        override = os.environ.get("BENCH_REDIS_SERVER")  # e.g. a custom build
        if override:
            return override
        for cand in (shutil.which("redis-server"), "/usr/bin/redis-server", "/usr/sbin/redis-server"):
            if cand and os.access(cand, os.X_OK):
                return cand
        die("redis-server binary not found; run bench/baselines/setup.sh")

    def stop_group(proc, sig=signal.SIGTERM, grace=5.0):
        """Stop a process started with start_new_session=True, and its children."""
        if proc is None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # also any pool process left behind
        except ProcessLookupError:
            pass
        proc.wait()

    def start_redis(workdir, log):
        exe = find_redis_server()
        last_err = None
        for _attempt in range(3):  # retry in case another process grabbed the port
            port = free_port()
            try:
                proc = subprocess.Popen(
                    [exe, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no",
                     "--daemonize", "no", "--dir", workdir, "--loglevel", "warning"],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                    start_new_session=True, preexec_fn=set_pdeathsig)
            except OSError as e:
                die(f"redis-server failed to start: cannot run {exe}: {e}")
            deadline = time.monotonic() + START_TIMEOUT
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    last_err = f"redis-server exited with code {proc.returncode}"
                    break
                try:
                    r = redis.Redis(host=HOST, port=port, socket_connect_timeout=1)
                    r.ping()
                    return proc, port, r
                except redis.exceptions.ConnectionError as e:
                    last_err = str(e)
                    time.sleep(0.02)
            else:
                last_err = f"not reachable on {HOST}:{port} after {START_TIMEOUT:.0f}s ({last_err})"
            stop_group(proc)
        die(f"redis-server failed to start: {last_err}\n{tail(log)}")

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=10000, help="number of tasks N (default 10000)")
    ap.add_argument("--delay", type=float, default=0,
                    help="apply_async(countdown=D) in seconds (default 0: no countdown)")
    ap.add_argument("--workers", type=int, default=2,
                    help="worker pool concurrency W (prefork processes; default 2)")
    ap.add_argument("--prefetch-multiplier", type=int, default=4,
                    help="worker_prefetch_multiplier (default 4, Celery's default)")
    ap.add_argument("--timeout", type=float, default=300, help="abort after this many seconds (default 300)")
    args = ap.parse_args()
    if args.jobs < 1:
        die("--jobs must be >= 1", 2)
    if args.workers < 1:
        die("--workers must be >= 1", 2)
    if args.delay < 0:
        die("--delay must be >= 0", 2)
    if args.prefetch_multiplier < 1:
        die("--prefetch-multiplier must be >= 1", 2)
    n, w, delay = args.jobs, args.workers, args.delay
    delay_out = int(delay) if delay == int(delay) else delay
    warmup = 2 * w
    script_deadline = time.monotonic() + args.timeout

    # Make SIGTERM run the cleanup in `finally` below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    here = os.path.dirname(os.path.abspath(__file__))
    module = os.path.splitext(os.path.basename(__file__))[0]
    workdir = tempfile.mkdtemp(prefix="celery-e2e-")
    redis_log = tempfile.TemporaryFile(mode="w+")
    worker_log = tempfile.TemporaryFile(mode="w+")
    redis_proc = worker = None
    try:
        redis_proc, port, r = start_redis(workdir, redis_log)
        url = f"redis://{HOST}:{port}/0"

        # Point this process's app at our server as well (it was configured at import).
        global BROKER_URL
        BROKER_URL = url
        app.conf.broker_url = url

        env = dict(os.environ)
        env["BENCH_BROKER_URL"] = url
        env["BENCH_TARGET"] = str(warmup + n)
        env["PYTHONDONTWRITEBYTECODE"] = "1"  # leave no __pycache__ in bench/baselines
        env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        cmd = [sys.executable, "-m", "celery", "-A", module, "worker",
               "--pool", "prefork", "--concurrency", str(w), "-O", "fair",
               "--prefetch-multiplier", str(args.prefetch_multiplier),
               "--without-gossip", "--without-mingle", "--without-heartbeat",
               "-Q", QUEUE, "-n", f"bench-{port}@%h", "--loglevel", "WARNING"]
        worker = subprocess.Popen(cmd, cwd=here, env=env, stdin=subprocess.DEVNULL,
                                  stdout=worker_log, stderr=worker_log,
                                  start_new_session=True, preexec_fn=set_pdeathsig)

        deadline = min(time.monotonic() + WORKER_START_TIMEOUT, script_deadline)
        while not r.exists(READY_KEY):
            if worker.poll() is not None:
                die(f"celery worker exited with code {worker.returncode} during start-up\n{tail(worker_log)}")
            if time.monotonic() > deadline:
                die(f"celery worker not ready after {WORKER_START_TIMEOUT:.0f}s\n{tail(worker_log)}")
            time.sleep(0.05)

        # Warm-up: the pool processes import the task and open their Redis connection.
        for _ in range(warmup):
            noop.apply_async()
        while int(r.get(COUNT_KEY) or 0) < warmup:
            if worker.poll() is not None:
                die(f"celery worker exited with code {worker.returncode} during warm-up\n{tail(worker_log)}")
            if time.monotonic() > deadline:
                die(f"warm-up tasks not done after {WORKER_START_TIMEOUT:.0f}s\n{tail(worker_log)}")
            time.sleep(0.01)

        target = warmup + n
        opts = {"countdown": delay} if delay > 0 else {}
        t0 = time.monotonic()
        for i in range(n):
            noop.apply_async(**opts)
            if (i & 1023) == 0 and time.monotonic() > script_deadline:
                die(f"timeout after {args.timeout:.0f}s while enqueueing ({i} of {n} sent)")
        t_enq = time.monotonic()

        while True:
            done = int(r.get(COUNT_KEY) or 0) - warmup
            if done >= n:
                break
            if time.monotonic() > script_deadline:
                die(f"timeout after {args.timeout:.0f}s: {done} of {n} tasks done\n{tail(worker_log)}")
            if worker.poll() is not None:
                die(f"celery worker exited with code {worker.returncode} mid-run ({done} of {n} done)\n"
                    f"{tail(worker_log)}")
            if redis_proc.poll() is not None:
                die(f"redis-server exited with code {redis_proc.returncode} mid-run")
            time.sleep(0.01)
        t_seen = time.monotonic()
        end = r.get(END_KEY)
        for _ in range(100):  # the SET follows the final INCR immediately
            if end is not None:
                break
            time.sleep(0.001)
            end = r.get(END_KEY)
        if done != n:
            die(f"counter overshot: {done} tasks ran for {n} enqueued")
        t_end = float(end) if end is not None else t_seen

        total = t_end - t0
        after = max(total - delay, 1e-9)
        from importlib.metadata import version as pkg_version
        result = {
            "system": "celery",
            "jobs": n,
            "delay": delay_out,
            "workers": w,
            "seconds": round(after, 6),
            "seconds_total": round(total, 6),
            "seconds_after_delay": round(after, 6),
            "jobs_per_sec": round(n / after, 2),
            "jobs_per_sec_total": round(n / total, 2),
            "enqueue_seconds": round(t_enq - t0, 6),
            "pool": "prefork",
            "prefetch_multiplier": args.prefetch_multiplier,
            "client": f"celery {pkg_version('celery')} (kombu {pkg_version('kombu')}, "
                      f"redis-py {pkg_version('redis')})",
            "server": "redis " + r.info("server").get("redis_version", "?"),
        }
        print(json.dumps(result), flush=True)
    finally:
        stop_group(worker, signal.SIGQUIT)  # cold shutdown: nothing is left to run
        stop_group(redis_proc)
        redis_log.close()
        worker_log.close()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
