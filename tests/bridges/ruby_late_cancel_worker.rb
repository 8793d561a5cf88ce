# frozen_string_literal: true

# A worker on the Ruby bridge library with the late-cancel window held open, for
# tests/test_ruby_cancel_race.py. Under protocol 2 a $cancel that lands after a handler returned
# but before its pool thread ended the request's turn leaves a Cancelled queued (masked) in that
# thread, which the library must discard before the thread runs its next request. Under MRI's
# GVL the reader thread gets into that window only when a preemption falls exactly there; here
# every pool thread sleeps a little in it, so a $cancel timed around a handler's end lands in it
# often. `late_cancels` says how often that happened.
require "snakepit"

unless Snakepit::Pool.private_method_defined?(:finish)
  abort("ruby_late_cancel_worker: Snakepit::Pool#finish is gone; update this test worker")
end

LATE_CANCELS = Thread::Queue.new

Snakepit::Pool.prepend(
  Module.new do
    private

    def finish(job)
      stopped = !$!.nil? # a Cancelled delivered in time is unwinding the handler now
      sleep(0.002) # the handler returned; a $cancel landing now can no longer stop it
      raised = super
      LATE_CANCELS << job.id if raised && !stopped
      raised
    end
  end
)

Snakepit.run do |s|
  s.command("echo") { |args| { "echoed" => args } }
  s.command("compute") do |args|
    a, b = args.values_at("a", "b")
    result = args["operation"] == "multiply" ? a * b : a + b
    { "operation" => args["operation"], "inputs" => { "a" => a, "b" => b }, "result" => result }
  end
  s.command("sleep") do |args|
    sleep(args["seconds"])
    { "slept" => args["seconds"] }
  end
  s.command("late_cancels") { LATE_CANCELS.size }
end
