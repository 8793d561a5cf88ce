"""A third-party-style protocol-2 bridge (no snakepit import) with shared memory, for tests.

It implements PROTOCOL.md's *Binary values* (capabilities ``binary``, ``text``, ``shm``) in a
few lines, and can break the rules on request, so the pool's side is tested against something
that is not one of the bundled bridges. Commands:

- ``lanes``: for each value of the request that came as an attachment, its path, how it came
  (``inline`` or ``shm``), whether it was text, and for a segment whether the file exists now;
- ``echo``: the args back, each bytes value through a segment of its own when it is at least
  ``SNAKEPIT_SHM_THRESHOLD`` bytes (when offered), else inline; each ``str`` as text;
- ``env``: the SNAKEPIT_SHM_* variables it got;
- ``bad``: an answer whose ``result.x`` breaks a rule, ``args.kind`` says which.
"""

import json
import os
import struct
import sys

stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
SHM_DIR = os.environ.get("SNAKEPIT_SHM_DIR")
PREFIX = os.environ.get("SNAKEPIT_SHM_PREFIX", "")
THRESHOLD = int(os.environ.get("SNAKEPIT_SHM_THRESHOLD", "0") or 0)
CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
counter = [0]


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
        return json.loads(body), []
    (head,) = struct.unpack(">I", body[1:5])
    message = json.loads(body[5 : 5 + head])
    offset, lanes = 5 + head, []
    for entry in message.pop("$binary"):
        if "shm" in entry:
            path = os.path.join(SHM_DIR, entry["shm"])
            with open(path, "rb") as segment:
                data = segment.read(entry["size"])
            lane = {"lane": "shm", "exists": os.path.exists(path)}
        else:
            data = body[offset : offset + entry["size"]]
            offset += entry["size"]
            lane = {"lane": "inline"}
        lanes.append({"path": entry["path"], "text": entry.get("text", False), **lane})
        place(message, entry["path"], data.decode() if entry.get("text") else data)
    return message, lanes


def place(message, path, value):
    for key in path[:-1]:
        message = message[key]
    message[path[-1]] = value


def segment(data, name=None):
    """A new segment holding ``data``; its name."""
    counter[0] += 1
    name = name or f"{PREFIX}{counter[0]}"
    fd = os.open(os.path.join(SHM_DIR, name), CREATE, 0o600)
    os.write(fd, data)
    os.close(fd)
    return name


def send(message, values=()):
    """``message`` with ``values`` ((path, bytes, text, shm name or None)) as attachments."""
    if not values:
        body = json.dumps(message).encode()
        stdout.write(struct.pack(">I", len(body)) + body)
        stdout.flush()
        return
    entries, inline = [], []
    for path, data, text, name in values:
        entry = {"path": path, "size": len(data)}
        if text:
            entry["text"] = True
        if name is not None:
            entry["shm"] = name
        else:
            inline.append(data)
        entries.append(entry)
    head = json.dumps({**message, "$binary": entries}).encode()
    body = b"\x00" + struct.pack(">I", len(head)) + head + b"".join(inline)
    stdout.write(struct.pack(">I", len(body)) + body)
    stdout.flush()


def echo(rid, args):
    values = []
    for key, value in list(args.items()):
        if isinstance(value, (bytes, str)):
            data = value if isinstance(value, bytes) else value.encode()
            name = segment(data) if SHM_DIR and THRESHOLD and len(data) >= THRESHOLD else None
            values.append((["result", key], data, isinstance(value, str), name))
            args[key] = None
    send({"id": rid, "success": True, "result": args}, values)


def bad(rid, kind):
    x = ["result", "x"]
    answer = {"id": rid, "success": True, "result": {"x": None}}
    if kind == "outside_prefix":
        send(answer, [(x, b"abc", False, segment(b"abc", name="elsewhere"))])
    elif kind == "request_segment":  # the pool's own segment of an earlier request
        send(answer, [(x, b"abc", False, "p1")])
    elif kind == "slash":
        send(answer, [(x, b"abc", False, PREFIX + "/../../etc")])
    elif kind == "symlink":
        name = f"{PREFIX}link"
        os.symlink("/etc/hostname", os.path.join(SHM_DIR, name))
        send(answer, [(x, b"abc", False, name)])
    elif kind == "fifo":
        name = f"{PREFIX}fifo"
        os.mkfifo(os.path.join(SHM_DIR, name), 0o600)
        send(answer, [(x, b"abc", False, name)])
    elif kind == "other_owner":
        name = segment(b"abc")
        os.chown(os.path.join(SHM_DIR, name), 65534, 65534)
        send(answer, [(x, b"abc", False, name)])
    elif kind == "short":
        name = segment(b"abc")
        entries = [{"path": x, "size": 1000, "shm": name}]
        head = json.dumps({**answer, "$binary": entries}).encode()
        body = b"\x00" + struct.pack(">I", len(head)) + head
        stdout.write(struct.pack(">I", len(body)) + body)
        stdout.flush()
    elif kind == "missing":
        send(answer, [(x, b"abc", False, f"{PREFIX}gone")])
    elif kind == "not_utf8":
        send(answer, [(x, b"\xff\xfe", True, None)])
    elif kind == "big_not_utf8":  # read on a thread by the pool: the fault surfaces there
        data = b"\xff" * (2 << 20)
        send(answer, [(x, data, True, segment(data))])
    elif kind == "over_payload":  # a segment bigger than max_payload_bytes says it holds
        name = segment(b"abc")
        entries = [{"path": x, "size": 1 << 40, "shm": name}]
        head = json.dumps({**answer, "$binary": entries}).encode()
        body = b"\x00" + struct.pack(">I", len(head)) + head
        stdout.write(struct.pack(">I", len(body)) + body)
        stdout.flush()
    elif kind == "leave_segment":  # made, never sent: the pool deletes it when it exits
        segment(b"left behind")
        os._exit(1)
    else:
        raise ValueError(kind)


def main():
    while True:
        request, lanes = receive()
        rid, command, args = request["id"], request["command"], request.get("args", {})
        if command == "ping":
            capabilities = ["binary", "text"] + (["shm"] if SHM_DIR else [])
            result = {"status": "ok", "capabilities": capabilities, "pid": os.getpid()}
            if "max_in_flight" in args:
                result.update(protocol=2, max_concurrency=1)
            send({"id": rid, "success": True, "result": result})
        elif command == "lanes":
            send({"id": rid, "success": True, "result": lanes})
        elif command == "echo":
            echo(rid, args)
        elif command == "env":
            names = ("SNAKEPIT_SHM_DIR", "SNAKEPIT_SHM_PREFIX", "SNAKEPIT_SHM_THRESHOLD")
            send({"id": rid, "success": True, "result": {n: os.environ.get(n) for n in names}})
        elif command == "bad":
            bad(rid, args["kind"])
        elif command.startswith("$"):
            continue
        else:
            send({"id": rid, "success": False, "error": f"unknown command {command!r}"})


if __name__ == "__main__":
    main()
