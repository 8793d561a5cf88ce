# frozen_string_literal: true

# A custom Ruby worker written with the bridge library, for the parent-SIGKILL damage tests:
# `spin` is a CPU loop that never returns, `grandchild` starts a `sleep` that belongs to the
# worker's process group, and `daemon` one in a process group of its own.
require "snakepit"

Snakepit.run do |s|
  s.command("echo") { |args| { "echoed" => args } }
  s.command("spin") do |_args|
    x = 0
    loop { x += 1 }
  end
  s.command("grandchild") do |_args|
    pid = Process.spawn("sleep", "1000", in: File::NULL, out: File::NULL)
    Process.detach(pid)
    { "pid" => pid }
  end
  s.command("daemon") do |_args|
    pid = Process.spawn("sleep", "1000", in: File::NULL, out: File::NULL, pgroup: true)
    Process.detach(pid)
    { "pid" => pid }
  end
end
