"""A worker written with the Python bridge library, for the protocol-2 concurrency tests.

``wait`` is async, ``nap`` sync (both sleep); ``linger`` is async and takes ``cleanup`` seconds
to unwind after a cancel; ``stubborn`` swallows the cancel and returns; ``deadline`` returns
``ctx.deadline``; ``wrapped`` is a sync function returning a coroutine; ``boom`` fails.
"""

import asyncio
import time

from snakepit_python import command, run


@command
async def wait(args):
    await asyncio.sleep(args["seconds"])
    return {"waited": args["seconds"]}


@command
def nap(args):
    time.sleep(args["seconds"])
    return {"napped": args["seconds"]}


@command
async def linger(args):
    try:
        await asyncio.sleep(args["seconds"])
    except asyncio.CancelledError:
        await asyncio.sleep(args["cleanup"])
        raise
    return "finished"


@command
async def stubborn(args):
    try:
        await asyncio.sleep(args["seconds"])
    except asyncio.CancelledError:
        return "ignored the cancel"
    return "finished"


@command
def deadline(args, ctx):
    return {"deadline": ctx.deadline, "deadline_ms": ctx.deadline_ms}


async def _later(value):
    await asyncio.sleep(value)
    return "awaited"


@command
def wrapped(args):
    return _later(args["seconds"])


@command
def boom(args):
    raise RuntimeError("it broke")


if __name__ == "__main__":
    run()
