// A custom Node worker written with the bridge library, for tests/test_bridge_node_concurrency.py:
// handlers that wait, honour or ignore their AbortSignal, report ctx.deadline and fail.
"use strict";
const { run, CommandError } = require("snakepit");

let started = 0;

run({
  // Resolves after `ms` whatever happens; reports whether its signal was aborted meanwhile.
  ignore: (args, ctx) =>
    new Promise((resolve) => {
      const signal = ctx.signal;
      setTimeout(() => resolve({ done: args.ms, aborted: signal.aborted }), args.ms);
    }),
  // Resolves after `ms` unless aborted; then it takes `unwind_ms` more to give up (cleaning up,
  // say), and rejects with the signal's reason.
  obey: (args, ctx) =>
    new Promise((resolve, reject) => {
      const timer = setTimeout(() => resolve({ done: args.ms }), args.ms);
      ctx.signal.addEventListener(
        "abort",
        () => {
          clearTimeout(timer);
          setTimeout(() => reject(ctx.signal.reason), args.unwind_ms || 0);
        },
        { once: true },
      );
    }),
  // Counts the handlers that ever started (a cancelled request that waited never starts).
  started: () => started,
  count: async (args) => {
    started += 1;
    await new Promise((resolve) => setTimeout(resolve, args.ms));
    return { counted: args.ms };
  },
  deadline: (args, ctx) => ({ deadline: ctx.deadline, deadlineMs: ctx.deadlineMs }),
  boom: () => {
    throw new Error("kaput");
  },
  reject_later: async () => {
    await new Promise((resolve) => setTimeout(resolve, 10));
    throw new RangeError("out of range");
  },
  refuse: () => {
    throw new CommandError("not today");
  },
});
