#!/usr/bin/env -S ruby --disable-gems
# frozen_string_literal: true

# The bundled Ruby worker: the built-in commands of docs/PROTOCOL.md on the snakepit library.
#
# `ruby bridge.rb` honours the options on the line above, and --disable-gems cuts start-up from
# about 65 ms to about 15 ms; the bridge needs nothing outside the standard library.

require_relative "snakepit"
require "etc"
require "securerandom"

module SnakepitBridge
  # PROTOCOL.md, "Numbers": integers stay exact, divide is true division, an integral float is
  # sent as an integer (below 1e21, where JavaScript too stops writing integers out), and
  # Infinity and NaN are refused. Refusals are Snakepit::CommandError: answered, not logged.
  module Compute
    OPERATIONS = {
      "add" => ->(a, b) { a + b },
      "subtract" => ->(a, b) { a - b },
      "multiply" => ->(a, b) { a * b },
      "divide" => ->(a, b) { divide(a, b) }
    }.freeze
    INTEGER_FLOATS = (-1e21..1e21).freeze

    def self.call(args)
      operation = args["operation"]
      apply = OPERATIONS.fetch(operation) do
        raise Snakepit::CommandError,
              "unknown operation #{operation.inspect} (supported: #{OPERATIONS.keys.join(', ')})"
      end
      a = number(args, "a")
      b = number(args, "b")
      result = wire(apply.call(a, b))
      { "operation" => operation, "inputs" => { "a" => a, "b" => b }, "result" => result }
    end

    def self.divide(a, b)
      raise Snakepit::CommandError, "division by zero" if b.zero?
      # Exact for integers that divide evenly, however big; fdiv would round above 2**53.
      return a / b if a.is_a?(Integer) && b.is_a?(Integer) && (a % b).zero?

      a.fdiv(b)
    end

    def self.number(args, name)
      value = args[name]
      return value if value.is_a?(Integer) || value.is_a?(Float)

      raise Snakepit::CommandError, "'#{name}' must be a number, got #{value.inspect}"
    end

    def self.wire(result)
      return result if result.is_a?(Integer)
      raise Snakepit::CommandError, "result is not a finite number" unless result.finite?

      result == result.truncate && INTEGER_FLOATS.cover?(result) ? result.to_i : result
    end
  end

  # Per-session values kept in this worker's memory (store / retrieve / clear_session), safe
  # for the concurrent requests of protocol 2.
  class Sessions
    def initialize
      @values = {} # session_id => {key => value}; guarded by @lock
      @lock = Mutex.new
    end

    def store(args)
      session = session_id(args)
      key = key(args)
      @lock.synchronize { (@values[session] ||= {})[key] = args["value"] }
      { "stored" => true, "session_id" => session, "key" => key }
    end

    def retrieve(args)
      session = session_id(args)
      key = key(args)
      found, value = @lock.synchronize do
        values = @values.fetch(session, {})
        [values.key?(key), values[key]]
      end
      { "found" => found, "session_id" => session, "key" => key, "value" => value }
    end

    def clear(args)
      session = session_id(args)
      values = @lock.synchronize { @values.delete(session) }
      { "cleared" => !values.nil?, "session_id" => session, "keys" => values ? values.size : 0 }
    end

    private

    def session_id(args)
      session = args["session_id"]
      return session if session.is_a?(String) && !session.empty?

      raise Snakepit::CommandError, "session_id is required (use execute_in_session)"
    end

    def key(args)
      key = args["key"]
      return key if key.is_a?(String)

      raise Snakepit::CommandError, "'key' must be a string, got #{key.inspect}"
    end
  end

  # create_program / execute_program (PROTOCOL.md, "Programs"): deterministic, no model.
  module Programs
    NOT_CONFIG = ["signature", "program_id", "session_id"].freeze

    def self.create(args)
      signature = args["signature"]
      inputs, outputs = parse(signature)
      {
        "program_id" => args["program_id"] || "prog_#{SecureRandom.hex(8)}",
        "signature" => signature, "inputs" => inputs, "outputs" => outputs,
        "config" => args.reject { |name, _| NOT_CONFIG.include?(name) }
      }
    end

    def self.execute(args)
      program = args["program"]
      values = args["inputs"]
      unless program.is_a?(Hash)
        raise Snakepit::CommandError, "'program' must be an object with a signature"
      end
      raise Snakepit::CommandError, "'inputs' must be an object" unless values.is_a?(Hash)

      inputs, outputs = parse(program["signature"])
      missing = inputs.find { |name| !values.key?(name) }
      raise Snakepit::CommandError, "missing input '#{missing}'" if missing

      call = inputs.map { |name| "#{name}=#{render(values[name])}" }.join(", ")
      results = outputs.to_h { |out| [out, "#{out}(#{call})"] }
      { "program_id" => program["program_id"], "outputs" => results }
    end

    # "in1, in2 -> out1" as [["in1", "in2"], ["out1"]].
    def self.parse(signature)
      sides = signature.to_s.split("->", -1)
      names = sides.map { |side| side.split(",").map(&:strip).reject(&:empty?) }
      return names if names.size == 2 && names.none?(&:empty?)

      raise Snakepit::CommandError,
            "invalid signature #{signature.inspect} (expected 'in1, in2 -> out1, out2')"
    end

    def self.render(value)
      value.is_a?(String) ? value : JSON.generate(value)
    end
  end

  # The stream command (PROTOCOL.md, "The stream command"): items {"i" => 0} ... {"i" => count - 1}
  # through ctx.emit, for the conformance suite's streaming, backpressure and cancel cases.
  module StreamCommand
    MAX_COUNT = 1_000_000
    MAX_DELAY = 3600
    POLL_SECONDS = 0.01 # how often wait_for looks for its file

    def self.call(args, ctx)
      count, delay, fail_at, wait_for, progress = arguments(args) # all checked before item 0
      count.times do |i|
        sleep(delay) if delay.positive? # Kernel#sleep yields to $cancel's Thread#raise at once
        raise Snakepit::CommandError, "failed at item #{i}" if i == fail_at

        write_progress(progress, i + 1) if progress
        ctx.emit({ "i" => i })
        await(wait_for) if wait_for && i.zero?
      end
      args["final"]
    end

    def self.arguments(args)
      [count(args["count"]), delay(args.fetch("delay", 0)), fail_at(args["fail_at"]),
       path(args, "wait_for"), path(args, "progress")]
    end

    def self.count(count)
      return count if count.is_a?(Integer) && count.between?(0, MAX_COUNT)

      raise Snakepit::CommandError,
            "'count' must be an integer from 0 to #{MAX_COUNT}, got #{count.inspect}"
    end

    def self.delay(delay)
      return delay if (delay.is_a?(Integer) || delay.is_a?(Float)) && delay.between?(0, MAX_DELAY)

      raise Snakepit::CommandError,
            "'delay' must be a number from 0 to #{MAX_DELAY}, got #{delay.inspect}"
    end

    def self.fail_at(fail_at)
      return fail_at if fail_at.nil? || (fail_at.is_a?(Integer) && !fail_at.negative?)

      raise Snakepit::CommandError, "'fail_at' must be an integer >= 0, got #{fail_at.inspect}"
    end

    # The file path of `name`, or nil when it is not given.
    def self.path(args, name)
      path = args[name]
      return path if path.nil? || (path.is_a?(String) && !path.empty?)

      raise Snakepit::CommandError, "'#{name}' must be a file path, got #{path.inspect}"
    end

    # Writes `produced` to a file beside `path`, then renames it over `path`, so that a reader
    # never sees it half written. Masked: a $cancel must not leave the temporary file behind.
    def self.write_progress(path, produced)
      temporary = "#{path}.#{Process.pid}.#{Thread.current.object_id}.tmp"
      Thread.handle_interrupt(Snakepit::UNCANCELLABLE) do
        File.write(temporary, produced.to_s)
        File.rename(temporary, path)
      end
    end

    def self.await(path)
      sleep(POLL_SECONDS) until File.exist?(path)
    end
  end

  module_function

  def info(server)
    uname = Etc.uname.transform_values { |text| Snakepit.utf8(text) } # ASCII-8BIT: not binary
    {
      "runtime" => Snakepit::RUNTIME, "runtime_version" => RUBY_VERSION,
      "bridge_version" => Snakepit::VERSION, "platform" => uname[:sysname].downcase,
      "arch" => uname[:machine], "pid" => Process.pid, "worker_id" => server.worker_id,
      "uptime" => server.uptime, "requests_handled" => server.requests_handled,
      "memory" => { "rss_bytes" => rss_bytes }, "commands" => server.commands
    }
  end

  def rss_bytes
    File.foreach("/proc/self/status") do |line|
      return line.split[1].to_i * 1024 if line.start_with?("VmRSS:")
    end
    0
  rescue Errno::ENOENT # no /proc (macOS): ps reports kilobytes
    `ps -o rss= -p #{Process.pid}`.to_i * 1024
  end

  def sleep_for(args)
    seconds = args["seconds"]
    unless (seconds.is_a?(Integer) || seconds.is_a?(Float)) && seconds.between?(0, 3600)
      raise Snakepit::CommandError,
            "'seconds' must be a number from 0 to 3600, got #{seconds.inspect}"
    end

    sleep(seconds) # Kernel#sleep yields to $cancel's Thread#raise at once
    { "slept" => seconds }
  end

  # The call_host command (PROTOCOL.md, "The call_host command"): calls the host's callback
  # `name` with `args`, `times` times (one after another, or at once, each on its own thread,
  # with `parallel`), answering {"results" => [...]} in call order. A CallbackError fails the
  # command with "<code>: <message>".
  MAX_HOST_CALLS = 100_000

  def call_host(args, ctx)
    name = args["name"]
    call_args = args.fetch("args", {})
    times = args.fetch("times", 1)
    unless name.is_a?(String) && !name.empty?
      raise Snakepit::CommandError, "'name' must be a non-empty string"
    end
    raise Snakepit::CommandError, "'args' must be an object" unless call_args.is_a?(Hash)
    unless times.is_a?(Integer) && times.between?(1, MAX_HOST_CALLS)
      raise Snakepit::CommandError, "'times' must be an integer from 1 to #{MAX_HOST_CALLS}"
    end

    results =
      if args["parallel"] == true
        threads = Array.new(times) do
          Thread.new do
            Thread.current.report_on_exception = false # its error reaches #value below
            ctx.call(name, call_args)
          end
        end
        threads.map(&:value)
      else
        Array.new(times) { ctx.call(name, call_args) }
      end
    { "results" => results }
  rescue Snakepit::CallbackError => e
    raise Snakepit::CommandError, "#{e.code}: #{e.message}"
  end

  def process_data(args)
    data = args["data"]
    unless data.is_a?(String)
      raise Snakepit::CommandError, "'data' must be a string, got #{data.inspect}"
    end

    { "original" => data, "processed" => data.upcase, "length" => data.length }
  end

  def generate_report(args)
    title = args["title"]
    unless title.is_a?(String)
      raise Snakepit::CommandError, "'title' must be a string, got #{title.inspect}"
    end

    data = args["data"]
    {
      "title" => title, "data" => data,
      "generated_at" => Time.now.utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
      "summary" => { "items" => data.is_a?(Array) || data.is_a?(Hash) ? data.size : 0 }
    }
  end

  def register(server)
    sessions = Sessions.new
    server.command("echo") { |args| { "echoed" => args } } # binary values go back as binary
    server.command("call_host") { |args, ctx| call_host(args, ctx) }
    server.command("compute") { |args| Compute.call(args) }
    server.command("info") { info(server) }
    server.command("sleep") { |args| sleep_for(args) }
    server.command("stream", stream: true) { |args, ctx| StreamCommand.call(args, ctx) }
    server.command("store") { |args| sessions.store(args) }
    server.command("retrieve") { |args| sessions.retrieve(args) }
    server.command("clear_session") { |args| sessions.clear(args) }
    server.command("create_program") { |args| Programs.create(args) }
    server.command("execute_program") { |args| Programs.execute(args) }
    server.command("process_data") { |args| process_data(args) }
    server.command("generate_report") { |args| generate_report(args) }
  end
end

Snakepit.run { |server| SnakepitBridge.register(server) }
