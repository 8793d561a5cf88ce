"""A third-party protocol-2 bridge with the ``stream`` capability, written from PROTOCOL.md
alone (no snakepit library): one thread, stdlib only.

Commands: ``ping``; ``count`` (args ``n``, ``fail_at?``): streams ``{"i": 0}`` ...
``{"i": n - 1}``, ending with ``result`` ``{"done": n}`` (a last item) unless ``plain_end``;
``flood`` (args ``n``): sends ``n`` items ignoring its credit (a broken bridge); ``echo``.
"""

import json
import os
import select
import struct

stdin = os.fdopen(os.dup(0), "rb", buffering=0)
stdout = os.fdopen(os.dup(1), "wb", buffering=0)
os.dup2(2, 1)

streams = {}  # id -> {"gen": generator, "credit": int, "command": str}
outbox = []


def send(message):
    body = json.dumps(message).encode()
    outbox.append(struct.pack(">I", len(body)) + body)


def flush():
    if outbox:
        stdout.write(b"".join(outbox))
        outbox.clear()


def count(args):
    for i in range(args["n"]):
        if args.get("fail_at") == i:
            raise ValueError(f"failed at item {i}")
        yield {"i": i}
    return None if args.get("plain_end") else {"done": args["n"]}


def collect(generator):
    """A streaming handler called without meta.stream: its items, then its final value."""
    items = []
    while True:
        try:
            items.append(next(generator))
        except StopIteration as end:
            return items if end.value is None else [*items, end.value]


def handle(message):
    request_id, command = message["id"], message.get("command")
    args = message.get("args") or {}
    window = ((message.get("meta") or {}).get("stream") or {}).get("window")
    if command == "$credit":
        if request_id in streams:
            streams[request_id]["credit"] += args["items"]
    elif command == "$cancel":
        if streams.pop(request_id, None) is not None:
            send({"id": request_id, "success": False, "error": "cancelled"})
    elif command == "ping":
        result = {"status": "ok"}
        if isinstance(args.get("max_in_flight"), int):
            result.update(protocol=2, max_concurrency=64, capabilities=["cancel", "stream"])
        send({"id": request_id, "success": True, "result": result})
    elif command == "echo":
        send({"id": request_id, "success": True, "result": args})
    elif command == "flood":
        for i in range(args["n"]):
            send({"id": request_id, "item": i})
        send({"id": request_id, "success": True, "result": None})
    elif command == "count" and window:
        streams[request_id] = {"gen": count(args), "credit": window}
    elif command == "count":
        try:
            send({"id": request_id, "success": True, "result": collect(count(args))})
        except ValueError as error:
            send({"id": request_id, "success": False, "error": f"count: {error}"})
    else:
        send({"id": request_id, "success": False, "error": f"unknown command {command!r}"})


def produce():
    """One item from every stream that has credit."""
    for request_id, stream in list(streams.items()):
        if stream["credit"] <= 0:
            continue
        try:
            item = next(stream["gen"])
        except StopIteration as end:
            del streams[request_id]
            send({"id": request_id, "success": True, "result": end.value})
        except ValueError as error:
            del streams[request_id]
            send({"id": request_id, "success": False, "error": f"count: {error}"})
        else:
            stream["credit"] -= 1
            send({"id": request_id, "item": item})


buffer = b""
while True:
    ready = any(s["credit"] > 0 for s in streams.values())
    if select.select([stdin], [], [], 0 if ready else None)[0]:
        chunk = stdin.read(65536)
        if not chunk:
            break
        buffer += chunk
        while len(buffer) >= 4 and len(buffer) >= 4 + struct.unpack(">I", buffer[:4])[0]:
            size = struct.unpack(">I", buffer[:4])[0]
            handle(json.loads(buffer[4 : 4 + size]))
            buffer = buffer[4 + size :]
    produce()
    flush()
