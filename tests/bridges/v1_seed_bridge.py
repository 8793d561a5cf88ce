"""A protocol-1 bridge in the manner of the Elixir Snakepit v0.1.2 Python bridge, written from
docs/PROTOCOL.md with the standard library only, and no snakepit code.

Like the seed's bridge, it answers its own commands' failures as successes whose result says
``"status": "error"`` (``divide`` by zero: ``success: true``, ``{"status": "error", "error":
"Division by zero", ...}``), stamps every envelope with an ISO-8601 ``timestamp`` and every
result with a float one. Unlike it, an unknown command is ``success: false`` and fd 0 / fd 1 are
moved aside, as the protocol level asks. It speaks protocol 1 only: the handshake answer has no
``protocol`` and no ``capabilities`` key, ``max_in_flight`` is ignored, one request at a time.

Commands: ``ping``, ``divide`` (``a``, ``b`` -> ``{"status": "ok", "quotient": a / b, ...}``).
"""

import datetime
import json
import os
import signal
import struct
import sys
import time

STARTED = time.time()
MAX_FRAME = int(os.environ.get("SNAKEPIT_MAX_FRAME_BYTES") or 64 * 1024 * 1024)
handled = 0


def protect_stdio():
    """Private copies of the protocol's pipes; fd 0 becomes /dev/null and fd 1 stderr."""
    requests, responses = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)
    return requests, responses


def fatal(why):
    print(f"v1 seed bridge: {why}", file=sys.stderr, flush=True)
    os._exit(3)


def read_exactly(fd, n):
    """``n`` bytes, or fewer only at the end of input."""
    chunks = bytearray()
    while len(chunks) < n:
        chunk = os.read(fd, n - len(chunks))
        if not chunk:
            break
        chunks += chunk
    return bytes(chunks)


def write_frame(fd, message):
    body = json.dumps(message).encode()
    if len(body) > MAX_FRAME:
        body = json.dumps(
            {
                "id": message["id"],
                "success": False,
                "error": f"response of {len(body)} bytes exceeds the frame limit of {MAX_FRAME} bytes",
            }
        ).encode()
    frame = struct.pack(">I", len(body)) + body
    while frame:
        frame = frame[os.write(fd, frame) :]


def ping(args):
    return {
        "status": "ok",
        "bridge_type": "v1-seed",
        "uptime": time.time() - STARTED,
        "requests_handled": handled,
        "worker_id": args.get("worker_id", os.environ.get("SNAKEPIT_WORKER_ID", "unknown")),
        "timestamp": time.time(),
    }


def divide(args):
    try:
        a, b = args.get("a", 0), args.get("b", 0)
        if b == 0:
            raise ValueError("Division by zero")
        return {"status": "ok", "quotient": a / b, "timestamp": time.time()}
    except Exception as exc:  # the seed's way: a failure is a result saying so
        return {"status": "error", "error": str(exc), "timestamp": time.time()}


COMMANDS = {"ping": ping, "divide": divide}


def answer(request):
    global handled
    request_id = request.get("id")
    if type(request_id) is not int:
        fatal("a request without an integer id")
    command = request.get("command")
    if command == "$cancel":
        return None  # no cancel capability: nothing else runs while a request does
    handled += 1
    stamp = datetime.datetime.now().isoformat()
    handler = COMMANDS.get(command)
    if handler is None:
        supported = ", ".join(sorted(COMMANDS))
        error = f"unknown command {command!r} (supported: {supported})"
        return {"id": request_id, "success": False, "error": error, "timestamp": stamp}
    args = request.get("args")
    result = handler(args if isinstance(args, dict) else {})
    return {"id": request_id, "success": True, "result": result, "timestamp": stamp}


def main():
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    requests, responses = protect_stdio()
    while True:
        header = read_exactly(requests, 4)
        if not header:
            return 0  # end of input between frames: the pool is done with us
        if len(header) < 4:
            fatal("input ended inside a frame header")
        (length,) = struct.unpack(">I", header)
        if length > MAX_FRAME:
            fatal(f"frame of {length} bytes exceeds the limit of {MAX_FRAME}")
        body = read_exactly(requests, length)
        if len(body) < length:
            fatal("input ended inside a frame")
        try:
            request = json.loads(body.decode("utf-8"))
        except ValueError as exc:
            fatal(f"undecodable frame: {exc}")
        if not isinstance(request, dict):
            fatal("a frame that is not an object")
        response = answer(request)
        if response is not None:
            write_frame(responses, response)


if __name__ == "__main__":
    sys.exit(main())
