// An I/O-bound worker for benchmarks/concurrency.py: `wait` awaits args.seconds.
const { run } = require("snakepit");

run({
  async wait(args) {
    await new Promise((resolve) => setTimeout(resolve, args.seconds * 1000));
    return { waited: args.seconds };
  },
});
