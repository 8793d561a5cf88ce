// A custom Node worker written with the bridge library, for the parent-SIGKILL damage tests:
// `spin` is a CPU loop that never yields to the event loop (so it never sees stdin EOF), and
// `grandchild` starts a `sleep` that belongs to the worker's process group, `daemon` one in a
// session of its own (out of reach of anything that kills the worker's process group).
"use strict";
const { spawn } = require("child_process");
const { run } = require("snakepit");

run({
  echo: (args) => ({ echoed: args }),
  spin: () => {
    for (;;) {
      // burn CPU, never return
    }
  },
  grandchild: () => {
    const child = spawn("sleep", ["1000"], { stdio: "ignore" });
    return { pid: child.pid };
  },
  daemon: () => {
    const child = spawn("sleep", ["1000"], { stdio: "ignore", detached: true });
    child.unref();
    return { pid: child.pid };
  },
});
