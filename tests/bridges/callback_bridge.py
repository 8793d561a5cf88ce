"""A third-party-style protocol-2 bridge (no snakepit import) that calls host callbacks.

It implements PROTOCOL.md's *Callbacks* in a few lines, one request at a time, and can send
any call frame the test asks for, so the pool's side is tested against something that is not
one of the bundled bridges. Commands:

- ``call``: ``args.calls`` is a list of ``[name, args]``; they are sent at once (calls 0, 1,
  ...), and the result is the list of the ``$callback`` answers' args, in call order;
- ``raw``: ``args.frames`` are sent as they are (``"$id"`` becomes the request's id), then
  ``args.answers`` answers are awaited and returned in the order they came;
- ``sleep``: ``args.seconds``.

A ``$cancel`` for the request in progress ends it with ``cancelled`` (the answers it got so
far are dropped).
"""

import json
import os
import struct
import sys
import time

stdin, stdout = sys.stdin.buffer, sys.stdout.buffer


def read_exactly(n):
    data = b""
    while len(data) < n:
        chunk = stdin.read(n - len(data))
        if not chunk:
            sys.exit(0)
        data += chunk
    return data


def receive():
    (length,) = struct.unpack(">I", read_exactly(4))
    body = read_exactly(length)
    if body[:1] != b"\x00":
        return json.loads(body)
    (head,) = struct.unpack(">I", body[1:5])
    message = json.loads(body[5 : 5 + head])
    offset = 5 + head
    for entry in message.pop("$binary"):
        data = body[offset : offset + entry["size"]]
        offset += entry["size"]
        target = message
        for key in entry["path"][:-1]:
            target = target[key]
        target[entry["path"][-1]] = {"$bytes": data.hex()}  # binary shown as hex to the test
    return message


def send(message):
    body = json.dumps(message).encode()
    stdout.write(struct.pack(">I", len(body)) + body)
    stdout.flush()


def await_answers(rid, count):
    """The args of ``count`` $callback answers for ``rid``; None if it was cancelled."""
    answers = []
    while len(answers) < count:
        frame = receive()
        if frame.get("command") == "$cancel" and frame.get("id") == rid:
            return None
        if frame.get("command") == "$callback" and frame.get("id") == rid:
            answers.append(frame["args"])
    return answers


def handle(request):
    rid, command, args = request["id"], request["command"], request.get("args", {})
    if command == "ping":
        result = {
            "status": "ok",
            "capabilities": ["cancel", "binary", "callbacks"],
            "pid": os.getpid(),
        }
        if "max_in_flight" in args:
            result.update(protocol=2, max_concurrency=1)
        return {"id": rid, "success": True, "result": result}
    if command == "sleep":
        time.sleep(args["seconds"])
        return {"id": rid, "success": True, "result": None}
    if command == "call":
        for number, (name, call_args) in enumerate(args["calls"]):
            send({"id": rid, "call": number, "name": name, "args": call_args})
        answers = await_answers(rid, len(args["calls"]))
        if answers is None:
            return {"id": rid, "success": False, "error": "cancelled"}
        return {"id": rid, "success": True, "result": sorted(answers, key=lambda a: a["call"])}
    if command == "raw":
        for frame in args["frames"]:
            send({key: rid if value == "$id" else value for key, value in frame.items()})
        answers = await_answers(rid, args["answers"])
        if answers is None:
            return {"id": rid, "success": False, "error": "cancelled"}
        return {"id": rid, "success": True, "result": answers}
    return {"id": rid, "success": False, "error": f"unknown command {command!r}"}


def main():
    while True:
        request = receive()
        if request.get("command", "").startswith("$"):
            continue  # a late $callback or $cancel: nothing in progress to give it to
        send(handle(request))


if __name__ == "__main__":
    main()
