"""A custom Python worker written with the bridge library, for the damage tests.

``spin`` is a CPU loop that never returns; ``grandchild`` starts a ``sleep`` in the worker's
process group; ``daemon`` starts a ``sleep`` in a session of its own, as a daemonizing library
would, out of reach of anything that kills the worker's process group.
"""

import subprocess

from snakepit_python import command, run


@command
def echo(args):
    return {"echoed": args}


@command
def spin(args):
    while True:
        pass


@command
def grandchild(args):
    child = subprocess.Popen(["sleep", "1000"], stdin=subprocess.DEVNULL)
    return {"pid": child.pid}


@command
def daemon(args):
    child = subprocess.Popen(["sleep", "1000"], stdin=subprocess.DEVNULL, start_new_session=True)
    return {"pid": child.pid}


if __name__ == "__main__":
    run()
