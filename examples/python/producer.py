#!/usr/bin/env python3
"""A Miyamoto producer: client library and command line.

Written from protocol/PROTOCOL.md (wire protocol version 1) alone.

Library use:

    from producer import Producer, RequestError

    with Producer("tcp://127.0.0.1:7000") as p:
        task_id, eta = p.enqueue("default", "zmq://thumbs", params={"n": 1}, countdown=5)
        print(p.get("default", task_id)["state"])
        p.cancel("default", task_id)

Command line (prints JSON on stdout):

    python producer.py --broker tcp://127.0.0.1:7000 enqueue URL [key=value ...] [--countdown S] [--queue Q]
    python producer.py --broker tcp://127.0.0.1:7000 get ID [--queue Q]
    python producer.py --broker tcp://127.0.0.1:7000 cancel ID [--queue Q]
    python producer.py --broker tcp://127.0.0.1:7000 ping

Over CURVE (a broker started with --curve-dir; PROTOCOL.md section 17.2), give
the brokers' public key file and this client's secret key file, both as
`miyamoto curve-keygen` or pyzmq's zmq.auth.create_certificates write them:

    python producer.py --curve-server-key keys/server.key --curve-key me.key_secret ping

(or MIYAMOTO_CURVE_SERVER_KEY and MIYAMOTO_CURVE_KEY in the environment).

Exit status: 0 on success, 1 when the broker answered with an error reply,
2 when no reply came after all tries, 3 on a protocol violation by the broker.

Behaviour (PROTOCOL.md section 7.8, "Lazy Pirate"): one DEALER socket with
LINGER 0; each request gets a fresh uuid4 `request_id`; the client waits a bounded
time for the reply and, on timeout, resends the *identical* frames (same
`request_id`), which the broker deduplicates for enqueue and cancel (section 7.2).
Replies whose `request_id` is not the one being waited for are discarded.
"""

import argparse
import json
import os
import sys
import time
import uuid

import msgpack
import zmq

# --------------------------------------------------------------------------
# Wire format (sections 5 and 6)
# --------------------------------------------------------------------------

SIGNATURE = b"MYM"
VERSION = 1
HEADER = SIGNATURE + bytes([VERSION])  # b"MYM\x01"
MAX_BODY = 2 * 1024 * 1024  # 2 MiB, section 5

DEFAULT_TIMEOUT = 3.0  # seconds to wait for one reply (section 7.8 suggests 3 s)
DEFAULT_RETRIES = 2  # resends after the first try ("a few tries", section 7.8)


class MiyamotoError(Exception):
    """Base class of every error raised by this module."""


class MalformedMessage(MiyamotoError):
    """Frames received from the broker that do not follow sections 5 and 6."""


class RequestError(MiyamotoError):
    """The broker answered with an `error` reply (section 7.7).

    `code` is what programs decide on; `reason` is for people only.
    A code this module does not know must be treated like `internal`.
    """

    KNOWN_CODES = ("bad_request", "not_found", "malformed", "unsupported_version",
                   "unavailable", "internal")

    def __init__(self, code, reason, request_id=""):
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason
        self.request_id = request_id

    @property
    def effective_code(self):
        """The code to act on: unknown codes count as `internal` (section 7.7)."""
        return self.code if self.code in self.KNOWN_CODES else "internal"


class NoReply(MiyamotoError):
    """No reply arrived after all tries (timeout per try x number of tries)."""


class UnexpectedReply(MiyamotoError):
    """The broker answered with a reply of the wrong type for the request."""


def encode(body):
    """Build the three frames of a message: [delimiter, header, msgpack map]."""
    # use_bin_type: Python str -> msgpack str, bytes -> msgpack bin (section 6.1).
    packed = msgpack.packb(body, use_bin_type=True)
    if len(packed) > MAX_BODY:
        raise ValueError(f"body frame is {len(packed)} bytes, more than 2 MiB")
    return [b"", HEADER, packed]


def decode(frames):
    """Check the frames as a DEALER receives them and return the body map."""
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
        # raw=False: msgpack str -> Python str, bin -> bytes. Trailing bytes
        # after the map raise ExtraData, which we treat as malformed.
        msg = msgpack.unpackb(body, raw=False)
    except Exception as exc:  # any msgpack decoding error
        raise MalformedMessage(f"body is not MessagePack: {exc}") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise MalformedMessage("body is not a map with a str 'type'")
    return msg


def pairs(value):
    """Turn a dict or an iterable of (key, value) into `pairs` (section 6.1).

    Both items of each pair must be `str` on the wire, so non-str values (such as
    the int in {"n": 1}) are converted with str().
    """
    if value is None:
        return []
    items = value.items() if isinstance(value, dict) else value
    out = []
    for item in items:
        k, v = item
        out.append([str(k), str(v)])
    return out


# --------------------------------------------------------------------------
# Producer
# --------------------------------------------------------------------------


def curve_keys(server_key_file, key_file):
    """CURVE keys from key files (section 17.2): (server public, own public,
    own secret), or None when neither file is given."""
    if not server_key_file and not key_file:
        return None
    if not (server_key_file and key_file):
        raise ValueError("the server key file and the client key file go together")
    import zmq.auth
    server_public, _ = zmq.auth.load_certificate(server_key_file)
    public, secret = zmq.auth.load_certificate(key_file)
    if secret is None:
        raise ValueError(f"{key_file} holds no secret key (give the .key_secret file)")
    return server_public, public, secret


def apply_curve(socket, keys):
    """Makes `socket` a CURVE client with `keys` (from curve_keys); before connect."""
    if keys is not None:
        server_public, public, secret = keys
        socket.curve_serverkey = server_public
        socket.curve_publickey = public
        socket.curve_secretkey = secret


class Producer:
    """A client of the broker's base port (section 7). `curve` is
    curve_keys(...) for a broker that requires CURVE."""

    def __init__(self, endpoint, timeout=DEFAULT_TIMEOUT, retries=DEFAULT_RETRIES,
                 context=None, curve=None):
        self.endpoint = endpoint
        self.curve = curve
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.context = context or zmq.Context.instance()
        self.dropped = 0  # malformed or stale replies discarded
        self.last_reply = None  # the last matching reply map, for callers who want it all
        self.socket = None
        self._connect()

    # -- socket management ------------------------------------------------

    def _connect(self):
        self.socket = self.context.socket(zmq.DEALER)
        # LINGER 0: closing with unsent requests must not hang (section 7.8).
        # No ZMQ_ROUTING_ID: let ZeroMQ choose the identity (section 4).
        self.socket.setsockopt(zmq.LINGER, 0)
        apply_curve(self.socket, self.curve)
        self.socket.connect(self.endpoint)

    def close(self):
        if self.socket is not None:
            self.socket.close(linger=0)
            self.socket = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- the Lazy Pirate request loop --------------------------------------

    def request(self, body, expect=None):
        """Send one request map and return the matching reply map.

        A `request_id` is added when the map has none. The same frames are resent
        on timeout, up to `self.retries` times. An `error` reply raises
        RequestError; a reply of another type than `expect` raises UnexpectedReply.
        """
        body = dict(body)
        request_id = body.setdefault("request_id", str(uuid.uuid4()))
        frames = encode(body)
        tries = 1 + self.retries
        for _ in range(tries):
            self.socket.send_multipart(frames)
            reply = self._wait_for(request_id, time.monotonic() + self.timeout)
            if reply is not None:
                break
        else:
            # Give up. Reopen the socket so that requests still queued in it
            # (broker unreachable) are dropped instead of sent later.
            self.close()
            self._connect()
            raise NoReply(f"no reply to {body.get('type')} {request_id} after "
                          f"{tries} tries of {self.timeout:g} s from {self.endpoint}")
        if reply["type"] == "error":
            raise RequestError(str(reply.get("code")), str(reply.get("reason")),
                               request_id)
        if expect is not None and reply["type"] != expect:
            raise UnexpectedReply(f"expected {expect!r}, got {reply['type']!r}: {reply!r}")
        return reply

    def _wait_for(self, request_id, deadline):
        """Receive until the reply carrying `request_id` arrives or the deadline passes."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            if not self.socket.poll(max(1, int(remaining * 1000)), zmq.POLLIN):
                return None
            frames = self.socket.recv_multipart()
            try:
                reply = decode(frames)
            except MalformedMessage as exc:
                # Section 11: log it, count it, drop it.
                self.dropped += 1
                print(f"producer: dropped malformed reply: {exc}", file=sys.stderr)
                continue
            if reply.get("request_id") != request_id:
                # A late or repeated reply to an earlier request (section 7.2),
                # or an error whose request_id the broker could not read ("").
                self.dropped += 1
                if reply.get("request_id") == "" and reply.get("type") == "error":
                    print(f"producer: dropped uncorrelated error reply: {reply!r}",
                          file=sys.stderr)
                continue
            self.last_reply = reply
            return reply

    # -- commands (sections 7.3 to 7.6) ------------------------------------

    def enqueue(self, queue, url, params=None, body=None, countdown=None, eta=None,
                name=None, method=None, headers=None, timeout=None,
                content_type=None, request_id=None):
        """Store a task. Returns (task id, eta as unix seconds by the broker's clock).

        `queue` None means the broker's default queue ("default"). `params` and
        `headers` may be dicts or lists of (key, value); `body` is bytes (a str is
        encoded as UTF-8). Pass `request_id` to choose the id yourself.
        """
        task = {"url": url}
        if params:
            task["params"] = pairs(params)
        if headers:
            task["headers"] = pairs(headers)
        if body is not None:
            task["body"] = body.encode("utf-8") if isinstance(body, str) else bytes(body)
        optional = {"countdown": countdown, "eta": eta, "name": name,
                    "method": method, "timeout": timeout, "content_type": content_type}
        task.update({k: v for k, v in optional.items() if v is not None})
        req = {"type": "enqueue", "task": task}
        if queue is not None:
            req["queue"] = queue
        if request_id is not None:
            req["request_id"] = request_id
        reply = self.request(req, expect="enqueued")
        return reply["id"], reply["eta"]

    def get(self, queue, id):
        """Return the TaskInfo map of a task (section 7.5)."""
        req = {"type": "get", "id": id}
        if queue is not None:
            req["queue"] = queue
        return self.request(req, expect="task")["task"]

    def cancel(self, queue, id):
        """Cancel a task that has not succeeded (section 7.4). Returns the task id."""
        req = {"type": "cancel", "id": id}
        if queue is not None:
            req["queue"] = queue
        return self.request(req, expect="cancelled")["id"]

    def ping(self):
        """Return {"node": ..., "version": ...} (section 7.6)."""
        reply = self.request({"type": "ping"}, expect="pong")
        return {"node": reply.get("node"), "version": reply.get("version")}


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def _jsonable(value):
    """bytes (a task body) are not JSON; show them as text when they decode."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value.hex()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _print(obj):
    print(json.dumps(obj, default=_jsonable, sort_keys=True))


def _parse_pair(text, sep):
    if sep not in text:
        raise argparse.ArgumentTypeError(f"expected KEY{sep}VALUE, got {text!r}")
    key, value = text.split(sep, 1)
    return [key, value]


def main(argv=None):
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--broker", default=argparse.SUPPRESS,
                        help="broker base endpoint (default tcp://127.0.0.1:7000)")
    common.add_argument("--timeout", type=float, default=argparse.SUPPRESS,
                        help=f"seconds to wait per try (default {DEFAULT_TIMEOUT:g})")
    common.add_argument("--retries", type=int, default=argparse.SUPPRESS,
                        help=f"resends after the first try (default {DEFAULT_RETRIES})")
    common.add_argument("--curve-server-key", default=argparse.SUPPRESS,
                        help="the brokers' public key file (server.key): connect over CURVE")
    common.add_argument("--curve-key", default=argparse.SUPPRESS,
                        help="this client's secret key file (NAME.key_secret)")

    top = argparse.ArgumentParser(description="Miyamoto producer", parents=[common])
    top.add_argument("command", choices=["enqueue", "get", "cancel", "ping"])
    top.add_argument("args", nargs=argparse.REMAINDER, help="command arguments")
    ns = top.parse_args(argv)

    sub = argparse.ArgumentParser(prog=f"producer.py {ns.command}", parents=[common])
    if ns.command == "enqueue":
        sub.add_argument("url", help="http(s)://... or zmq://POOL")
        sub.add_argument("params", nargs="*", metavar="key=value",
                         type=lambda s: _parse_pair(s, "="), help="form parameters")
        sub.add_argument("--queue", help='queue name (default "default")')
        sub.add_argument("--countdown", type=float, help="fire in S seconds")
        sub.add_argument("--eta", type=float, help="fire at this unix time")
        sub.add_argument("--name", help="task name")
        sub.add_argument("--method", help="POST (default), GET, PUT, PATCH, DELETE")
        sub.add_argument("--task-timeout", type=float, help="seconds per attempt (default 30)")
        sub.add_argument("--header", action="append", default=[], metavar="Name:value",
                         type=lambda s: _parse_pair(s, ":"), help="extra HTTP header")
        sub.add_argument("--body", help="raw body (UTF-8 text); exclusive with params")
        sub.add_argument("--content-type", help="content type of --body")
    elif ns.command in ("get", "cancel"):
        sub.add_argument("id", help="task id")
        sub.add_argument("--queue", help='queue name (default "default")')
    args = sub.parse_intermixed_args(ns.args)

    # An option given after the command wins over the same option before it.
    opts = {**vars(ns), **vars(args)}
    broker = opts.get("broker", "tcp://127.0.0.1:7000")
    curve = curve_keys(opts.get("curve_server_key", os.environ.get("MIYAMOTO_CURVE_SERVER_KEY")),
                       opts.get("curve_key", os.environ.get("MIYAMOTO_CURVE_KEY")))
    producer = Producer(broker, timeout=opts.get("timeout", DEFAULT_TIMEOUT),
                        retries=opts.get("retries", DEFAULT_RETRIES), curve=curve)
    try:
        if ns.command == "enqueue":
            task_id, eta = producer.enqueue(
                args.queue, args.url, params=args.params or None,
                body=args.body, countdown=args.countdown, eta=args.eta,
                name=args.name, method=args.method, headers=args.header or None,
                timeout=args.task_timeout, content_type=args.content_type)
            _print({"id": task_id, "eta": eta, "queue": producer.last_reply.get("queue")})
        elif ns.command == "get":
            _print(producer.get(args.queue, args.id))
        elif ns.command == "cancel":
            _print({"cancelled": producer.cancel(args.queue, args.id)})
        else:
            _print(producer.ping())
        return 0
    except RequestError as exc:
        _print({"error": {"code": exc.code, "reason": exc.reason,
                          "request_id": exc.request_id}})
        return 1
    except NoReply as exc:
        _print({"error": {"code": "no_reply", "reason": str(exc)}})
        return 2
    except MiyamotoError as exc:
        _print({"error": {"code": "protocol", "reason": str(exc)}})
        return 3
    finally:
        producer.close()


if __name__ == "__main__":
    sys.exit(main())
