# An I/O-bound worker for benchmarks/concurrency.py: `wait` sleeps args.seconds on its thread.
require "snakepit"

Snakepit.run({ "wait" => ->(args) { sleep(args["seconds"]); { "waited" => args["seconds"] } } })
