#!/usr/bin/env python3
"""A Miyamoto pull worker: library and command line.

Written from protocol/PROTOCOL.md (wire protocol version 1) alone.

Library use:

    from worker import Worker, TaskFailed

    def handle(task):              # task: the DeliveredTask map (section 8.4)
        if not do_the_work(task["params"]):
            raise TaskFailed("try again later", retry_after=60)
        return True                # False means failure; raising means failure too

    Worker("tcp://127.0.0.1:7001", pools=["thumbs"], credit=2, handler=handle).run()

Command line:

    python worker.py --broker tcp://127.0.0.1:7001 --pool POOL [--credit N]
                     [--fail-first K] [--log FILE] [--max-tasks M]

For each task it receives, the command line worker appends one JSON line to
--log (stdout when not given) and flushes it, then reports the outcome:

    {"id": ..., "queue": ..., "url": ..., "params": [[k, v], ...],
     "retry_count": 0, "execution_count": 0, "outcome": "success" | "failure",
     "seen": 1, "time": 1700000000.0}

The first K deliveries it sees fail (reason "fail-first ..."), the rest succeed.
With --max-tasks M it handles exactly M deliveries, then leaves gracefully.

Behaviour (sections 8 to 10, "Paranoid Pirate"):

* one DEALER socket (LINGER 0, identity chosen by ZeroMQ) connected to base+1;
* `ready` with the pools and the credit first; the broker does not answer it;
* a `heartbeat` whenever nothing else was sent for 1 s;
* any message from the broker is a sign of life; after 5 s of silence the
  socket is closed and a new one is opened (a new identity) after a back-off of
  1 s doubling up to 32 s, and `ready` is sent again;
* on `disconnect` from the broker: drop the deliveries not yet reported (the
  broker has given them back) and send `ready` again on the same socket;
* every delivery is answered with exactly one `result` quoting `delivery` and
  the task id, with `responded: true`; that returns its credit, so the worker
  never sends `credit` itself;
* results of deliveries from an earlier connection or registration are dropped;
* leaving: `ready` with credit 0, finish the delivery in progress (and, when
  draining, the ones already received), report them, then `disconnect`.

The handler runs in one background thread, so heartbeats keep flowing while it
works; deliveries beyond the one in progress wait in a local queue (that is
what a credit above 1 buys). Delivery is at-least-once (section 14.4): the same
task can arrive twice, so handlers must be idempotent or deduplicate by
task["id"]; this class does not deduplicate.
"""

import argparse
import collections
import json
import logging
import os
import signal
import socket as pysocket
import sys
import threading
import time

import msgpack
import zmq

log = logging.getLogger("miyamoto.worker")

# --------------------------------------------------------------------------
# Wire format (sections 5 and 6); kept in this file so it stands alone
# --------------------------------------------------------------------------

SIGNATURE = b"MYM"
VERSION = 1
HEADER = SIGNATURE + bytes([VERSION])
MAX_BODY = 2 * 1024 * 1024

HEARTBEAT_INTERVAL = 1.0  # seconds, section 9 / appendix A
LIVENESS = 5.0  # seconds of silence before the broker is presumed gone
RECONNECT_MIN = 1.0  # back-off before a new socket, doubling ...
RECONNECT_MAX = 32.0  # ... up to this (section 9 rule 4)


class MalformedMessage(Exception):
    pass


class TaskFailed(Exception):
    """Raise from a handler to fail the attempt with a reason and, optionally,
    a minimum delay before the retry (`retry_after`, seconds)."""

    def __init__(self, reason, retry_after=None):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


def encode(body):
    return [b"", HEADER, msgpack.packb(body, use_bin_type=True)]


def decode(frames):
    if len(frames) != 3:
        raise MalformedMessage(f"expected 3 frames, got {len(frames)}")
    delimiter, header, body = frames
    if delimiter != b"":
        raise MalformedMessage("frame 0 (delimiter) is not empty")
    if len(header) != 4 or header[:3] != SIGNATURE:
        raise MalformedMessage(f"bad header {header!r}")
    if header[3] != VERSION:
        raise MalformedMessage(f"unsupported protocol version {header[3]}")
    if not 1 <= len(body) <= MAX_BODY:
        raise MalformedMessage(f"body frame of {len(body)} bytes")
    try:
        msg = msgpack.unpackb(body, raw=False)
    except Exception as exc:
        raise MalformedMessage(f"body is not MessagePack: {exc}") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise MalformedMessage("body is not a map with a str 'type'")
    return msg


# --------------------------------------------------------------------------
# Worker
# --------------------------------------------------------------------------

Job = collections.namedtuple("Job", "generation delivery task")


class Worker:
    """A pulling worker of the broker's worker port (section 8)."""

    def __init__(self, endpoint, pools, credit, handler, name=None, context=None,
                 heartbeat_interval=HEARTBEAT_INTERVAL, liveness=LIVENESS,
                 reconnect_min=RECONNECT_MIN, reconnect_max=RECONNECT_MAX, curve=None):
        if isinstance(pools, str):
            pools = [pools]
        self.endpoint = endpoint
        self.pools = list(pools)
        self.credit = int(credit)
        self.handler = handler
        self.name = name or f"py-{pysocket.gethostname()}-{os.getpid()}"
        self.context = context or zmq.Context.instance()
        self.heartbeat_interval = heartbeat_interval
        self.liveness = liveness
        self.reconnect_min = reconnect_min
        self.reconnect_max = reconnect_max
        # (server public, own public, own secret) for a CURVE broker
        # (section 17.2); producer.curve_keys reads them from key files.
        self.curve = curve

        # Counters, for tests and logs.
        self.handled = 0  # deliveries given to the handler
        self.results_sent = 0
        self.results_dropped = 0  # results of an earlier connection/registration
        self.malformed = 0  # malformed messages from the broker
        self.errors = 0  # `error` messages from the broker
        self.reconnects = 0  # new sockets after silence
        self.reregistrations = 0  # `ready` again after the broker's `disconnect`

        self._stop_requested = threading.Event()
        self._socket = None
        self._generation = 0  # bumped on every new socket and every re-registration
        self._pending = collections.deque()  # Jobs received, not yet handed to the handler
        self._busy = False  # the handler thread is running a Job
        self._last_recv = self._last_send = 0.0
        self._backoff = reconnect_min
        self._reconnect_at = None  # set while waiting to open a new socket

    # -- public -------------------------------------------------------------

    def stop(self):
        """Ask run() to leave gracefully. Safe to call from any thread or a signal handler."""
        self._stop_requested.set()

    def run(self, until=None, deadline=None, max_tasks=None, drain=True):
        """Serve until stop(), `until()` is true, `max_tasks` deliveries were
        handled, or time.monotonic() passes `deadline`.

        On leaving, the worker sends `ready` with credit 0, finishes the delivery
        in progress and, if `drain`, the others it has already received, reports
        them, and sends `disconnect` (section 10, graceful shutdown). Deliveries
        it does not finish are given back by that `disconnect` (and counted by the
        broker as failed attempts). With `max_tasks` nothing beyond that number is
        handled. Returns True, or False when it left because of `deadline`.
        """
        pipe, thread = self._start_handler_thread()
        try:
            return self._loop(pipe, until, deadline, max_tasks, drain)
        finally:
            pipe.send_pyobj(None)  # ends the handler thread once it is idle
            if not self._busy:
                thread.join(1.0)
            pipe.close(linger=0)
            if self._socket is not None:
                self._socket.close(linger=0)
                self._socket = None

    # -- the handler thread -------------------------------------------------

    def _start_handler_thread(self):
        address = f"inproc://miyamoto-worker-{id(self)}-{time.monotonic_ns()}"
        pipe = self.context.socket(zmq.PAIR)
        pipe.bind(address)
        thread = threading.Thread(target=self._handler_thread, args=(address,),
                                  name="miyamoto-handler", daemon=True)
        thread.start()
        return pipe, thread

    def _handler_thread(self, address):
        pipe = self.context.socket(zmq.PAIR)
        pipe.connect(address)
        try:
            while True:
                job = pipe.recv_pyobj()
                if job is None:
                    return
                pipe.send_pyobj((job, *self._call_handler(job.task)))
        finally:
            pipe.close(linger=0)

    def _call_handler(self, task):
        """Run the handler; return (outcome, reason, retry_after)."""
        try:
            verdict = self.handler(task)
        except TaskFailed as exc:
            return "failure", str(exc.reason), exc.retry_after
        except Exception as exc:  # any error in the handler fails the attempt
            return "failure", str(exc) or type(exc).__name__, None
        if verdict is False:
            return "failure", "handler returned False", None
        return "success", None, None

    # -- the I/O loop (main thread) -----------------------------------------

    def _loop(self, pipe, until, deadline, max_tasks, drain):
        self._open_socket()
        stopping = None  # None, "graceful" or "deadline"
        while True:
            now = time.monotonic()

            # 1. Decide whether to leave.
            if stopping is None:
                if deadline is not None and now >= deadline:
                    stopping = "deadline"
                elif (self._stop_requested.is_set() or (until is not None and until())
                      or (max_tasks is not None and self.handled >= max_tasks)):
                    stopping = "graceful"
                if stopping is not None and self._socket is not None:
                    self._send_ready(0)  # no new deliveries (section 10)
            if stopping is not None:
                if stopping == "deadline" or not drain or \
                        (max_tasks is not None and self.handled >= max_tasks):
                    # Not handled here: the final `disconnect` gives them back.
                    # (Also catches deliveries the broker sent before it saw credit 0.)
                    self._pending.clear()
                if (stopping == "deadline" or not self._busy) and not self._pending:
                    self._finish_stop()
                    return stopping != "deadline"

            # 2. Hand the next delivery to the handler thread.
            if not self._busy and self._pending and \
                    (max_tasks is None or self.handled < max_tasks):
                pipe.send_pyobj(self._pending.popleft())
                self._busy = True
                self.handled += 1

            # 3. Wait for the broker or the handler.
            poller = zmq.Poller()
            poller.register(pipe, zmq.POLLIN)
            if self._socket is not None:
                poller.register(self._socket, zmq.POLLIN)
            timeout = 0.1 if self._reconnect_at is None else \
                max(0.0, min(0.1, self._reconnect_at - now))
            events = dict(poller.poll(int(timeout * 1000)))
            if pipe in events:
                self._on_handler_done(*pipe.recv_pyobj())
            if self._socket is not None and self._socket in events:
                self._receive_all(stopping is not None)

            # 4. Heartbeat, liveness and reconnection (section 9).
            now = time.monotonic()
            if self._socket is None:
                if self._reconnect_at is not None and now >= self._reconnect_at:
                    self._open_socket()
            elif now - self._last_recv > self.liveness:
                self._broker_silent()
            elif now - self._last_send >= self.heartbeat_interval:
                self._send({"type": "heartbeat"})

    def _open_socket(self):
        self._generation += 1
        self._socket = self.context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        if self.curve is not None:
            server_public, public, secret = self.curve
            self._socket.curve_serverkey = server_public
            self._socket.curve_publickey = public
            self._socket.curve_secretkey = secret
        self._socket.connect(self.endpoint)
        self._reconnect_at = None
        self._last_recv = time.monotonic()  # give the new connection a full liveness period
        self._send_ready(self.credit)
        log.info("connected to %s, ready for %s with credit %d",
                 self.endpoint, self.pools, self.credit)

    def _broker_silent(self):
        delay = self._backoff
        self._backoff = min(self._backoff * 2, self.reconnect_max)
        log.warning("broker silent for %.1f s; new socket in %.0f s",
                    time.monotonic() - self._last_recv, delay)
        self._socket.close(linger=0)
        self._socket = None
        self._pending.clear()  # those deliveries belong to the dead connection
        self._generation += 1
        self._reconnect_at = time.monotonic() + delay
        self.reconnects += 1

    def _send(self, body):
        self._socket.send_multipart(encode(body))
        self._last_send = time.monotonic()

    def _send_ready(self, credit):
        self._send({"type": "ready", "pools": self.pools, "credit": credit,
                    "name": self.name})

    def _finish_stop(self):
        if self._socket is not None:
            self._send({"type": "disconnect"})
            # Let the last results and the disconnect leave before closing.
            self._socket.close(linger=1000)
            self._socket = None
        log.info("left: %d handled, %d results sent", self.handled, self.results_sent)

    def _on_handler_done(self, job, outcome, reason, retry_after):
        self._busy = False
        if job.generation != self._generation or self._socket is None:
            # Section 8.6 rule 6 and section 8.3 (`disconnect`): the broker has
            # already given this delivery back; do not report it.
            self.results_dropped += 1
            log.info("dropped result of delivery %s from an earlier connection", job.delivery)
            return
        result = {"type": "result", "delivery": job.delivery, "task_id": job.task["id"],
                  "outcome": outcome, "responded": True}  # workers MUST say responded
        if reason is not None:
            result["reason"] = reason
        if retry_after is not None:
            result["retry_after"] = float(retry_after)
        self._send(result)
        self.results_sent += 1

    def _receive_all(self, stopping):
        while self._socket is not None:
            try:
                frames = self._socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._last_recv = time.monotonic()  # any message is a sign of life
            self._backoff = self.reconnect_min
            try:
                msg = decode(frames)
            except MalformedMessage as exc:
                self.malformed += 1
                log.warning("dropped malformed message from broker: %s", exc)
                continue
            kind = msg["type"]
            if kind == "task":
                self._on_task(msg)
            elif kind == "heartbeat":
                pass
            elif kind == "disconnect":
                self._on_disconnect(msg, stopping)
            elif kind == "error":
                self.errors += 1
                log.warning("broker error %s: %s", msg.get("code"), msg.get("reason"))
            else:
                self.malformed += 1
                log.warning("dropped message of unknown type %r", kind)

    def _on_task(self, msg):
        delivery, task = msg.get("delivery"), msg.get("task")
        if not (isinstance(delivery, int) and not isinstance(delivery, bool)
                and delivery >= 0 and isinstance(task, dict)
                and isinstance(task.get("id"), str)):
            self.malformed += 1
            log.warning("dropped malformed task message: %r", msg)
            return
        # Defaults for keys the broker may omit (section 8.4).
        task.setdefault("params", [])
        task.setdefault("headers", [])
        self._pending.append(Job(self._generation, delivery, task))

    def _on_disconnect(self, msg, stopping):
        log.warning("broker sent disconnect (%s)", msg.get("reason"))
        self._pending.clear()  # given back by the broker already
        self._generation += 1  # the result in progress, if any, will be dropped
        if stopping:
            self._socket.close(linger=0)  # we were leaving anyway
            self._socket = None
        else:
            self._send_ready(self.credit)  # same connection (section 9 rule 5)
            self.reregistrations += 1


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description="Miyamoto pull worker")
    parser.add_argument("--broker", default="tcp://127.0.0.1:7001",
                        help="broker worker endpoint, base port + 1 (default %(default)s)")
    parser.add_argument("--pool", action="append", required=True,
                        help="pool to serve (zmq://POOL tasks); repeat for several")
    parser.add_argument("--credit", type=int, default=1,
                        help="deliveries outstanding at once (default %(default)s)")
    parser.add_argument("--fail-first", type=int, default=0, metavar="K",
                        help="report failure for the first K deliveries")
    parser.add_argument("--log", metavar="FILE", help="append one JSON line per task (default stdout)")
    parser.add_argument("--max-tasks", type=int, metavar="M", help="leave after M tasks")
    parser.add_argument("--name", help="worker name for the broker's logs")
    parser.add_argument("-v", "--verbose", action="store_true", help="log to stderr")
    parser.add_argument("--curve-server-key", default=os.environ.get("MIYAMOTO_CURVE_SERVER_KEY"),
                        help="the brokers' public key file (server.key): connect over CURVE")
    parser.add_argument("--curve-key", default=os.environ.get("MIYAMOTO_CURVE_KEY"),
                        help="this worker's secret key file (NAME.key_secret)")
    args = parser.parse_args(argv)
    from producer import curve_keys
    curve = curve_keys(args.curve_server_key, args.curve_key)

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s worker %(levelname)s %(message)s")
    out = open(args.log, "a", encoding="utf-8") if args.log else sys.stdout
    seen = 0

    def handle(task):
        nonlocal seen
        seen += 1
        outcome = "failure" if seen <= args.fail_first else "success"
        record = {"id": task["id"], "queue": task.get("queue"), "url": task.get("url"),
                  "params": task.get("params", []), "retry_count": task.get("retry_count"),
                  "execution_count": task.get("execution_count"), "outcome": outcome,
                  "seen": seen, "time": time.time()}
        out.write(json.dumps(record) + "\n")
        out.flush()
        if outcome == "failure":
            raise TaskFailed(f"fail-first: delivery {seen} of the first {args.fail_first} fails")
        return True

    worker = Worker(args.broker, args.pool, args.credit, handle, name=args.name, curve=curve)
    signal.signal(signal.SIGINT, lambda *_: worker.stop())
    signal.signal(signal.SIGTERM, lambda *_: worker.stop())
    worker.run(max_tasks=args.max_tasks)
    if out is not sys.stdout:
        out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
