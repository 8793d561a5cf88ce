# frozen_string_literal: true

# A protocol-1 bridge in Ruby with its own commands (ping, count), written from
# docs/PROTOCOL.md with Ruby's standard library only and no snakepit code. The handshake answer
# has no `protocol` and no `capabilities` key (max_in_flight is ignored): the pool sends one
# request at a time, and this bridge handles each before it reads the next.
require "json"

MAX_FRAME = ENV["SNAKEPIT_MAX_FRAME_BYTES"].to_s.then { |v| v.empty? ? 64 * 1024 * 1024 : Integer(v) }
STARTED = Process.clock_gettime(Process::CLOCK_MONOTONIC)

# Stdout protection: private copies of the protocol's pipes, then fd 0 on /dev/null and fd 1 on
# stderr, so puts, system() and children cannot touch the protocol.
REQUESTS = $stdin.dup.binmode
RESPONSES = $stdout.dup.binmode
$stdin.reopen(File::NULL)
$stdout.reopen($stderr)
Signal.trap("TERM") { exit!(0) }

def fatal(why)
  warn "v1 count bridge: #{why}"
  exit!(3) # the stream cannot be trusted any more
end

# `n` bytes, or fewer only at the end of input.
def read_exactly(n)
  buffer = +""
  while buffer.bytesize < n
    chunk = REQUESTS.read(n - buffer.bytesize)
    break if chunk.nil? || chunk.empty?

    buffer << chunk
  end
  buffer
end

def write_frame(message)
  body = JSON.generate(message)
  if body.bytesize > MAX_FRAME
    error = "response of #{body.bytesize} bytes exceeds the frame limit of #{MAX_FRAME} bytes"
    body = JSON.generate({ "id" => message["id"], "success" => false, "error" => error })
  end
  RESPONSES.write([body.bytesize].pack("N"), body.b)
  RESPONSES.flush
end

class Refused < StandardError; end

$handled = 0

COMMANDS = {
  "ping" => lambda do |args|
    { "status" => "ok", "runtime" => "ruby",
      "worker_id" => args["worker_id"].is_a?(String) ? args["worker_id"] : ENV["SNAKEPIT_WORKER_ID"],
      "uptime" => Process.clock_gettime(Process::CLOCK_MONOTONIC) - STARTED,
      "requests_handled" => $handled, "pid" => Process.pid }
  end,
  "count" => lambda do |args|
    text = args["text"]
    raise Refused, "text is required (a string)" unless text.is_a?(String)

    { "words" => text.split.size, "chars" => text.length, "bytes" => text.bytesize }
  end,
}.freeze

def answer(request)
  id = request["id"]
  fatal("a request without an integer id") unless id.is_a?(Integer)
  command = request["command"]
  return if command == "$cancel" # no cancel capability: nothing else runs meanwhile

  $handled += 1
  handler = COMMANDS[command]
  unless handler
    supported = COMMANDS.keys.sort.join(", ")
    return write_frame({ "id" => id, "success" => false,
                         "error" => "unknown command '#{command}' (supported: #{supported})" })
  end
  args = request["args"].is_a?(Hash) ? request["args"] : {}
  begin
    write_frame({ "id" => id, "success" => true, "result" => handler.call(args) })
  rescue Refused => e
    write_frame({ "id" => id, "success" => false, "error" => "#{command}: #{e.message}" })
  end
end

loop do
  header = read_exactly(4)
  exit!(0) if header.empty? # end of input between frames: the pool is done with us
  fatal("input ended inside a frame header") if header.bytesize < 4
  length = header.unpack1("N")
  fatal("frame of #{length} bytes exceeds the limit of #{MAX_FRAME}") if length > MAX_FRAME
  body = read_exactly(length)
  fatal("input ended inside a frame") if body.bytesize < length
  text = body.force_encoding(Encoding::UTF_8)
  fatal("a frame that is not UTF-8") unless text.valid_encoding?
  request = begin
    JSON.parse(text)
  rescue JSON::ParserError => e
    fatal("undecodable frame: #{e.message}")
  end
  fatal("a frame that is not an object") unless request.is_a?(Hash)
  answer(request)
end
