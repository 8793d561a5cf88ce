"""A third-party-style protocol-2 bridge (stdlib asyncio, no snakepit import), for tests.

It answers the handshake with ``"protocol": 2`` and ``max_concurrency`` from argv[1] (default
64), runs every request as its own task and answers in completion order. Commands: ``ping``,
``echo``, ``sleep`` (args.seconds; returns meta.deadline_ms too), ``stubborn`` (sleeps
args.seconds and ignores ``$cancel``), ``die`` (exit 3 at once). ``$cancel`` cancels a
``sleep`` task and answers ``cancelled`` once the task has ended.
"""

import asyncio
import json
import os
import struct
import sys

MAX = int(sys.argv[1]) if len(sys.argv) > 1 else 64
TASKS = {}


def send(message):
    body = json.dumps(message).encode()
    sys.stdout.buffer.write(struct.pack(">I", len(body)) + body)
    sys.stdout.buffer.flush()


async def handle(request):
    rid, command, args = request["id"], request["command"], request.get("args", {})
    try:
        if command == "ping":
            result = {
                "status": "ok",
                "protocol": 2,
                "max_concurrency": MAX,
                "capabilities": ["cancel", "deadline"],
                "pid": os.getpid(),
            }
        elif command == "sleep":
            await asyncio.sleep(args["seconds"])
            result = {
                "slept": args["seconds"],
                "deadline_ms": request.get("meta", {}).get("deadline_ms"),
            }
        elif command == "stubborn":
            await asyncio.shield(asyncio.sleep(args["seconds"]))
            result = {"slept": args["seconds"]}
        elif command == "die":
            os._exit(3)
        else:
            result = args
        send({"id": rid, "success": True, "result": result})
    except asyncio.CancelledError:
        if command == "stubborn":
            await asyncio.sleep(args["seconds"])
            send({"id": rid, "success": True, "result": {"slept": args["seconds"]}})
        else:
            send({"id": rid, "success": False, "error": "cancelled"})
    finally:
        TASKS.pop(rid, None)


async def main():
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        try:
            header = await reader.readexactly(4)
            body = await reader.readexactly(struct.unpack(">I", header)[0])
        except asyncio.IncompleteReadError:
            return
        request = json.loads(body)
        if request["command"] == "$cancel":
            task = TASKS.get(request["id"])
            if task is not None:
                task.cancel()
            continue
        TASKS[request["id"]] = asyncio.ensure_future(handle(request))


asyncio.run(main())
