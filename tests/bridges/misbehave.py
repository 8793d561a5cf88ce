"""A third-party-style bridge (no snakepit import) that misbehaves on request, for tests.

Modes come from argv[1]: ``normal``, ``exit_in_handshake``, ``never_ready``, ``huge_stderr``,
``bad_handshake``, ``crash_on_request`` (dies on every request after the handshake, like a bridge
calling a method its runtime lacks), ``mute_pings`` (never answers a health-check ping),
``fail_if_exists:PATH`` (exits during start-up while PATH exists). Commands: ``ping``, ``echo``, ``sleep`` (args.seconds), ``die`` (stderr line,
then exit args.code), ``junk`` (text on stdout), ``wrong_id``, ``oversized`` (a frame header
claiming 100 MiB), ``stderr_line`` (args.size bytes on one stderr line), ``deep_error`` / ``deep_no_id`` (an error
value or an id-less frame nested args.depth levels deep), ``flood`` (args.lines
stderr lines), ``fail`` (success false), ``hog`` (keeps args.mb MiB), ``grandchild`` (starts a
``sleep`` child that outlives nothing: returns its pid), ``spin`` (a CPU loop that never reads).
"""

import json
import os
import struct
import sys
import time

MODE = sys.argv[1] if len(sys.argv) > 1 else "normal"
stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
HOARD = []


def send(message):
    body = json.dumps(message).encode()
    stdout.write(struct.pack(">I", len(body)) + body)
    stdout.flush()


def send_raw(body):
    stdout.write(struct.pack(">I", len(body)) + body)
    stdout.flush()


def answer(request):
    command, args, rid = request["command"], request.get("args", {}), request["id"]
    if MODE == "crash_on_request" and command != "ping":
        sys.stderr.write("AttributeError: module 'os' has no attribute 'teleport'\n")
        sys.stderr.flush()
        sys.exit(1)
    if command == "ping":
        if MODE == "mute_pings" and not args.get("initialization"):
            return None
        if MODE == "bad_handshake":
            return {"id": rid, "success": True, "result": {"status": "starting"}}
        return {"id": rid, "success": True, "result": {"status": "ok", "pid": os.getpid()}}
    if command == "sleep":
        time.sleep(args.get("seconds", 60))
        return {"id": rid, "success": True, "result": {"slept": args.get("seconds")}}
    if command == "die":
        sys.stderr.write("fatal: the bridge is going down\n")
        sys.stderr.flush()
        os._exit(args.get("code", 3))
    if command == "junk":
        stdout.write(b"Loading model weights... done\n")
        stdout.flush()
        return None
    if command == "wrong_id":
        return {"id": rid + 1000, "success": True, "result": "stale"}
    if command == "oversized":
        stdout.write(struct.pack(">I", 100 * 1024 * 1024) + b"{")
        stdout.flush()
        return None
    if command == "stderr_line":
        sys.stderr.write("x" * args["size"] + "\n")
        sys.stderr.flush()
        return {"id": rid, "success": True, "result": {"written": args["size"]}}
    if command == "flood":
        for i in range(args["lines"]):
            sys.stderr.write(f"flood line {i}\n")
        sys.stderr.flush()
        return {"id": rid, "success": True, "result": {"lines": args["lines"]}}
    if command == "hog":
        HOARD.append(bytearray(args["mb"] * 1024 * 1024))
        return {"id": rid, "success": True, "result": {"held_mb": len(HOARD) * args["mb"]}}
    if command == "grandchild":
        import subprocess

        child = subprocess.Popen(["sleep", "1000"])
        return {"id": rid, "success": True, "result": {"pid": child.pid}}
    if command == "spin":
        while True:
            pass
    if command == "deep_error":
        depth = args["depth"]
        send_raw(b'{"id":%d,"success":false,"error":%s1%s}' % (rid, b"[" * depth, b"]" * depth))
        return None
    if command == "deep_no_id":
        depth = args["depth"]
        send_raw(b'{"success":true,"result":%s1%s}' % (b"[" * depth, b"]" * depth))
        return None
    if command == "fail":
        return {"id": rid, "success": False, "error": "this command always fails"}
    return {"id": rid, "success": True, "result": args}


def main():
    if MODE.startswith("fail_if_exists:") and os.path.exists(MODE.split(":", 1)[1]):
        sys.stderr.write("cannot start: the flag file exists\n")
        sys.exit(6)
    if MODE == "exit_in_handshake":
        sys.stderr.write("ImportError: no module named 'torch'\n")
        sys.exit(4)
    if MODE == "huge_stderr":
        sys.stderr.write("y" * (1024 * 1024) + "\n")
        sys.stderr.flush()
    while True:
        header = stdin.read(4)
        if len(header) < 4:
            return
        request = json.loads(stdin.read(struct.unpack(">I", header)[0]))
        if MODE == "never_ready" and request["command"] == "ping":
            continue
        response = answer(request)
        if response is not None:
            send(response)


main()
