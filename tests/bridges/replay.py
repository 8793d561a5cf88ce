"""A fake worker for fuzzing the pool's reader (no snakepit import, standard library only).

It completes the handshake like any bridge, then on ``replay`` writes to stdout exactly the
bytes the test describes, whatever they are, and then ``stay``s (reads the next request),
``exit``s, or ``answer``s the request properly. ``args.parts`` is a list of
``{"raw": "<base64>"}`` (written as is) and ``{"frame": "<base64 JSON body>", "delta": n}``
(written behind a 4-byte length of ``len(body) + delta``, so ``delta`` != 0 is a wrong length);
in a ``frame`` body the bytes ``"@ID@"`` are replaced by the request's id, so a test can write
a response to the request in flight without knowing its id. ``echo`` answers ``args`` as is.
Run it with ``python -I -S`` to start in milliseconds.
"""

import base64
import json
import os
import struct
import sys

stdin, stdout = sys.stdin.buffer, sys.stdout.buffer


def send(message):
    body = json.dumps(message).encode()
    stdout.write(struct.pack(">I", len(body)) + body)
    stdout.flush()


def replay(request):
    args, rid = request.get("args", {}), request["id"]
    for part in args.get("parts", []):
        if "raw" in part:
            stdout.write(base64.b64decode(part["raw"]))
        else:
            body = base64.b64decode(part["frame"]).replace(b'"@ID@"', str(rid).encode())
            length = max(0, min(len(body) + part.get("delta", 0), 0xFFFFFFFF))
            stdout.write(struct.pack(">I", length) + body)
    stdout.flush()
    then = args.get("then", "stay")
    if then == "exit":
        os._exit(0)
    if then == "answer":
        send({"id": rid, "success": True, "result": {"replayed": True}})


def main():
    while True:
        header = stdin.read(4)
        if len(header) < 4:
            return
        request = json.loads(stdin.read(struct.unpack(">I", header)[0]))
        command, rid = request["command"], request["id"]
        if command == "ping":
            send({"id": rid, "success": True, "result": {"status": "ok", "pid": os.getpid()}})
        elif command == "replay":
            replay(request)
        else:
            send({"id": rid, "success": True, "result": request.get("args", {})})


main()
