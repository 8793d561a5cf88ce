# frozen_string_literal: true

# snakepit's Ruby bridge library: an author writes handlers, this speaks the wire protocol of
# docs/PROTOCOL.md (frames, the ping handshake, protocol 2's concurrent requests, $cancel,
# deadlines, streams, binary values, callbacks into the host, error mapping, stdout protection).
#
#   require "snakepit"
#   Snakepit.run({ "shout" => ->(args, ctx) { { "text" => args["text"].upcase } } })
#
#   Snakepit.run do |s|
#     s.command("shout") { |args, ctx| { "text" => args["text"].upcase } }
#   end
#
# A handler that raises Snakepit::CommandError fails its request quietly; any other exception
# also logs its backtrace to stderr. When the pool asks for protocol 2 (a handshake with
# max_in_flight N > 1), handlers run concurrently, each request on a thread of a pool of up to
# min(N, 64): state they share needs a Mutex. ctx.deadline is the seconds left, or nil.
#
# A handler streams by calling ctx.emit(item) (from its own thread), once per item; the block's
# value, unless nil, is the last item. Asked for a stream, emit sends each item at once and does
# not return while the pool's window is full; called by a plain request, the handler answers the
# list of its items. A handler that may emit nothing registers with `stream: true`, so that it is
# still a stream (of no items, not of its value) and answers [] to a plain request:
#
#   s.command("numbers", stream: true) { |args, ctx| args["n"].times { |i| ctx.emit(i) } }
#
# Binary values (protocol 2): a handler gets a binary (ASCII-8BIT) String for each binary value of
# its request, and any ASCII-8BIT String in its result or items goes out as binary, without
# base64; every other String is text. Mind the few standard methods that give ASCII-8BIT text
# (IO#read(n), Array#pack, String.new, Etc.uname): `.encode(Encoding::UTF_8)` what is text.
# The lane a value travels never changes its type: a binary value is an ASCII-8BIT String
# whether it came inline or in a shared-memory segment (read into the String with one copy:
# Ruby's standard library has no mmap), and a text attachment is a UTF-8 String like any other
# text. Going out, a UTF-8 String of at least SNAKEPIT_TEXT_THRESHOLD bytes (when the pool set
# it) travels as a text attachment, and a value of at least SNAKEPIT_SHM_THRESHOLD bytes through
# a segment in SNAKEPIT_SHM_DIR (when the pool offered shared memory; inline if the segment
# cannot be written, a full /dev/shm); the handler does nothing for either. A result over
# SNAKEPIT_MAX_PAYLOAD_BYTES (1 GiB by default) is answered with success: false.
#
# Callbacks (protocol 2): ctx.call(name, args) calls a function the host registered
# (pool.register_callback) and blocks the handler's thread until the pool answers; it gives the
# result (binary values as ASCII-8BIT Strings) or raises Snakepit::CallbackError, whose #code is
# the answer's code ("callback_failed", "unknown_callback", "invalid_arguments", "timeout", ...)
# and #message its error. Several threads of one handler may call at once, and so may
# concurrent handlers. A $cancel stops a handler as always, by raising Snakepit::Cancelled into
# its thread, also while it waits in ctx.call; the request's calls still waiting on other
# threads (and in a handler that masked Cancelled) fail with CallbackError code "cancelled",
# and so does, at once, any call made after the cancel (in an ensure block). Calls still waiting
# when the request ends or the input ends fail the same way. At protocol 1 ctx.call raises
# CallbackError code "unsupported".
#
#   s.command("greet") do |args, ctx|
#     user = ctx.call("lookup", { "key" => args["key"] })
#     { "text" => "Hello, #{user['name']}" }
#   rescue Snakepit::CallbackError => e
#     raise Snakepit::CommandError, "no user (#{e.code})"
#   end
#
# Only Ruby's standard library is used, so a worker may start with `ruby --disable-gems`.

require "json"
require "io/wait"

module Snakepit
  VERSION = "0.2.0"
  RUNTIME = "ruby"
  # The capabilities a protocol-1 handshake answers, and a protocol-2 one (with the protocol and
  # how many requests this bridge takes at once).
  CAPABILITIES = ["cancel"].freeze
  PROTOCOL = 2
  PROTOCOL_CAPABILITIES = ["cancel", "deadline", "stream", "binary", "text", "callbacks"].freeze
  # The protocol-2 capabilities of a worker the pool offered shared memory (SNAKEPIT_SHM_DIR).
  SHM_CAPABILITIES = [*PROTOCOL_CAPABILITIES, "shm"].freeze
  MAX_CONCURRENCY = 4096
  # Threads that run handlers at most, under protocol 2; more requests wait in arrival order.
  MAX_THREADS = 64
  CANCEL = "$cancel"
  CREDIT = "$credit"
  CALLBACK = "$callback" # the pool's answer to a callback call (Context#call)
  BINARY = "$binary" # the envelope key that says where a binary frame's values go
  DEFAULT_MAX_FRAME_BYTES = 64 * 1024 * 1024
  DEFAULT_MAX_PAYLOAD_BYTES = 1024 * 1024 * 1024
  # A text threshold no String reaches (a Fixnum, so that the walk's comparison stays cheap):
  # without SNAKEPIT_TEXT_THRESHOLD no String goes out as a text attachment.
  NO_TEXT = 1 << 61
  # Python's json gives up near 1000 levels; JSON's default of 100 would refuse real data.
  MAX_NESTING = 1000
  LIBRARY_FILE = __FILE__

  # Raised into a handler's thread to stop it on $cancel. An Exception rather than a
  # StandardError so that a handler's own `rescue => e` does not swallow it.
  class Cancelled < Exception; end
  CANCELLABLE = { Cancelled => :immediate }.freeze
  UNCANCELLABLE = { Cancelled => :never }.freeze

  # An expected failure: a handler raises it to answer `"<command>: <message>"` without the
  # backtrace that any other exception logs to stderr.
  class CommandError < StandardError; end

  # A callback call (Context#call) that failed: `code` says why (PROTOCOL.md, "Callbacks"), as the
  # pool answered it ("callback_failed", "unknown_callback", "invalid_arguments", "timeout", ...)
  # or as the bridge decided without asking: "cancelled" (the request was cancelled or has
  # ended, or the input ended) and "unsupported" (the pool did not ask for protocol 2). A
  # StandardError, so that a handler may rescue it and carry on.
  class CallbackError < StandardError
    attr_reader :code

    def initialize(message = "callback failed", code: "callback_failed")
      super(message)
      @code = code
    end
  end

  # A mistake in the worker script's set-up (a command registered twice or named "$...", an
  # invalid SNAKEPIT_MAX_FRAME_BYTES): Snakepit.run logs it and exits with status 2.
  class SetupError < ArgumentError; end

  # The input can no longer be trusted: the worker logs why and exits with status 3.
  class ProtocolError < StandardError; end

  # A response that cannot be sent as a frame; it is answered with success: false instead.
  class EncodeError < StandardError; end

  # What a handler knows about its request besides the args (from the request's `meta`).
  # `deadline` is the seconds left of the request's time budget (`meta.deadline_ms`, counted from
  # when the bridge read the request, on a monotonic clock; negative once past), nil without one.
  # `emit` sends one item of a stream (see Stream), or collects it when no stream was asked for.
  # `call` calls a callback of the host and waits for its answer (see Calls).
  Context = Struct.new(:request_id, :worker_id, :traceparent, :tracestate, :deadline_ms) do
    # `emitter`: the request's Stream or Collector; without one, the first emit makes a Collector.
    # `calls`: the worker's Calls under protocol 2 (nil before, and at protocol 1).
    def initialize(request_id, worker_id, traceparent, tracestate, deadline_ms, received = nil,
                   emitter = nil, calls = nil)
      super(request_id, worker_id, traceparent, tracestate, deadline_ms)
      @received = received || Snakepit.monotonic
      @emitter = emitter
      @calls = calls
      @calls_closed = nil
      @called = false
    end

    # The library's, for Calls: why this request's callback calls fail at once (it was
    # cancelled, or has ended), nil while they may be made; and whether it ever made one.
    attr_accessor :calls_closed, :called

    def deadline
      budget = deadline_ms
      return nil unless budget.is_a?(Numeric)

      @received + (budget / 1000.0) - Snakepit.monotonic
    end

    def emit(item)
      (@emitter ||= Collector.new).emit(item)
      nil
    end

    # Calls the host's callback `name` (a String or Symbol) with `args` (a Hash; ASCII-8BIT
    # Strings in it go as binary values) and blocks this thread until the pool answers: gives
    # the callback's result (binary values as ASCII-8BIT Strings), or raises CallbackError with
    # the answer's code and message. May be called from any thread of the handler, several at
    # once. A $cancel of the request interrupts the handler's own thread with Cancelled, as
    # everywhere else in a handler, and fails every call of the request still waiting (on any
    # thread) with CallbackError code "cancelled"; so does a call made after that.
    def call(name, args = {})
      return @calls.call(self, name, args) if @calls

      raise CallbackError.new("callback '#{name}': callbacks need protocol 2 (the pool did not " \
                              "ask for it in the handshake)", code: "unsupported")
    end

    # The library's: the request's result, given what the handler returned.
    def conclude(value)
      @emitter ? @emitter.conclude(value) : value
    end

    # The library's: the request has ended; its calls still waiting fail, later ones at once.
    # Without the lock of Calls for a request that never called (most): Calls#register sets
    # `called` before it reads `calls_closed`, this sets `calls_closed` before it reads `called`,
    # so a call that one thread of the handler registers as the request ends is seen by one side.
    def finish_calls
      return unless @calls

      @calls_closed ||= Calls::ENDED
      @calls.finish(self) if @called
    end
  end

  # Handler exceptions that become `success: false`; SystemExit and signals still end the worker.
  HANDLER_ERRORS = [StandardError, ScriptError, SystemStackError].freeze

  # Serves `handlers` ({name => callable}) and those the block registers; never returns.
  def self.run(handlers = {}, &setup)
    limits = { max_frame_bytes: max_frame_bytes, max_payload_bytes: max_payload_bytes,
               text_threshold: text_threshold, shm: SharedMemory.from_env }
    unless handlers.respond_to?(:each_pair)
      raise SetupError, "Snakepit.run takes a Hash of handlers, got #{handlers.inspect}"
    end

    server = Server.new
    channel = Channel.take_over_stdio(**limits) # before the block runs, so that its output is safe
    handlers.each_pair { |name, handler| server.command(name, handler) }
    setup&.call(server)
    server.serve(channel)
  rescue SetupError => e
    log(e.message)
    exit(2)
  end

  def self.max_frame_bytes
    env_integer("SNAKEPIT_MAX_FRAME_BYTES", 1) || DEFAULT_MAX_FRAME_BYTES
  end

  def self.max_payload_bytes
    env_integer("SNAKEPIT_MAX_PAYLOAD_BYTES", 1) || DEFAULT_MAX_PAYLOAD_BYTES
  end

  # The length in bytes from which a String goes out as a text attachment; NO_TEXT without
  # SNAKEPIT_TEXT_THRESHOLD.
  def self.text_threshold
    [env_integer("SNAKEPIT_TEXT_THRESHOLD", 0) || NO_TEXT, NO_TEXT].min
  end

  # The integer in the environment variable `name` (at least `minimum`), nil if it is unset or
  # empty; anything else is a SetupError.
  def self.env_integer(name, minimum)
    value = ENV.fetch(name, "")
    return nil if value.empty?

    number = value.match?(/\A[0-9]+\z/) ? value.to_i : -1
    return number if number >= minimum

    kind = minimum.positive? ? "a positive integer" : "an integer >= 0"
    raise SetupError, "#{name} must be #{kind}, got #{value.inspect}"
  end

  # `text` as valid UTF-8, so that an error message can always be sent as JSON.
  def self.utf8(text)
    text = text.to_s
    return text.scrub if text.encoding == Encoding::UTF_8

    text.encode(Encoding::UTF_8, invalid: :replace, undef: :replace)
  end

  def self.log(message)
    warn("snakepit-ruby: #{message}")
  end

  # An unexpected exception of a handler, with its backtrace down to where the library called
  # the handler (all of it if it was raised inside the library).
  def self.log_failure(command, error)
    trace = error.backtrace || []
    own = trace.take_while { |line| !line.start_with?(LIBRARY_FILE) }
    first, *rest = own.empty? ? trace : own
    lines = ["#{first}#{': ' if first}#{error.message} (#{error.class})"]
    rest.each { |line| lines << "\tfrom #{line}" }
    log("command '#{command}' failed: #{utf8(lines.join("\n"))}")
  end

  def self.monotonic
    Process.clock_gettime(Process::CLOCK_MONOTONIC)
  end

  # Discards the Cancelled of a $cancel that landed after the current thread's handler returned
  # (it stays queued, masked); left alone it would stop the next request's handler. Unmasking
  # Cancelled around an empty block delivers one queued Cancelled at the block's return (a
  # check point), so this loop drains them all; with none queued it does nothing.
  # Not `Thread.pending_interrupt?(Cancelled)`: on Ruby 3.1 that call segfaults whenever an
  # interrupt is queued (it treats the queued exception as a class; Ruby bug #19110).
  def self.discard_late_cancels
    loop do
      Thread.handle_interrupt(CANCELLABLE) {}
      return
    rescue Cancelled
      next # the handler finished first; its result stands
    end
  end

  # `value` with nil in the place of each binary value (ASCII-8BIT String) in it, and of each
  # String of at least `text` bytes that can go out as a text attachment (Snakepit.text?); they
  # go to `found` as [path, string, text], `path` from the envelope's root (`path` is where
  # `value` is), `text` whether it is a text attachment. Only the Hashes and Arrays on the way
  # to such a value are copied: the handler's own objects are left as they were. Deeper than the
  # JSON generator goes (a cycle) is an EncodeError, as the generator would raise.
  #
  # Every result and item of a protocol-2 worker passes through here, so it is written for
  # speed: loops rather than blocks (a block called from C, as by each_pair, also costs machine
  # stack at every level, and a thread has too little for MAX_NESTING levels), the type tests
  # inline and ordered by how common they are, a number costing two tests, a short String three.
  def self.detach(value, path, found, text = NO_TEXT)
    if value.is_a?(String)
      if value.encoding == Encoding::BINARY
        found << [path.dup, value, false]
      elsif value.bytesize >= text && text?(value)
        found << [path.dup, value, true]
      else
        return value
      end
      return nil
    end
    return detach_hash(value, path, found, 2, text) if value.is_a?(Hash) # the envelope is depth 1
    return detach_array(value, path, found, 2, text) if value.is_a?(Array)

    value
  end

  def self.detach_hash(hash, path, found, depth, text)
    too_deep(depth) if depth > MAX_NESTING
    copy = nil
    keys = hash.keys
    index = 0
    count = keys.size
    while index < count
      key = keys[index]
      index += 1
      item = hash[key]
      if item.is_a?(String)
        if item.encoding == Encoding::BINARY
          found << [[*path, json_key(key)], item, false]
        elsif item.bytesize >= text && text?(item)
          found << [[*path, json_key(key)], item, true]
        else
          next
        end
        detached = nil
      elsif item.is_a?(Numeric) then next
      elsif item.is_a?(Hash) || item.is_a?(Array)
        path << json_key(key)
        detached = detach_container(item, path, found, depth + 1, text)
        path.pop
        next if detached.equal?(item)
      else next
      end
      (copy ||= hash.dup)[key] = detached
    end
    copy || hash
  end

  def self.detach_array(array, path, found, depth, text)
    too_deep(depth) if depth > MAX_NESTING
    copy = nil
    index = -1
    last = array.size - 1
    while index < last
      index += 1
      item = array[index]
      if item.is_a?(String)
        if item.encoding == Encoding::BINARY
          found << [[*path, index], item, false]
        elsif item.bytesize >= text && text?(item)
          found << [[*path, index], item, true]
        else
          next
        end
        detached = nil
      elsif item.is_a?(Numeric) then next
      elsif item.is_a?(Hash) || item.is_a?(Array)
        path << index
        detached = detach_container(item, path, found, depth + 1, text)
        path.pop
        next if detached.equal?(item)
      else next
      end
      (copy ||= array.dup)[index] = detached
    end
    copy || array
  end

  def self.detach_container(container, path, found, depth, text)
    return detach_hash(container, path, found, depth, text) if container.is_a?(Hash)

    detach_array(container, path, found, depth, text)
  end

  # Whether the String `string` (not ASCII-8BIT) can go out as a text attachment: its bytes are
  # valid UTF-8 in a UTF-8 (or US-ASCII) String. Any other String stays in the JSON, which
  # transcodes it, or refuses it as it always did (invalid UTF-8).
  def self.text?(string)
    encoding = string.encoding
    (encoding == Encoding::UTF_8 || encoding == Encoding::US_ASCII) && string.valid_encoding?
  end

  # A Hash key as JSON writes it: a String as it is, anything else as its to_s.
  def self.json_key(key)
    key.is_a?(String) ? key : key.to_s
  end

  def self.too_deep(depth)
    raise EncodeError, "result cannot be encoded as JSON (nesting of #{depth} is too deep)"
  end

  # The items a $credit frame grants (an integer >= 1), or nil, logged, for anything else.
  def self.credit_items(frame)
    args = frame["args"]
    items = args["items"] if args.is_a?(Hash)
    return items if items.is_a?(Integer) && items.positive?

    log("ignoring $credit for request #{frame['id']}: args.items must be an integer >= 1, " \
        "got #{items.inspect}")
    nil
  end

  # Frames over the protocol's private descriptors (PROTOCOL.md, "Frames"), and binary frames
  # ("Binary values"): a body of 0x00, the envelope's length J (4 bytes), J bytes of JSON with
  # nil in the place of each binary value and a "$binary" list of {path, size}, then the values'
  # bytes back to back.
  class Channel
    HEADER_BYTES = 4
    PARSE_OPTIONS = { max_nesting: MAX_NESTING }.freeze
    GENERATOR = :snakepit_json_generator
    BINARY_MARK = 0 # the first byte of a binary frame's body (no JSON text starts with it)
    BINARY_PREFIX = 5 # the mark and the envelope's length
    BINARY_HEADER = "NCN" # the frame's length, the mark, the envelope's length

    # Whether answers carry ASCII-8BIT Strings as binary values (set by the handshake once it
    # declared the capability; before, and at protocol 1, they are JSON text as always).
    attr_writer :binary

    # Moves the protocol off fd 0 and fd 1: `puts`, `system("echo")` and a child reading stdin
    # then reach stderr and /dev/null, never the frames. Ruby's dup is close-on-exec, so child
    # processes do not inherit the private descriptors either.
    def self.take_over_stdio(max_frame_bytes:, **limits)
      input = STDIN.dup
      output = STDOUT.dup
      STDIN.reopen(File::NULL)
      STDOUT.reopen(STDERR)
      STDOUT.sync = true # the pool logs worker output line by line; do not hold it back
      new(input, output, max_frame_bytes, **limits)
    end

    # `max_payload_bytes` bounds a response's envelope and values together, `text_threshold` is
    # the length in bytes from which a String goes out as a text attachment, `shm` the pool's
    # SharedMemory (nil when it offered none).
    def initialize(input, output, max_frame_bytes, max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
                   text_threshold: NO_TEXT, shm: nil)
      @input = input.binmode
      @output = output.binmode
      @output.sync = true
      @max = max_frame_bytes
      @max_payload = max_payload_bytes
      @text = text_threshold
      @shm = shm
      @binary = false
      @writing = Mutex.new
    end

    # Whether the pool offered shared memory, so that the handshake declares `shm`.
    def shm?
      !@shm.nil?
    end

    # The next frame as a Hash, or nil at the end of input.
    def read
      header = @input.read(HEADER_BYTES)
      return nil if header.nil?
      raise ProtocolError, "input ended inside a frame header" if header.bytesize < HEADER_BYTES

      length = header.unpack1("N")
      if length > @max
        raise ProtocolError, "frame of #{length} bytes exceeds the limit of #{@max} bytes " \
                             "(SNAKEPIT_MAX_FRAME_BYTES)"
      end
      decode(read_body(length))
    end

    # Whether input is waiting (in Ruby's buffer or the pipe), so that #read starts at once;
    # with a `timeout`, waits for it that long at most.
    def readable?(timeout = 0)
      !@input.wait_readable(timeout).nil?
    end

    # `message` as one frame (header and body in one string, so it goes out in one write).
    # `value_key` names the key whose value may hold binary values ("result", "item"): once
    # binary is on, any ASCII-8BIT String in it (and any String long enough to be a text
    # attachment) makes the frame a binary frame, its values written to shared-memory segments
    # from the threshold on. Such a message is bounded by the payload limit too. Safe to call
    # from several threads at once.
    def encode(message, value_key = nil)
      if @binary && value_key
        found = []
        value = message[value_key]
        detached = Snakepit.detach(value, [value_key], found, @text)
        unless found.empty?
          message = message.merge(value_key => detached) # the caller's message stays as it was
          return encode_binary(message, found)
        end
      end
      body = generate(message)
      size = body.bytesize
      payload_limit(size) if value_key && size > @max_payload
      limit(size)
      [size, body].pack("Na*")
    end

    # One request at a time the main thread writes answers and items, and the handler's threads
    # their callback calls: IO#write of a sync IO holds no lock, so a frame could be cut into
    # by another thread's where the pipe takes it in parts.
    def write(frame)
      @writing.synchronize { @output.write(frame) }
    end

    # Several frames with one write (Ruby's IO#write with several strings is one writev).
    def write_all(frames)
      @output.write(*frames)
    end

    private

    def limit(size)
      raise EncodeError, "response of #{size} bytes exceeds the frame limit #{@max}" if size > @max
    end

    def payload_limit(size)
      raise EncodeError, "response of #{size} bytes exceeds the payload limit of " \
                         "#{@max_payload} bytes"
    end

    # A binary frame of `message` (nil in the place of each value) and `found`, its values as
    # [[path, string, text], ...]: those of at least the shared-memory threshold written to
    # segments (inline when that fails), the others built into one buffer, each value's bytes
    # copied once. A frame that is not sent (over a limit, a result the generator refuses)
    # deletes the segments it made.
    def encode_binary(message, found)
      total = 0 # the bytes of all values, inline and shared
      entries = found.map do |path, bytes, text|
        total += bytes.bytesize
        entry = { "path" => path, "size" => bytes.bytesize }
        entry["text"] = true if text
        entry
      end
      message[BINARY] = entries
      # Values over the limit by themselves: refused before any segment is written (the size
      # said is that of the frame with every value inline).
      payload_limit(generate(message).bytesize + total) if total > @max_payload
      if @shm
        segments = [] # the segments written for this frame, to delete unless it is sent
        share(found, entries, segments)
      end
      head = generate(message).force_encoding(Encoding::BINARY) # a new String: ours to relabel
      payload_limit(head.bytesize + total) if head.bytesize + total > @max_payload
      inline = found.each_index.reject { |index| entries[index].key?("shm") }
      size = inline.sum(BINARY_PREFIX + head.bytesize) { |index| found[index][1].bytesize }
      limit(size)
      frame = String.new(capacity: HEADER_BYTES + size, encoding: Encoding::BINARY)
      frame << [size, BINARY_MARK, head.bytesize].pack(BINARY_HEADER) << head
      inline.each do |index|
        _, bytes, text = found[index]
        frame << (text ? bytes.b : bytes) # .b shares the bytes: UTF-8 text, relabelled
      end
      segments = nil # the frame names them: from now on they are the pool's
      frame
    ensure
      @shm.delete(segments) if segments
    end

    # Writes each value of at least the threshold to a new segment and names it in its entry,
    # and in `names`.
    def share(found, entries, names)
      found.each_with_index do |(_, bytes), index|
        next unless @shm.takes?(bytes.bytesize)

        name = @shm.write(bytes)
        next unless name # could not write it: inline

        names << name
        entries[index]["shm"] = name
      end
    end

    # One generator per thread for every response: configuring a new one costs a third of a
    # ping, and one generator must not serve two threads at once.
    def generate(message)
      (Thread.current[GENERATOR] ||= JSON::State.new(max_nesting: MAX_NESTING)).generate(message)
    rescue StandardError => e # JSON's errors, and whatever a result's #to_json or #to_s raises
      Thread.current[GENERATOR] = nil # a failed generate leaves the generator's depth raised
      # JSON's messages start with a source line number ("1003: NaN not allowed"): noise here.
      raise EncodeError, "result cannot be encoded as JSON (#{e.message.sub(/\A\d+: /, '')})"
    end

    def read_body(length)
      body = @input.read(length)
      if body.nil? || body.bytesize < length
        raise ProtocolError, "input ended inside a frame (#{body.to_s.bytesize} of #{length} bytes)"
      end

      body
    end

    def decode(body)
      return decode_binary(body) if body.getbyte(0) == BINARY_MARK

      parse(body, "frame")
    end

    def parse(text, what)
      # JSON.parse accepts invalid UTF-8 inside strings; the protocol does not.
      text.force_encoding(Encoding::UTF_8)
      raise ProtocolError, "#{what} is not valid UTF-8" unless text.valid_encoding?

      frame = JSON.parse(text, PARSE_OPTIONS)
      raise ProtocolError, "#{what} is not a JSON object: #{text[0, 80]}" unless frame.is_a?(Hash)

      frame
    rescue JSON::ParserError => e
      raise ProtocolError, "#{what} is not valid JSON (#{e.message[0, 200]})"
    end

    # The message of a binary frame's `body` (an ASCII-8BIT String), each binary value in its
    # place as an ASCII-8BIT String (a slice of the body: the last one shares its bytes).
    # Anything that does not add up is a ProtocolError.
    def decode_binary(body)
      size = body.bytesize
      raise ProtocolError, "binary frame is shorter than its header" if size < BINARY_PREFIX

      offset = BINARY_PREFIX + body.unpack1("N", offset: 1)
      if offset > size
        raise ProtocolError, "binary frame's envelope of #{offset - BINARY_PREFIX} bytes " \
                             "overruns the frame of #{size} bytes"
      end
      envelope = body.byteslice(BINARY_PREFIX, offset - BINARY_PREFIX)
      frame = parse(envelope, "binary frame's envelope")
      entries = frame.delete(BINARY)
      raise ProtocolError, "binary frame has no '$binary' list" unless entries.is_a?(Array)

      entries.each do |entry|
        path, length, segment, text = binary_entry(entry)
        if segment
          bytes = @shm.read(segment, length)
        elsif offset + length > size
          raise ProtocolError, "binary value at #{brief(path)} of #{length} bytes overruns " \
                               "the frame"
        else
          bytes = body.byteslice(offset, length)
          offset += length
        end
        place(frame, path, text ? text(bytes, path) : bytes)
      end
      return frame if offset == size

      raise ProtocolError, "binary frame has #{size - offset} bytes beyond its values"
    end

    # The String of a text entry's `bytes` (a String of our own: relabelled, not copied).
    def text(bytes, path)
      bytes.force_encoding(Encoding::UTF_8)
      return bytes if bytes.valid_encoding?

      raise ProtocolError, "text value at #{brief(path)} is not valid UTF-8"
    end

    # An entry of "$binary" as [path, size, segment name or nil, whether it is text].
    def binary_entry(entry)
      unless entry.is_a?(Hash)
        raise ProtocolError, "'$binary' entry #{brief(entry)} is not an object"
      end

      path = entry["path"]
      length = entry["size"]
      unless path.is_a?(Array) && !path.empty? && length.is_a?(Integer) && !length.negative?
        raise ProtocolError, "'$binary' entry needs a non-empty 'path' and a 'size' >= 0: " \
                             "#{brief(entry)}"
      end
      segment = entry.key?("shm") ? segment_name(entry) : nil
      text = entry["text"]
      unless text.nil? || text == true || text == false
        raise ProtocolError, "'$binary' entry's 'text' must be true or false: #{brief(entry)}"
      end
      [path, length, segment, text]
    end

    # The segment an entry with "shm" names: a file name in the pool's directory.
    def segment_name(entry)
      if @shm.nil?
        raise ProtocolError, "'$binary' entry names a shared-memory segment, which this " \
                             "worker was not offered"
      end
      name = entry["shm"]
      return name if SharedMemory.name?(name)

      raise ProtocolError, "'$binary' entry's 'shm' is not a segment's name: #{brief(entry)}"
    end

    # Puts `bytes` where `path` leads in `frame`; that place must hold null.
    def place(frame, path, bytes)
      container = path[0...-1].reduce(frame) { |inner, key| step(inner, key, path) }
      unless step(container, path[-1], path).nil?
        raise ProtocolError, "binary value's path #{brief(path)} does not lead to null"
      end

      container[path[-1]] = bytes
    end

    # What `container[key]` holds, if `key` names something in it (a key of an object, an index
    # within an array).
    def step(container, key, path)
      case container
      when Hash then return container[key] if key.is_a?(String) && container.key?(key)
      when Array
        return container[key] if key.is_a?(Integer) && key.between?(0, container.size - 1)
      end
      raise ProtocolError, "binary value's path #{brief(path)} leads nowhere"
    end

    def brief(value)
      value.inspect[0, 200]
    end
  end

  # The pool's shared-memory directory (PROTOCOL.md, "Shared memory"), when it offered one
  # (SNAKEPIT_SHM_DIR): request segments are read from it, response segments created in it.
  #
  # Ruby's standard library has neither mmap nor posix_fallocate. A request segment is read
  # into a String (one copy), from a descriptor opened without following a symlink and without
  # blocking (a FIFO), once it is known to be a regular file at least as long as announced. A
  # response segment is created exclusively (O_CREAT|O_EXCL|O_NOFOLLOW, and close-on-exec as
  # Ruby opens every file), mode 0600, and filled with write(2): on a full tmpfs that fails
  # with ENOSPC (where a mapping would die of SIGBUS), and the value goes inline instead.
  class SharedMemory
    READ_FLAGS = File::RDONLY | File::NOFOLLOW | File::NONBLOCK | File::BINARY
    CREATE_FLAGS = File::CREAT | File::EXCL | File::NOFOLLOW | File::WRONLY | File::BINARY
    MODE = 0o600
    NEVER = 1 << 61 # a threshold no value reaches: no prefix, no threshold, no segments written

    # The pool's offer in the environment, or nil without SNAKEPIT_SHM_DIR.
    def self.from_env
      directory = ENV.fetch("SNAKEPIT_SHM_DIR", "")
      return nil if directory.empty?

      threshold = Snakepit.env_integer("SNAKEPIT_SHM_THRESHOLD", 0)
      new(directory, ENV.fetch("SNAKEPIT_SHM_PREFIX", ""), threshold)
    end

    # Whether `name` can name a segment: a file name, not a path ("." and ".." are not files).
    def self.name?(name)
      name.is_a?(String) && !name.empty? && name != "." && name != ".." &&
        !name.include?("/") && !name.include?("\0")
    end

    # Without a prefix (or one that is not a file name's start) or a threshold, no response
    # segment is ever written: every value goes inline.
    def initialize(directory, prefix, threshold)
      @directory = directory
      @prefix = prefix
      usable = threshold && SharedMemory.name?("#{prefix}0")
      @threshold = usable ? [threshold, NEVER].min : NEVER
      @counter = 0 # guarded by @lock
      @lock = Mutex.new
      @warned = false
    end

    # Whether a value of `size` bytes goes through a segment.
    def takes?(size)
      size >= @threshold
    end

    # The first `size` bytes of the request segment `name` (a valid name), as an ASCII-8BIT
    # String; a segment that is missing, a symlink, not a regular file or shorter than `size`
    # is a ProtocolError. The segment stays as it is: the pool deletes it.
    def read(name, size)
      File.open(File.join(@directory, name), READ_FLAGS) do |file|
        stat = file.stat
        unless stat.file?
          raise ProtocolError, "shared-memory segment #{name.inspect} is not a regular file"
        end
        if stat.size < size
          raise ProtocolError, "shared-memory segment #{name.inspect} has #{stat.size} bytes, " \
                               "fewer than its size of #{size}"
        end
        bytes = size.zero? ? String.new(encoding: Encoding::BINARY) : file.read(size)
        return bytes if bytes && bytes.bytesize == size

        raise ProtocolError, "shared-memory segment #{name.inspect} ended after " \
                             "#{bytes.to_s.bytesize} of #{size} bytes"
      end
    rescue SystemCallError, IOError => e
      raise ProtocolError, "cannot read shared-memory segment #{name.inspect} (#{e.message})"
    end

    # Writes `bytes` to a new segment and gives its name, or nil (logged once) if it cannot be
    # created or filled (ENOSPC, EDQUOT, ...): then nothing is left behind.
    def write(bytes)
      name = "#{@prefix}#{@lock.synchronize { @counter += 1 }}"
      path = File.join(@directory, name)
      file = File.new(path, CREATE_FLAGS, MODE) # nothing to delete if this fails
      begin
        fill(file, bytes)
      ensure
        file.close
      end
      done = true
      name
    rescue SystemCallError, IOError => e
      unless @warned
        @warned = true
        Snakepit.log("cannot write a shared-memory segment in #{@directory} (#{e.message}): " \
                     "sending such values inline (not logged again)")
      end
      nil
    ensure
      delete([name]) if file && !done
    end

    # Deletes the segments `names` (response segments that were not sent).
    def delete(names)
      names.each do |name|
        File.unlink(File.join(@directory, name))
      rescue SystemCallError
        nil # gone already; the pool deletes whatever has the prefix when the worker exits
      end
    end

    private

    def fill(file, bytes)
      size = bytes.bytesize
      written = file.syswrite(bytes)
      written += file.syswrite(bytes.byteslice(written, size - written)) while written < size
    end
  end

  # One request at a time (protocol 1, and protocol 2 with max_in_flight 1): requests in
  # arrival order, and $cancel while a handler runs.
  #
  # Handlers run inline on the main thread: handing each request to another thread (a Queue or
  # a Thread per request) measured 20-25% fewer pings per second. So that $cancel still gets
  # through, a watcher thread looks at the input every POLL_SECONDS while a handler runs, reads
  # what arrived, and stops the handler with Thread#raise when it is a $cancel for it. The main
  # thread reads only while no handler runs, the watcher only while one does, so they never
  # read at the same time. A thread of the handler that waits for the input reads the frames
  # itself (#read_until), so that they do not wait for the watcher's next look: a stream that
  # ran out of credit (#refill) and a callback call waiting for its answer (#await), on the
  # handler's thread or another one it started. One such thread reads at a time (@reading),
  # outside @lock, and the others wait for each frame it reads; the watcher does not read
  # meanwhile, and the main thread reads the next request only once it is done.
  class Inbox
    POLL_SECONDS = 0.05

    # The worker's Calls, once the handshake asked for protocol 2 (callbacks).
    attr_writer :calls

    def initialize(channel, main = Thread.current)
      @channel = channel
      @main = main
      @lock = Mutex.new
      @running = nil # id of the request whose handler runs; guarded by @lock
      @stream = nil # its Stream, if it is one; guarded by @lock
      @ctx = nil # its Context; guarded by @lock
      @raised = false # whether Cancelled was raised into that handler; guarded by @lock
      @early = [] # [request, time read] the watcher read while a handler ran
      @ended = false # the watcher reached the end of input
      @stopped = false # the main thread reads everything itself now; guarded by @lock
      @reading = false # a thread of the handler reads outside @lock (#read_for_handler)
      @read = ConditionVariable.new # signalled when it has read a frame
      @calls = nil
      Thread.new { watch }
    end

    # The next request and when it was read ([request, monotonic seconds]), or nil at the end
    # of input. The watcher touches @early and @ended only while a handler runs, and this is
    # called when none does (once a thread that still read for the last one is done).
    def next_request
      wait_for_reader if @reading
      return @early.shift unless @early.empty?
      return nil if @ended

      request = @channel.read
      request && [request, Snakepit.monotonic]
    end

    # Runs the block as the handler of `job`; a $cancel for it raises Cancelled in it, a $credit
    # for it credits its stream. The caller masks Cancelled (Thread.handle_interrupt) everywhere
    # else, so that it can only interrupt a handler, never a write.
    def running(job)
      @lock.synchronize do
        @running = job.id
        @stream = job.stream
        @ctx = job.ctx
      end
      Thread.handle_interrupt(CANCELLABLE) { yield }
    ensure
      Snakepit.discard_late_cancels if finish
    end

    # Called by the running handler's `stream` when it has no credit left: reads frames until a
    # $credit grants some. Raises Cancelled if a $cancel for it comes instead (raised into this
    # thread while masked, so it is delivered as the mask ends) or the input ends (no credit
    # can come).
    def refill(stream)
      read_until { stream.credit? || @raised }
      raise Cancelled, "no credit can come" unless stream.credit?
    end

    # Called by Calls#call, on any thread of the running handler: reads frames until `answers`
    # (the call's Queue) has the answer, or the handler ended or input did (then Calls fails
    # the call, if that is not done yet).
    def await(answers)
      read_until { !answers.empty? }
    end

    # Ends the watcher, for protocol 2's reader to take over (called while no handler runs),
    # and hands over what it read ahead: [[request, time read], ...] and whether input ended.
    def stop
      @lock.synchronize do
        @stopped = true
        early = @early
        @early = []
        [early, @ended]
      end
    end

    private

    # Ends the handler's turn and says whether the watcher raised Cancelled during it. The
    # watcher raises only while it holds @lock and `id` is @running, so once this returns no
    # Cancelled can be raised for this request any more, and any it raised is already queued.
    def finish
      @lock.synchronize do
        raised = @raised
        @running = nil
        @stream = nil
        @ctx = nil
        @raised = false
        raised
      end
    end

    # Reads frames for the running handler until the block (called under @lock) is true, the
    # handler has ended or the input has. Masked: a Cancelled raised meanwhile (by this thread
    # itself, reading the $cancel) is delivered as the mask ends, never inside a read.
    def read_until
      Thread.handle_interrupt(UNCANCELLABLE) do
        @lock.synchronize do
          until yield || @ended || @running.nil?
            @reading ? @read.wait(@lock) : read_for_handler
          end
        end
      end
    end

    # Reads one frame outside @lock (held on entry and on return), so that the handler's other
    # threads can look at their calls meanwhile, and wakes them when it is in. Gives up after
    # POLL_SECONDS without input, so that the caller looks at its condition again: a thread the
    # handler left behind, whose call was dropped as the request ended, must not stay in a read
    # until the next frame comes.
    def read_for_handler
      @reading = true
      @lock.unlock
      begin
        ready = @channel.readable?(POLL_SECONDS)
        frame = @channel.read if ready
      ensure
        @lock.lock
        @reading = false
        @read.broadcast
      end
      take(frame) if ready
    rescue ProtocolError => e
      Snakepit.log("protocol error: #{e.message}; exiting")
      exit(3) # from another thread, Ruby passes SystemExit on to the main thread
    end

    def wait_for_reader
      @lock.synchronize { @read.wait(@lock) while @reading }
    end

    def watch
      until @ended || @stopped
        sleep(POLL_SECONDS)
        @lock.synchronize do
          take(@channel.read) if @running && !@stopped && !@reading && @channel.readable?
        end
      end
    rescue ProtocolError => e
      Snakepit.log("protocol error: #{e.message}; exiting")
      exit(3) # Ruby passes a thread's SystemExit on to the main thread
    end

    # A frame read while a handler ran (under @lock).
    def take(frame)
      if frame.nil?
        @ended = true
        @calls&.close
      elsif frame["command"] == CREDIT then credit(frame)
      elsif frame["command"] == CALLBACK then @calls&.answer(frame)
      elsif frame["command"] != CANCEL then @early << [frame, Snakepit.monotonic]
      elsif frame["id"] == @running && !@raised # once: a second cancel must not stop its cleanup
        @raised = true
        @calls&.refuse(@ctx) # no new call from now on
        @main.raise(Cancelled) # then Cancelled, so that the handler's own thread sees it first
        @calls&.cancel(@ctx) # then its calls waiting (on other threads) fail
      end
    end

    def credit(frame)
      items = Snakepit.credit_items(frame)
      @stream.credit(items) if items && @stream && frame["id"] == @running
    end
  end

  # One request on its way through the bridge; `stream` is its Stream if it asked for one. Under
  # protocol 2 the Pool's lock guards `thread` (the thread running it, nil while it waits) and
  # `raised` (Cancelled was raised into it).
  class Job
    attr_reader :id, :command, :handler, :stream, :ctx
    attr_accessor :thread, :raised

    def initialize(id, command, handler, args, ctx, stream = nil)
      @id = id
      @command = command
      @handler = handler
      @args = args
      @ctx = ctx
      @stream = stream
      @thread = nil
      @raised = false
    end

    # The handler's result, as the answer carries it.
    def call
      @ctx.conclude(@handler.call(@args, @ctx))
    end
  end

  # The items a handler emits when its request asked for no stream: the answer is their list,
  # and the handler's value after them unless it is nil.
  class Collector
    def initialize
      @items = []
    end

    def emit(item)
      @items << item
    end

    def conclude(value)
      value.nil? ? @items : @items << value
    end
  end

  # The items of a request that asked for a stream with a window of W items (PROTOCOL.md,
  # "Streaming"). Each emit sends its item frame at once and spends a credit; with none left it
  # returns only once the pool grants more ($credit), so the handler is never more than W items
  # ahead of the consumer. Frames go out through `output` (the channel's write when requests run
  # one at a time, the Writer's push under protocol 2). Credit comes from the thread that reads
  # the input: under protocol 2 the main thread calls #credit while the handler waits here; one
  # at a time, the handler runs on the main thread and reads it itself (`inbox`, Inbox#refill).
  class Stream
    # `streaming`: the handler was registered with `stream: true`, so it streams even if it
    # emits nothing.
    def initialize(id, window, channel, output, inbox, streaming: false)
      @id = id
      @channel = channel
      @output = output
      @inbox = inbox
      @streaming = streaming # or it emitted an item
      @lock = Mutex.new
      @credited = ConditionVariable.new
      @credit = window # guarded by @lock
      @closed = false # the input ended, so no credit can come; guarded by @lock
    end

    def emit(item)
      send_item(item)
      wait_for_credit unless spend.positive?
    end

    # The end answer's result: the handler's value, the last item unless nil. A handler that
    # does not stream is a plain one: its value, even nil, is the one item.
    def conclude(value)
      return value if @streaming

      send_item(value)
      nil
    end

    def credit(items)
      @lock.synchronize do
        @credit += items
        @credited.signal
      end
    end

    def credit?
      @lock.synchronize { @credit.positive? }
    end

    # The input ended: a handler waiting for credit, or that runs out of it, is cancelled.
    def close
      @lock.synchronize do
        @closed = true
        @credited.signal
      end
    end

    private

    # Masked, so that a $cancel stops the handler between two items, never inside a write.
    # Encoding is masked too: a frame whose segments are written is sent, never abandoned.
    def send_item(item)
      Thread.handle_interrupt(UNCANCELLABLE) do
        @output.call(@channel.encode({ "id" => @id, "item" => item }, "item"))
      end
      @streaming = true
    end

    def spend
      @lock.synchronize { @credit -= 1 }
    end

    def wait_for_credit
      return @inbox.refill(self) if @inbox

      @lock.synchronize do
        until @credit.positive?
          raise Cancelled, "no credit can come" if @closed

          @credited.wait(@lock) # a $cancel's Thread#raise interrupts the wait
        end
      end
    end
  end

  # The worker's callback calls still waiting for their answer (PROTOCOL.md, "Callbacks"): one
  # table keyed by the call number, which counts up from 0 for the whole worker, so that it is
  # unique among the calls pending. Context#call registers a call, sends its frame
  # `{"id", "call", "name", "args"}` through `output` (the channel's write when requests run one
  # at a time, the Writer's push under protocol 2) and waits on the call's own Queue; the thread
  # that reads the input resolves it when the $callback frame with that number (and the same id)
  # comes (#answer). A $callback for a call not pending is ignored: the call was dropped (its
  # request was cancelled or ended), or the pool sent nonsense.
  #
  # Who reads that frame: under protocol 2 the main thread, which reads everything. One request
  # at a time, the handler runs on the main thread and nobody else reads while it does, so the
  # calling thread reads the input itself (`inbox`, Inbox#await), as a stream reads its credit.
  #
  # Cancellation keeps the existing design: a $cancel raises Cancelled into the handler's thread,
  # so a handler blocked in ctx.call is woken by Cancelled (which `rescue => e` does not catch)
  # and unwinds; the request answers "cancelled". On top of that, in this order: before the
  # raise, the request is marked so that a call made from then on (in an ensure block) fails at
  # once with CallbackError code "cancelled", without a frame (#refuse); after it, the request's
  # pending calls fail the same way (#cancel), which wakes the other threads of the handler
  # blocked in ctx.call, and a handler that masked Cancelled. When the request ends (#finish),
  # calls still pending (on threads the handler left behind) are dropped the same way; at the
  # end of input (#close) all are, and any call made later. A call that another thread of the
  # handler registered just before its request was cancelled or ended may still send its frame
  # after the request's answer (the send is not under the lock, which would then be held across
  # a pipe write): the pool cancels or refuses such a call (PROTOCOL.md), and its answer, if
  # any, is ignored here, for the call was dropped.
  class Calls
    # One call waiting: the calling request's Context, the callback's name, and a Queue that
    # gets the answer's args (or the bridge's own failure).
    Pending = Struct.new(:ctx, :name, :answers)
    # Why a request's calls fail at once (in CallbackError's message, after the callback's name).
    CANCELLED = "the request was cancelled"
    ENDED = "the request has ended"

    def initialize(channel, output, inbox = nil)
      @channel = channel
      @output = output
      @inbox = inbox
      @lock = Mutex.new
      @pending = {} # call number => Pending; guarded by @lock
      @counter = -1 # the last call number given; guarded by @lock
      @closed = nil # why every call fails at once (the input ended); guarded by @lock
    end

    # Context#call: the callback's result, or CallbackError.
    def call(ctx, name, args)
      # Mistakes of the handler's code, found before anything is sent: ArgumentError.
      unless (name.is_a?(String) || name.is_a?(Symbol)) && !name.empty?
        raise ArgumentError, "ctx.call: the callback's name must be a non-empty String or " \
                             "Symbol, got #{name.inspect}"
      end
      name = Snakepit.utf8(name.to_s)
      unless args.is_a?(Hash)
        raise ArgumentError, "ctx.call('#{name}'): args must be a Hash, got #{args.class}"
      end

      number = pending = nil
      begin
        # Masked: a $cancel stops the handler before the call or after its frame is sent, never
        # inside the write or between registering the call and sending it.
        Thread.handle_interrupt(UNCANCELLABLE) do
          number, pending = register(ctx, name)
          message = { "id" => ctx.request_id, "call" => number, "name" => name, "args" => args }
          @output.call(encode(message, name))
        end
        @inbox&.await(pending.answers)
        answer = pending.answers.pop # a $cancel's Thread#raise interrupts the wait
      ensure
        forget(number, pending) if pending
      end
      outcome(answer, name)
    end

    # A $callback frame: resolves the call it answers, if that is pending for the frame's id.
    def answer(frame)
      args = frame["args"]
      number = args["call"] if args.is_a?(Hash)
      unless number.is_a?(Integer)
        Snakepit.log("ignoring $callback for request #{frame['id']}: args.call must be an " \
                     "integer, got #{number.inspect}")
        return
      end
      pending = @lock.synchronize do
        found = @pending[number]
        @pending.delete(number) if found && found.ctx.request_id == frame["id"]
      end
      pending&.answers&.push(args)
    end

    # A $cancel for the request of `ctx`, before Cancelled is raised into its handler: every
    # call it makes from now on fails at once.
    def refuse(ctx)
      @lock.synchronize { ctx.calls_closed ||= CANCELLED }
    end

    # Then, once Cancelled is on its way (so that the handler's own thread, if it waits for a
    # call, is woken by Cancelled rather than by the call's failure): its calls waiting fail.
    def cancel(ctx)
      drop(ctx, CANCELLED)
    end

    # The request of `ctx` has ended (its answer is about to go): the same (Context#finish_calls).
    def finish(ctx)
      drop(ctx, ENDED)
    end

    # The end of input: no answer can come any more; every call fails, now and from now on.
    def close
      failed = @lock.synchronize do
        @closed ||= "the input ended"
        taken = @pending.values
        @pending.clear
        taken
      end
      failed.each { |pending| fail_call(pending, "the input ended") }
    end

    private

    def register(ctx, name)
      @lock.synchronize do
        ctx.called = true # before reading calls_closed: see Context#finish_calls
        reason = ctx.calls_closed || @closed
        raise CallbackError.new("callback '#{name}': #{reason}", code: "cancelled") if reason

        number = (@counter += 1)
        [number, @pending[number] = Pending.new(ctx, name, Thread::Queue.new)]
      end
    end

    def encode(message, name)
      @channel.encode(message, "args")
    rescue EncodeError => e
      # The channel's words are a result's: "result cannot be encoded", "response of N bytes".
      why = e.message.sub(/\Aresult /, "").sub(/\Aresponse /, "call ")
      raise ArgumentError, "ctx.call('#{name}'): args cannot be sent (#{why})"
    end

    def forget(number, pending)
      @lock.synchronize { @pending.delete(number) if @pending[number].equal?(pending) }
    end

    # The callback's result, or its failure raised.
    def outcome(answer, name)
      return answer["result"] if answer["success"] == true

      code = answer["code"]
      error = answer["error"]
      raise CallbackError.new(error.is_a?(String) ? error : "callback '#{name}' failed",
                              code: code.is_a?(String) ? code : "callback_failed")
    end

    def drop(ctx, reason)
      failed = @lock.synchronize do
        ctx.calls_closed ||= reason
        next nil if @pending.empty?

        taken = @pending.select { |_, pending| pending.ctx.equal?(ctx) }
        taken.each_key { |number| @pending.delete(number) }
        taken.values
      end
      failed&.each { |pending| fail_call(pending, reason) }
    end

    def fail_call(pending, reason)
      pending.answers.push({ "success" => false, "code" => "cancelled",
                             "error" => "callback '#{pending.name}': #{reason}" })
    end
  end

  # Protocol 2: runs jobs on up to `size` threads, started as they are needed; more jobs wait
  # in arrival order. A $cancel raises Cancelled into the thread of exactly the job it names,
  # only while that job runs (decided under @lock, as Inbox does for the main thread), at most
  # once; a job still waiting is dropped. Each thread masks Cancelled outside its handler and
  # discards a late one before it takes its next job, so a cancel never reaches another job.
  class Pool
    def initialize(size, &perform)
      @size = size
      @perform = perform # called on a pool thread with a job and a block that runs its handler
      @lock = Mutex.new
      @work = ConditionVariable.new
      @waiting = [] # jobs not started yet, in arrival order
      @jobs = {} # id => job, waiting or running
      @threads = []
      @idle = 0 # threads waiting for a job
      @closed = false
    end

    def submit(job)
      @lock.synchronize do
        @jobs[job.id] = job
        @waiting << job
        @work.signal if @idle.positive?
        spawn if @waiting.size > @idle && @threads.size < @size
      end
    end

    # A $cancel for `id`: :dropped if the job was waiting (it is dropped; the caller answers
    # it); the job if it runs and this is its first cancel (Cancelled is on its way, raised into
    # its thread right after the block, given the job, has run); nil if it was cancelled already
    # or is not here (nothing to do).
    def cancel(id)
      @lock.synchronize do
        job = @jobs[id]
        return nil if job.nil?

        if job.thread.nil?
          @jobs.delete(id)
          @waiting.delete(job) # Job has identity equality
          return :dropped
        end
        return nil if job.raised

        job.raised = true
        yield job if block_given?
        job.thread.raise(Cancelled)
        job
      end
    end

    # A $credit for `id`: grants `items` to its stream, if it is one in flight.
    def credit(id, items)
      job = @lock.synchronize { @jobs[id] }
      job&.stream&.credit(items)
    end

    # At the end of input: lets every job finish (waiting ones too), then ends the threads. No
    # credit can come any more, so a stream that waits for it is cancelled (Stream#close).
    def close
      @lock.synchronize do
        @closed = true
        @jobs.each_value { |job| job.stream&.close }
        @work.broadcast
      end
      @threads.each(&:join)
    end

    private

    def spawn
      @threads << Thread.new do
        # What escapes a handler (SystemExit, NoMemoryError) ends the worker, as on the main thread.
        Thread.current.abort_on_exception = true
        Thread.handle_interrupt(UNCANCELLABLE) { work }
      end
    end

    def work
      while (job = take)
        @perform.call(job) { running(job) { job.call } }
      end
    end

    def take
      @lock.synchronize do
        while @waiting.empty?
          return nil if @closed

          @idle += 1
          @work.wait(@lock)
          @idle -= 1
        end
        job = @waiting.shift
        job.thread = Thread.current # running: from now on a $cancel raises into this thread
        job
      end
    end

    def running(job)
      Thread.handle_interrupt(CANCELLABLE) { yield }
    ensure
      Snakepit.discard_late_cancels if finish(job)
    end

    # Ends the job's turn and says whether Cancelled was raised into it: after this no cancel
    # can reach it any more, and one raised is already queued (see Inbox#finish).
    def finish(job)
      @lock.synchronize do
        @jobs.delete(job.id) if @jobs[job.id].equal?(job)
        job.raised
      end
    end
  end

  # Protocol 2: writes the replies the other threads push. Each time it wakes it takes every
  # reply that is ready and writes them all with one write.
  class Writer
    def initialize(channel)
      @channel = channel
      @lock = Mutex.new
      @ready = ConditionVariable.new
      @frames = []
      @closed = false
      @thread = Thread.new do
        Thread.current.abort_on_exception = true
        write_until_closed
      end
    end

    def push(frame)
      @lock.synchronize do
        @frames << frame
        @ready.signal
      end
    end

    # Writes what is left, then ends the writer.
    def close
      @lock.synchronize do
        @closed = true
        @ready.signal
      end
      @thread.join
    end

    private

    def write_until_closed
      while (frames = take)
        @channel.write_all(frames)
      end
    rescue Errno::EPIPE
      exit(0) # the pool closed our output: it is gone, as at the end of input
    end

    def take
      @lock.synchronize do
        @ready.wait(@lock) while @frames.empty? && !@closed
        return nil if @frames.empty?

        frames = @frames
        @frames = []
        frames
      end
    end
  end

  # Adapts a handler to be called as handler.call(args, ctx).
  module Handler
    # Lambdas and methods are called with as many arguments as they declare (args, or args
    # and ctx); a plain block ignores extra arguments, so it always gets both.
    def self.adapt(name, handler)
      unless handler.respond_to?(:call)
        raise SetupError, "handler of '#{name}' must be a callable or a block"
      end
      return handler if handler.is_a?(Proc) && !handler.lambda?

      arity = handler.respond_to?(:arity) ? handler.arity : handler.method(:call).arity
      required = arity.negative? ? -arity - 1 : arity
      raise SetupError, "handler of '#{name}' must take (args) or (args, ctx)" if required > 2

      case arity
      when 0 then ->(_args, _ctx) { handler.call }
      when 1 then ->(args, _ctx) { handler.call(args) }
      else handler
      end
    end
  end

  # Dispatches requests to handlers and answers them (PROTOCOL.md, "Envelopes").
  #
  # The handshake (the first request, a ping) decides how: without `max_in_flight`, or with 1,
  # one request at a time on the main thread (Inbox); with N > 1 the main thread reads ahead,
  # answers ping and what fails before a handler runs itself, runs every other request on a
  # Pool thread and hands the replies to a Writer.
  class Server
    NO_META = {}.freeze

    # requests_handled is counted by the one thread that reads requests (the main thread).
    attr_reader :worker_id, :requests_handled

    def initialize
      @ping = method(:ping)
      @handlers = { "ping" => @ping }
      @given = {} # name => the name as registered (a String or a Symbol), for messages
      @streaming = {} # name => true for a handler registered with `stream: true`
      @started = Snakepit.monotonic
      @worker_id = ENV["SNAKEPIT_WORKER_ID"]&.then { |id| Snakepit.utf8(id) } # until the handshake
      @requests_handled = 0
      @protocol = 1 # 2 once the handshake asked for it (max_in_flight)
      @max_in_flight = 1
      @calls = nil # the callback calls in flight (Calls) once the handshake asked for protocol 2
    end

    # Registers `handler` (a callable taking (args) or (args, ctx)) or the block as `name` (a
    # String or a Symbol: "shout" and :shout are the same command, and registering it twice
    # is a SetupError, as are "ping" and names starting with "$"). With `stream: true` the
    # handler streams (ctx.emit) even when it emits nothing.
    def command(name, handler = nil, stream: false, &block)
      key = command_name(name)
      raise SetupError, "command '#{key}' is given both a handler and a block" if handler && block
      if key == "ping"
        raise SetupError, "command 'ping' is built into snakepit and cannot be replaced"
      end
      if @given.key?(key)
        raise SetupError, "command '#{key}' is registered twice#{as_given(key, name)}"
      end

      @handlers[key] = Handler.adapt(key, handler || block)
      @given[key] = name
      @streaming[key] = true if stream
      self
    end

    def commands
      @handlers.keys.sort
    end

    # Seconds since the worker started.
    def uptime
      Snakepit.monotonic - @started
    end

    # Answers requests until the end of input (exit 0), SIGTERM (exit 0) or an undecodable
    # frame (exit 3).
    def serve(channel)
      @channel = channel
      @output = channel.method(:write) # where stream items go; the Writer's under protocol 2
      trap("TERM") { exit(0) }
      Thread.handle_interrupt(UNCANCELLABLE) do
        @inbox = Inbox.new(channel)
        serve_one_at_a_time
        serve_concurrently(*@inbox.stop) if @max_in_flight > 1
      end
      exit(0)
    rescue ProtocolError => e
      Snakepit.log("protocol error: #{e.message}; exiting")
      exit(3)
    rescue Errno::EPIPE
      exit(0) # the pool closed our output: it is gone, as at the end of input
    end

    private

    # Runs a job's handler (the block does) and gives its response frame. Callback calls of the
    # request still waiting then (on threads the handler left behind) are dropped before it goes.
    def perform(job)
      result = yield
      @channel.encode({ "id" => job.id, "success" => true, "result" => result }, "result")
    rescue Cancelled
      failure(job.id, "cancelled")
    rescue CommandError, EncodeError => e
      failure(job.id, "#{job.command}: #{Snakepit.utf8(e.message)}")
    rescue *HANDLER_ERRORS => e
      Snakepit.log_failure(job.command, e)
      failure(job.id, "#{job.command}: #{Snakepit.utf8(e.message)}")
    ensure
      job.ctx.finish_calls
    end

    def command_name(name)
      unless name.is_a?(String) || name.is_a?(Symbol)
        raise SetupError, "command name #{name.inspect} must be a String or a Symbol"
      end

      key = Snakepit.utf8(name.to_s) # text, even if given as ASCII-8BIT (it is listed by info)
      raise SetupError, "command name must not be empty" if key.empty?
      if key.start_with?("$")
        raise SetupError, "command '#{key}' cannot be registered: names starting with '$' " \
                          "are the protocol's"
      end
      key
    end

    def as_given(key, name)
      first = @given[key]
      first.instance_of?(name.class) ? "" : " (as #{first.inspect} and #{name.inspect})"
    end

    def serve_one_at_a_time
      while (request, received = @inbox.next_request)
        handle(request, received)
        return if @max_in_flight > 1 # the handshake asked for protocol 2
      end
    end

    def handle(request, received)
      id = request_id(request)
      command = request["command"]
      # The main thread reads only while no handler runs, so this names none: ignore it (a
      # malformed $credit is logged; a $callback answers a call dropped with its request).
      return if command == CANCEL || command == CALLBACK

      if command == CREDIT
        Snakepit.credit_items(request)
        return
      end

      @requests_handled += 1
      job = job(id, command, request, received)
      @channel.write(job.is_a?(Job) ? perform(job) { call_inline(job) } : job)
    end

    def call_inline(job)
      return job.call if job.handler.equal?(@ping) # instant: no need to make it cancellable

      @inbox.running(job) { job.call }
    end

    # Protocol 2 with max_in_flight > 1: reads ahead while handlers run on the pool's threads.
    def serve_concurrently(early, ended)
      @writer = Writer.new(@channel)
      @output = @writer.method(:push)
      @inbox = nil # the watcher has stopped: a stream gets its credit from this thread's reads
      @calls = Calls.new(@channel, @output) # and a callback call its answer
      threads = [@max_in_flight, MAX_THREADS].min
      @pool = Pool.new(threads) { |job, &run| @writer.push(perform(job, &run)) }
      early.each { |request, received| dispatch(request, received) }
      unless ended
        while (request = @channel.read)
          dispatch(request, Snakepit.monotonic)
        end
      end
      @calls.close # no answer can come: a handler waiting for one must not hold up the exit
      @pool.close
      @writer.close
    end

    def dispatch(request, received)
      id = request_id(request)
      command = request["command"]
      if command == CANCEL
        cancelled = @pool.cancel(id) { |job| @calls.refuse(job.ctx) }
        if cancelled == :dropped then @writer.push(failure(id, "cancelled"))
        elsif cancelled then @calls.cancel(cancelled.ctx) # after the raise: see Calls
        end
        return
      end
      if command == CALLBACK
        @calls.answer(request)
        return
      end
      if command == CREDIT
        items = Snakepit.credit_items(request)
        @pool.credit(id, items) if items
        return
      end

      @requests_handled += 1
      job = job(id, command, request, received)
      if !job.is_a?(Job) then @writer.push(job)
      elsif job.handler.equal?(@ping) then @writer.push(perform(job) { job.call }) # promptly
      else @pool.submit(job)
      end
    end

    def request_id(request)
      id = request["id"]
      return id if id.is_a?(Integer)

      raise ProtocolError, "request without an integer id: #{request.to_s[0, 200]}"
    end

    # The request as a Job, or the frame that answers it when no handler can run.
    def job(id, command, request, received)
      handler = @handlers[command]
      return failure(id, unknown_command(command)) unless handler

      args = request["args"] || {}
      return failure(id, "#{command}: args must be a JSON object") unless args.is_a?(Hash)

      meta = request["meta"]
      meta = NO_META unless meta.is_a?(Hash)
      return stream_job(id, command, handler, args, meta, received) unless meta["stream"].nil?

      collector = Collector.new if @streaming.key?(command) # [] even if it emits nothing
      Job.new(id, command, handler, args, context(id, meta, received, collector))
    end

    # A request with `meta.stream`: a Job with a Stream, or the frame that refuses a malformed
    # one (rather than answer a stream as one result, which the pool would take as one item).
    def stream_job(id, command, handler, args, meta, received)
      window = meta["stream"]["window"] if meta["stream"].is_a?(Hash)
      unless window.is_a?(Integer) && window.positive?
        return failure(id, "#{command}: meta.stream.window must be an integer >= 1, got " \
                           "#{window.inspect}")
      end

      streaming = @streaming.key?(command)
      stream = Stream.new(id, window, @channel, @output, @inbox, streaming: streaming)
      Job.new(id, command, handler, args, context(id, meta, received, stream), stream)
    end

    def unknown_command(command)
      "unknown command '#{command}' (supported: #{commands.join(', ')})"
    end

    def failure(id, message)
      @channel.encode({ "id" => id, "success" => false, "error" => message })
    end

    def context(id, meta, received, emitter)
      Context.new(id, @worker_id, meta["traceparent"], meta["tracestate"], meta["deadline_ms"],
                  received, emitter, @calls)
    end

    # The handshake: records the worker id the pool assigned (PROTOCOL.md, "Handshake"), and,
    # the first time, whether the pool speaks protocol 2 ("Handshake v2").
    def ping(args, _ctx)
      negotiate(args["max_in_flight"]) if @requests_handled == 1 && args.key?("max_in_flight")
      @worker_id = args["worker_id"] if args["worker_id"].is_a?(String)
      # Only the handshake's answer names protocol 2; a health check gets the plain answer.
      v2 = @protocol == PROTOCOL && args.key?("max_in_flight")
      result = {
        "status" => "ok", "uptime" => uptime, "requests_handled" => @requests_handled,
        "worker_id" => @worker_id, "runtime" => RUNTIME,
        "capabilities" => v2 ? protocol_capabilities : CAPABILITIES, "pid" => Process.pid
      }
      return result unless v2

      result["protocol"] = PROTOCOL
      result["max_concurrency"] = MAX_CONCURRENCY
      result
    end

    def protocol_capabilities
      @channel.shm? ? SHM_CAPABILITIES : PROTOCOL_CAPABILITIES
    end

    # A `max_in_flight` N (an integer >= 1) asks for protocol 2: the pool then sends up to
    # min(N, MAX_CONCURRENCY) requests at once. Without it (a protocol-1 pool), or with a value
    # that is not such an integer, the worker stays at protocol 1, one request at a time.
    def negotiate(max_in_flight)
      unless max_in_flight.is_a?(Integer) && max_in_flight.positive?
        Snakepit.log("ignoring max_in_flight=#{max_in_flight.inspect} (not an integer >= 1): " \
                     "protocol 1")
        return
      end

      @protocol = PROTOCOL
      @max_in_flight = [max_in_flight, MAX_CONCURRENCY].min
      @channel.binary = true # declared in this handshake's answer (PROTOCOL_CAPABILITIES)
      # Callbacks, declared too: one request at a time their answers are read by the calling
      # thread itself (serve_concurrently replaces this for max_in_flight > 1).
      @calls = Calls.new(@channel, @channel.method(:write), @inbox)
      @inbox.calls = @calls
    end
  end
end
