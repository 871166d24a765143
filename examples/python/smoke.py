#!/usr/bin/env python3
"""End-to-end smoke test of a running Miyamoto broker, from Python.

    python smoke.py --broker-base 7000      # broker on 127.0.0.1:7000 and :7001

Uses producer.py and worker.py from this folder. Prints one line per step and
then "smoke ok" (exit 0), or "smoke FAILED: ..." lines (exit 1). Everything is
bounded by deadlines; the whole run gives up after --budget seconds (default 28).
"""

import argparse
import os
import sys
import time
import uuid

import zmq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from producer import HEADER, Producer, RequestError, decode, encode  # noqa: E402
from worker import TaskFailed, Worker  # noqa: E402

POOL = "py-pool"


class SmokeFailure(Exception):
    pass


def check(condition, message):
    if not condition:
        raise SmokeFailure(message)


def step(text):
    print(f"step: {text}", flush=True)


class Smoke:
    def __init__(self, host, base, budget):
        self.client_endpoint = f"tcp://{host}:{base}"
        self.worker_endpoint = f"tcp://{host}:{base + 1}"
        self.deadline = time.monotonic() + budget
        self.producer = Producer(self.client_endpoint, timeout=2.0, retries=2)

    def remaining(self):
        return self.deadline - time.monotonic()

    def wait_for_state(self, task_id, state, within=10.0):
        """Poll get() until the task is in `state` (the broker may still be
        settling a result that came on the worker's connection)."""
        until = min(time.monotonic() + within, self.deadline)
        while True:
            info = self.producer.get(None, task_id)
            if info["state"] == state or time.monotonic() >= until:
                return info
            time.sleep(0.05)

    # -- the steps -------------------------------------------------------------

    def ping(self):
        pong = self.producer.ping()
        check(isinstance(pong.get("node"), str) and isinstance(pong.get("version"), str),
              f"pong lacks node/version: {pong!r}")
        step(f"ping: node {pong['node']}, version {pong['version']}")

    def tasks_with_a_retry(self):
        ids = []
        for i in range(3):
            task_id, eta = self.producer.enqueue(None, f"zmq://{POOL}", params={"n": i},
                                                 countdown=0)
            check(isinstance(task_id, str) and task_id, f"bad task id {task_id!r}")
            check(isinstance(eta, float) and abs(eta - time.time()) < 60,
                  f"enqueued.eta {eta!r} is not about now")
            ids.append(task_id)
        step(f"enqueued 3 tasks to zmq://{POOL}: {', '.join(ids)}")

        ours = set(ids)
        deliveries = []  # (id, params, retry_count, execution_count, outcome)
        succeeded = set()

        def handle(task):
            if task["id"] not in ours:
                return True  # a leftover of an earlier run on the same broker
            first = not deliveries
            outcome = "failure" if first else "success"
            deliveries.append((task["id"], task.get("params"), task.get("retry_count"),
                               task.get("execution_count"), outcome))
            if first:
                raise TaskFailed("smoke: the first delivery fails on purpose")
            succeeded.add(task["id"])
            return True

        worker = Worker(self.worker_endpoint, [POOL], 2, handle, name="py-smoke")
        finished = worker.run(until=lambda: succeeded >= ours,
                              deadline=time.monotonic() + min(15.0, self.remaining() - 8))
        check(finished, f"worker did not see all 3 tasks succeed in time; "
                        f"deliveries so far: {deliveries!r}")
        step(f"worker: {len(deliveries)} deliveries, "
             f"{worker.results_sent} results sent")

        failed_id = deliveries[0][0]
        for task_id, params, retry_count, execution_count, outcome in deliveries:
            n = ids.index(task_id)
            check(params == [["n", str(n)]], f"task {task_id}: params {params!r}, "
                                             f"expected [['n', '{n}']]")
            redelivery = task_id == failed_id and outcome == "success"
            expected = 1 if redelivery else 0
            check(retry_count == expected and execution_count == expected,
                  f"task {task_id} ({outcome}): retry_count={retry_count} "
                  f"execution_count={execution_count}, expected {expected} and {expected}")

        for task_id in ids:
            info = self.wait_for_state(task_id, "succeeded")
            check(info["state"] == "succeeded",
                  f"task {task_id}: state {info['state']!r}, expected 'succeeded'")
            attempts = 2 if task_id == failed_id else 1
            check(info["attempts"] == attempts,
                  f"task {task_id}: attempts {info['attempts']}, expected {attempts}")
            check(info["executions"] == attempts,
                  f"task {task_id}: executions {info['executions']}, expected {attempts}")
        step(f"get: all 3 succeeded; {failed_id} has attempts 2")

    def cancel(self):
        task_id, eta = self.producer.enqueue(None, f"zmq://{POOL}", params={"n": "later"},
                                             countdown=30)
        info = self.producer.get(None, task_id)
        check(info["state"] == "scheduled", f"countdown task state {info['state']!r}")
        check(abs((eta - info["created"]) - 30) < 1.0,
              f"countdown 30 gave eta {eta} for created {info['created']}")
        cancelled = self.producer.cancel(None, task_id)
        check(cancelled == task_id, f"cancelled.id {cancelled!r} != {task_id!r}")
        info = self.producer.get(None, task_id)
        check(info["state"] == "cancelled", f"after cancel, state {info['state']!r}")
        step(f"cancel: {task_id} is cancelled")

    def bad_request(self):
        try:
            self.producer.enqueue(None, "ftp://x")
        except RequestError as exc:
            check(exc.code == "bad_request", f"ftp://x gave code {exc.code!r}")
            step(f"enqueue ftp://x: bad_request ({exc.reason})")
            return
        raise SmokeFailure("enqueue of ftp://x was accepted")

    def deduplication(self):
        request_id = str(uuid.uuid4())
        frames = encode({"request_id": request_id, "type": "enqueue",
                         "task": {"url": "zmq://py-smoke-dedupe", "countdown": 60}})
        check(frames[1] == HEADER, "encoder header")
        ctx = zmq.Context.instance()

        def replies(sock, count):
            got = []
            until = min(time.monotonic() + 5.0, self.deadline)
            while len(got) < count:
                left = until - time.monotonic()
                if left <= 0 or not sock.poll(int(left * 1000) + 1):
                    raise SmokeFailure(f"dedupe: {len(got)} of {count} replies "
                                       f"to {request_id} arrived")
                reply = decode(sock.recv_multipart())
                if reply.get("request_id") == request_id:
                    check(reply["type"] == "enqueued", f"dedupe: reply {reply!r}")
                    got.append(reply["id"])
            return got

        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.client_endpoint)
        try:
            sock.send_multipart(frames)
            sock.send_multipart(frames)
            first, second = replies(sock, 2)
        finally:
            sock.close(linger=0)
        check(first == second, f"same request_id gave two tasks: {first} and {second}")

        sock = ctx.socket(zmq.DEALER)  # the resend over a new connection (section 7.2)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.client_endpoint)
        try:
            sock.send_multipart(frames)
            (third,) = replies(sock, 1)
        finally:
            sock.close(linger=0)
        check(third == first, f"resend on a new socket gave task {third}, not {first}")
        self.producer.cancel(None, first)  # clean up
        step(f"dedupe: request_id {request_id} sent 3 times -> one task {first}")

    def run(self):
        try:
            self.ping()
            self.tasks_with_a_retry()
            self.cancel()
            self.bad_request()
            self.deduplication()
            check(self.remaining() > 0, "smoke took longer than its budget")
        finally:
            self.producer.close()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker-base", type=int, required=True, metavar="PORT",
                        help="the broker's base port (workers on PORT+1)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--budget", type=float, default=28.0,
                        help="seconds before giving up (default %(default)s)")
    args = parser.parse_args(argv)
    try:
        Smoke(args.host, args.broker_base, args.budget).run()
    except SmokeFailure as exc:
        print(f"smoke FAILED: {exc}", flush=True)
        return 1
    except Exception as exc:  # a timeout, an error reply, a protocol violation
        print(f"smoke FAILED: {type(exc).__name__}: {exc}", flush=True)
        return 1
    print("smoke ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
