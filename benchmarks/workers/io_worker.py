"""An I/O-bound worker for benchmarks/concurrency.py: ``wait`` awaits args.seconds."""

import asyncio

from snakepit_python import command, run


@command
async def wait(args, ctx):
    await asyncio.sleep(args["seconds"])
    return {"waited": args["seconds"]}


run()
