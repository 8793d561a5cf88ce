"use strict";
/**
 * snakepit bridge library for Node.js: write handlers, get a snakepit worker.
 *
 *     const { run, CommandError } = require("snakepit");
 *     run({
 *       shout: async (args, ctx) => ({ text: args.text.toUpperCase() }),
 *       add: (args) => args.a + args.b,
 *       half: (args) => {
 *         if (args.n % 2) throw new CommandError("n must be even"); // "half: n must be even"
 *         return args.n / 2;
 *       },
 *     });
 *
 * The library implements docs/PROTOCOL.md on the process's stdin/stdout: length-prefixed JSON
 * frames, the `ping` handshake, protocol 2 (concurrent requests), `$cancel` (handlers get
 * `ctx.signal`), error mapping (a thrown error becomes `success: false` with
 * "<command>: <message>"; any error but a CommandError also logs its stack to stderr) and
 * stdout protection. Handlers get `(args, ctx)`; `ctx` has requestId, workerId, traceparent,
 * tracestate, deadlineMs, deadline (seconds left, or null), signal and call() (see
 * *Callbacks*). Node's standard library only.
 *
 * Protocol 2. The handshake `ping` may carry `max_in_flight: N`; the library then answers
 * `protocol: 2, max_concurrency: 4096` and capabilities ["cancel", "deadline", "stream",
 * "binary", "text", "callbacks"] ("shm" too when offered), and runs up to min(N, 4096)
 * requests at once: each starts as its frame arrives (input is read
 * ahead while handlers run), responses go out as handlers settle, in any order. Without
 * `max_in_flight` (a protocol-1 pool) the answer is the protocol-1 one and requests run one at
 * a time. Requests beyond the limit wait in arrival order; the built-in `ping` never waits.
 * Responses that become ready together leave in one write (see *Output*).
 *
 * Streams. A handler that is a generator function (`async function*` or `function*`) streams:
 *
 *     run({ count: async function* (args, ctx) { for (let i = 0; i < args.n; i++) yield i; } });
 *
 * Asked for a stream (`meta.stream.window` W), each item it yields goes out as an item frame,
 * the generator is not resumed while W items are unacknowledged (`$credit` acknowledges them),
 * and its return value, unless undefined or null, is the last item; `$cancel` closes it, so
 * its `finally` blocks run. Called without `meta.stream`, it answers the array of its items. A
 * plain handler asked for a stream answers its result as the one item.
 *
 * Binary values (capabilities `binary` and `text`, declared at protocol 2; `shm` too when the
 * pool offers shared memory with SNAKEPIT_SHM_DIR). Handlers get every binary value of a request
 * as a Buffer, wherever it is in the args and however it came: inline (a view of the frame's
 * bytes, not a copy) or in a shared-memory segment (read into a Buffer of its own: one copy, as
 * Node has no mmap; the segment is opened read-only with O_NOFOLLOW and left to the pool). A
 * text attachment arrives as an ordinary string. A result or item may hold any Buffer, typed
 * array, DataView or ArrayBuffer, however deep: it goes out as a binary frame (PROTOCOL.md,
 * *Binary values*), its bytes not copied unless small; one of at least SNAKEPIT_SHM_THRESHOLD
 * bytes is written to a new segment SNAKEPIT_SHM_DIR/<SNAKEPIT_SHM_PREFIX><n> instead (created
 * with O_CREAT|O_EXCL|O_NOFOLLOW, mode 0600, written with write(), never mmap, and closed before
 * the frame naming it leaves; a segment that cannot be made or filled, say on a full /dev/shm,
 * is deleted and the value sent inline). With SNAKEPIT_TEXT_THRESHOLD set, every string of the
 * result at least that long (in UTF-16 code units, String#length) goes out as a text attachment
 * (its UTF-8 bytes, inline or in a segment) instead of inside the JSON, unless it holds a lone
 * surrogate, which UTF-8 cannot carry; the caller gets the same string. A response whose
 * envelope and values add up beyond SNAKEPIT_MAX_PAYLOAD_BYTES (1 GiB by default) is refused
 * with "<command>: response of N bytes exceeds the payload limit of M bytes", leaving no
 * segment behind. At protocol 1 results are plain JSON, a Buffer as JSON.stringify writes it.
 *
 * Callbacks (capability `callbacks`, protocol 2). A handler may call a function the host
 * registered (`pool.register_callback(name, fn)`) and wait for its result:
 *
 *     const { run, CallbackError } = require("snakepit");
 *     run({
 *       greet: async (args, ctx) => {
 *         try {
 *           const user = await ctx.call("lookup", { key: args.key });
 *           return `hello ${user.name}`;
 *         } catch (err) {
 *           if (err instanceof CallbackError && err.code === "unknown_callback") return "hello";
 *           throw err;
 *         }
 *       },
 *     });
 *
 * `ctx.call(name, args)` sends the call frame {"id": <request id>, "call": <n>, "name", "args"}
 * (binary values and long strings in `args` travel as in a result: binary frame, text lane,
 * shared memory) and returns a Promise of the result of the `$callback` answer with that `call`
 * (binary values as Buffers). A failed answer rejects with a CallbackError whose `code` and
 * message are the answer's `code` and `error`. `$cancel` rejects the request's pending calls at
 * once with code "cancelled" (its signal aborts too), and so is any call made after that; a
 * call made after the request was answered also fails with "cancelled", and when a request is
 * answered its pending calls are dropped: never settled, their late answers ignored. Calls may
 * overlap, from one handler and from concurrent requests (streaming ones too, between items).
 * A call that is refused before it is sent fails with "bad_callback" (name not a string, args
 * not an object or not serializable, over a limit) or "unsupported" (protocol 1).
 */

const { isUtf8 } = require("buffer"); // Node 18.14 and later; TextDecoder before
const fs = require("fs");
const { setImmediate: nextTurn } = require("timers/promises");
const { inspect } = require("util");

const VERSION = "0.2.0";
const RUNTIME = "node";
const CAPABILITIES_V1 = Object.freeze(["cancel"]);
const CAPABILITIES_V2 = Object.freeze([
  "cancel",
  "deadline",
  "stream",
  "binary",
  "text",
  "callbacks",
]);
/** CAPABILITIES_V2 with `shm`, when the pool offers shared memory (SNAKEPIT_SHM_DIR). */
const CAPABILITIES_V2_SHM = Object.freeze([...CAPABILITIES_V2, "shm"]);
const PROTOCOL = 2;
/** What one worker takes at once: `max_concurrency` of the protocol-2 handshake answer. */
const MAX_CONCURRENCY = 4096;
const DEFAULT_MAX_FRAME_BYTES = 64 * 1024 * 1024;
const DEFAULT_MAX_PAYLOAD_BYTES = 1024 * 1024 * 1024;
const EXIT_PROTOCOL_ERROR = 3;
const EXIT_STARTUP_ERROR = 2;
const HEADER_BYTES = 4;
/** The output buffer's usual size; one that grew past SHRINK_BYTES is dropped after a flush. */
const SCRATCH_BYTES = 64 * 1024;
const SHRINK_BYTES = 1024 * 1024;
const FD_DIRS = ["/proc/self/fd/", "/dev/fd/"];
const { O_RDONLY, O_WRONLY, O_APPEND, O_CREAT, O_EXCL, O_NOFOLLOW, O_NONBLOCK } = fs.constants;

// Moving the protocol channels aside must happen before anything creates process.stdout or
// process.stdin, so it runs as soon as the library is required.
const channels = protectStdio();

const state = {
  started: false,
  workerId: process.env.SNAKEPIT_WORKER_ID || null,
  requestsHandled: 0,
  commands: [],
  supported: "",
  handlers: new Map(),
  /** How many requests may run at once: 1 until a handshake asks for more (protocol 2). */
  limit: 1,
  /** Requests started and not yet answered. */
  active: 0,
  /** Async requests still running, by id: what `$cancel` can reach. */
  running: new Map(),
  /** Generators streaming their items, by id: what `$credit` can reach. */
  streams: new Map(),
  /** Requests waiting for a free slot, by id, in arrival order (a Map keeps insertion order). */
  queued: new Map(),
  maxFrameBytes: DEFAULT_MAX_FRAME_BYTES,
  /** SNAKEPIT_MAX_PAYLOAD_BYTES: one message's envelope and values, inline and shared. */
  maxPayloadBytes: DEFAULT_MAX_PAYLOAD_BYTES,
  /** What a plain JSON frame may take: the smaller of the two limits. */
  maxJsonBytes: DEFAULT_MAX_FRAME_BYTES,
  /** Binary values go out as binary frames: a protocol-2 handshake declared `binary`. */
  binary: false,
  /** Handlers may call the host: a protocol-2 handshake declared `callbacks`. */
  callbacks: false,
  /**
   * Callback calls sent and not yet answered, by their `call` number (unique in the worker, so
   * unique among its unanswered calls): each a { requestId, name, resolve, reject, owner }.
   */
  calls: new Map(),
  /** The `call` number of the next callback call. */
  nextCall: 0,
  /**
   * Shared memory, when the pool offers it (SNAKEPIT_SHM_DIR): the directory, the prefix of
   * the segments this worker makes, the size from which values go in one, and the number of
   * the next segment; null without.
   */
  shm: null,
};

// ---------------------------------------------------------------------------------------------
// Stdout protection
// ---------------------------------------------------------------------------------------------

/**
 * Keeps user output and child processes off the protocol pipes.
 *
 * Where descriptors can be re-opened by path (/proc/self/fd, /dev/fd), the protocol gets
 * private descriptors on the same pipes, then fd 1 is re-opened on stderr and fd 0 on
 * /dev/null: console.log, fs.writeSync(1, ...) and children with inherited stdio write to
 * stderr, and a child reading stdin reads nothing. On Linux, re-opening a pipe (unlike dup)
 * makes a new open file description, so the O_NONBLOCK that Node sets on its streams does not
 * leak between the protocol pipes and what children inherit. O_APPEND keeps a re-opened
 * regular file (stdout or stderr redirected to a log) from being overwritten from offset 0.
 * Elsewhere (e.g. stdio on sockets) only process.stdout, and so console, go to stderr.
 */
function protectStdio() {
  const aside = openProtocolFds();
  if (aside === null) {
    Object.defineProperty(process, "stdout", {
      configurable: true,
      enumerable: true,
      get: () => process.stderr,
    });
    return { input: 0, output: 1 };
  }
  reopenAs(0, "/dev/null", O_RDONLY);
  reopenAs(1, aside.stderrPath, O_WRONLY | O_APPEND);
  return { input: aside.input, output: aside.output };
}

/** Private descriptors on the pipes behind fds 0 and 1, or null if they cannot be re-opened. */
function openProtocolFds() {
  for (const dir of FD_DIRS) {
    const opened = [];
    try {
      opened.push(fs.openSync(dir + "0", O_RDONLY));
      opened.push(fs.openSync(dir + "1", O_WRONLY | O_APPEND));
      // Probe stderr too: once fd 1 is closed there is no way back.
      fs.closeSync(fs.openSync(dir + "2", O_WRONLY | O_APPEND));
      return { input: opened[0], output: opened[1], stderrPath: dir + "2" };
    } catch {
      opened.forEach((fd) => fs.closeSync(fd));
    }
  }
  return null;
}

/** Re-opens `path` as descriptor `fd`: open() returns the lowest free descriptor. */
function reopenAs(fd, path, flags) {
  fs.closeSync(fd);
  const got = fs.openSync(path, flags);
  if (got !== fd) {
    throw new Error(`snakepit: re-opening ${path} gave fd ${got} instead of ${fd}`);
  }
}

// ---------------------------------------------------------------------------------------------
// Frames
// ---------------------------------------------------------------------------------------------

/** A frame the bridge cannot decode: the stream cannot be trusted after it. */
class FrameError extends Error {}

/** A frame body at least this big is copied into place as its bytes arrive. */
const FILL_FROM = 256 * 1024;

/**
 * Splits the input byte stream into frame bodies. Chunks wait in a list, with an offset into
 * the first, so a frame is copied only when it spans chunks and never re-concatenated. A big
 * body (a binary value of megabytes) has its buffer made as soon as its length is known, and
 * each chunk is copied into it as it arrives, while the rest is still on its way.
 */
class FrameReader {
  constructor(maxBytes) {
    this.maxBytes = maxBytes;
    this.chunks = [];
    this.offset = 0; // bytes of chunks[0] already consumed
    this.buffered = 0;
    this.bodyLength = -1;
    /** The big body being filled (then `chunks` is empty), and how much of it is. */
    this.body = null;
    this.filled = 0;
  }

  push(chunk) {
    const { body } = this;
    if (body !== null) {
      const count = Math.min(chunk.length, body.length - this.filled);
      chunk.copy(body, this.filled, 0, count);
      this.filled += count;
      if (count === chunk.length) return;
      chunk = chunk.subarray(count); // the next frames
    }
    this.chunks.push(chunk);
    this.buffered += chunk.length;
  }

  /** The next complete frame body, or null until more bytes arrive. */
  next() {
    if (this.body !== null) {
      if (this.filled < this.body.length) return null;
      const body = this.body;
      this.body = null;
      this.bodyLength = -1;
      return body;
    }
    if (this.bodyLength < 0) {
      if (this.buffered < HEADER_BYTES) return null;
      const length = this.readLength();
      if (length > this.maxBytes) {
        throw new FrameError(
          `frame of ${length} bytes exceeds the limit of ${this.maxBytes} bytes ` +
            "(SNAKEPIT_MAX_FRAME_BYTES)",
        );
      }
      this.bodyLength = length;
    }
    if (this.buffered < this.bodyLength) {
      if (this.bodyLength >= FILL_FROM) {
        this.body = Buffer.allocUnsafe(this.bodyLength);
        this.filled = this.buffered;
        this.copyOut(this.body, this.buffered);
      }
      return null;
    }
    const body = this.take(this.bodyLength);
    this.bodyLength = -1;
    return body;
  }

  readLength() {
    const first = this.chunks[0];
    if (first.length - this.offset < HEADER_BYTES) return this.take(HEADER_BYTES).readUInt32BE(0);
    const length = first.readUInt32BE(this.offset);
    this.consume(HEADER_BYTES);
    return length;
  }

  /** Removes `n` buffered bytes: a view when one chunk holds them, else one copy. */
  take(n) {
    const first = this.chunks[0];
    const start = this.offset;
    if (first !== undefined && first.length - start >= n) {
      this.consume(n);
      return first.subarray(start, start + n);
    }
    const out = Buffer.allocUnsafe(n);
    this.copyOut(out, n);
    return out;
  }

  /** Moves `n` buffered bytes to the start of `out`. */
  copyOut(out, n) {
    for (let filled = 0; filled < n; ) {
      const chunk = this.chunks[0];
      const count = Math.min(chunk.length - this.offset, n - filled);
      chunk.copy(out, filled, this.offset, this.offset + count);
      filled += count;
      this.consume(count);
    }
  }

  /** Consumes `n` bytes of the first chunk, dropping it once it is used up. */
  consume(n) {
    this.buffered -= n;
    this.offset += n;
    if (this.offset === this.chunks[0].length) {
      this.chunks.shift();
      this.offset = 0;
    }
  }
}

// fatal: invalid UTF-8 throws (Buffer#toString would replace it); a BOM is kept, so JSON.parse
// refuses it as the pool's decoder does.
const utf8 = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true });

function decodeUtf8(bytes, what) {
  try {
    return utf8.decode(bytes);
  } catch {
    throw new FrameError(`${what} is not valid UTF-8`);
  }
}

function parseRequest(body) {
  const request = body.length !== 0 && body[0] === BINARY_MARK ? parseBinary(body) : parseJson(body);
  if (!Number.isSafeInteger(request.id) || request.id < 0) {
    throw new FrameError("request has no valid 'id' (a non-negative integer)");
  }
  return request;
}

/** A JSON object, or a FrameError saying why `bytes` are not one (`what` names them). */
function parseJson(bytes, what = "frame") {
  let message;
  try {
    message = JSON.parse(decodeUtf8(bytes, what));
  } catch (err) {
    if (err instanceof FrameError) throw err;
    throw new FrameError(`${what} is not valid JSON: ${err.message}`);
  }
  if (!isPlainObject(message)) throw new FrameError(`${what} is not a JSON object`);
  return message;
}

// ---------------------------------------------------------------------------------------------
// Binary frames (PROTOCOL.md, *Binary values*: inline, text and shared-memory entries)
// ---------------------------------------------------------------------------------------------

/** The first byte of a binary frame's body: no JSON text starts with it. */
const BINARY_MARK = 0x00;
/** The mark and the envelope's 4-byte length. */
const BINARY_PREFIX = 1 + 4;
const BINARY_KEY = "$binary";

/**
 * The request of a binary frame's body: the envelope (0x00, its 4-byte length J, J bytes of
 * JSON) with a value at each place its `$binary` list names, in order: a Buffer, a view of
 * `body` (nothing is copied) for an inline entry, a Buffer read from the segment for a `shm`
 * entry, and for a `text` entry the string its UTF-8 bytes spell. Anything that does not add
 * up is a FrameError, and nothing beyond the body (or a segment's `size`) is read.
 */
function parseBinary(body) {
  if (body.length < BINARY_PREFIX) throw new FrameError("binary frame is shorter than its header");
  const end = BINARY_PREFIX + body.readUInt32BE(1);
  if (end > body.length) {
    throw new FrameError(
      `binary frame's envelope of ${end - BINARY_PREFIX} bytes overruns the frame of ` +
        `${body.length} bytes`,
    );
  }
  const message = parseJson(body.subarray(BINARY_PREFIX, end), "binary frame's envelope");
  const entries = Object.hasOwn(message, BINARY_KEY) ? message[BINARY_KEY] : undefined;
  if (!Array.isArray(entries)) throw new FrameError("binary frame has no '$binary' list");
  delete message[BINARY_KEY];
  let offset = end;
  for (const entry of entries) {
    const { path, size, text, shm } = binaryEntry(entry);
    let bytes;
    if (shm === undefined) {
      if (size > body.length - offset) {
        throw new FrameError(
          `binary value at ${JSON.stringify(path)} of ${size} bytes overruns the frame`,
        );
      }
      bytes = body.subarray(offset, offset + size);
      offset += size;
    } else {
      bytes = readSegment(shm, size, path);
    }
    place(message, path, text ? textOf(bytes, path) : bytes);
  }
  if (offset !== body.length) {
    throw new FrameError(`binary frame has ${body.length - offset} bytes beyond its values`);
  }
  return message;
}

function binaryEntry(entry) {
  const shown = () => inspect(entry, { depth: 2, breakLength: Infinity }).slice(0, 300);
  if (!isJsonObject(entry)) throw new FrameError(`'$binary' entry ${shown()} is not an object`);
  const { path, size } = entry;
  if (!Array.isArray(path) || path.length === 0 || !Number.isSafeInteger(size) || size < 0) {
    throw new FrameError(`'$binary' entry needs a non-empty 'path' and a 'size' >= 0: ${shown()}`);
  }
  const text = Object.hasOwn(entry, "text") ? entry.text : false;
  if (typeof text !== "boolean") {
    throw new FrameError(`'$binary' entry's 'text' is neither true nor false: ${shown()}`);
  }
  if (!Object.hasOwn(entry, "shm")) return { path, size, text, shm: undefined };
  if (state.shm === null) {
    throw new FrameError(
      "'$binary' entry names a shared-memory segment, which this worker did not offer",
    );
  }
  const { shm } = entry;
  if (
    typeof shm !== "string" ||
    shm === "" ||
    shm === "." ||
    shm === ".." ||
    shm.includes("/") ||
    shm.includes("\0")
  ) {
    throw new FrameError(`'$binary' entry's 'shm' is not a segment's file name: ${shown()}`);
  }
  return { path, size, text, shm };
}

/**
 * The first `size` bytes of the request segment `name`, in a Buffer of their own (one copy:
 * Node's standard library has no mmap). The file is opened read-only with O_NOFOLLOW (a
 * symlink is refused) and O_NONBLOCK (a FIFO cannot hang the worker), must be a regular file of
 * at least `size` bytes, and is never changed: it is the pool's, which deletes it. Anything else
 * is a FrameError.
 */
function readSegment(name, size, path) {
  const what = `shared-memory segment '${name}' (value at ${JSON.stringify(path)})`;
  let fd;
  try {
    fd = fs.openSync(`${state.shm.dir}/${name}`, O_RDONLY | O_NOFOLLOW | O_NONBLOCK);
  } catch (err) {
    const reason = err.code === "ELOOP" ? "it is a symbolic link" : describe(err);
    throw new FrameError(`${what} cannot be opened: ${reason}`);
  }
  try {
    const stat = fs.fstatSync(fd);
    if (!stat.isFile()) throw new FrameError(`${what} is not a regular file`);
    if (stat.size < size) {
      throw new FrameError(`${what} has ${stat.size} bytes, fewer than its size of ${size}`);
    }
    let bytes;
    try {
      bytes = Buffer.allocUnsafe(size);
    } catch (err) {
      throw new FrameError(`${what} of ${size} bytes cannot be held: ${describe(err)}`);
    }
    for (let filled = 0; filled < size; ) {
      const count = fs.readSync(fd, bytes, filled, size - filled, filled);
      if (count === 0) throw new FrameError(`${what} ended after ${filled} of ${size} bytes`);
      filled += count;
    }
    return bytes;
  } catch (err) {
    if (err instanceof FrameError) throw err;
    throw new FrameError(`${what} cannot be read: ${describe(err)}`);
  } finally {
    fs.closeSync(fd);
  }
}

/**
 * A text entry's string. Its bytes must be UTF-8 (which no lone surrogate can be); a BOM is
 * kept, as the string's first character.
 */
function textOf(bytes, path) {
  const what = `text value at ${JSON.stringify(path)}`;
  if (isUtf8 === undefined) return decodeUtf8(bytes, what);
  if (!isUtf8(bytes)) throw new FrameError(`${what} is not valid UTF-8`);
  try {
    return bytes.toString("utf8");
  } catch (err) {
    throw new FrameError(`${what} of ${bytes.length} bytes cannot be a string: ${describe(err)}`);
  }
}

/** Puts `value` where `path` leads in `message`; that place must hold null. */
function place(message, path, value) {
  let container = message;
  for (let i = 0; i < path.length - 1; i += 1) container = step(container, path[i], path);
  const last = path[path.length - 1];
  if (step(container, last, path) !== null) {
    throw new FrameError(`binary value's path ${JSON.stringify(path)} does not lead to null`);
  }
  // An own key (step checked it), so even "__proto__" is set as data, never as the prototype.
  container[last] = value;
}

/** One step along a binary value's path: an object's own key, or an array's index. */
function step(container, key, path) {
  if (Array.isArray(container)) {
    if (Number.isSafeInteger(key) && key >= 0 && key < container.length) return container[key];
  } else if (isJsonObject(container) && typeof key === "string" && Object.hasOwn(container, key)) {
    return container[key];
  }
  throw new FrameError(`binary value's path ${JSON.stringify(path)} leads nowhere`);
}

/** An object of parsed JSON (a Buffer already placed is a value, not a container). */
function isJsonObject(value) {
  return isPlainObject(value) && !ArrayBuffer.isView(value);
}

// ---------------------------------------------------------------------------------------------
// Output
// ---------------------------------------------------------------------------------------------

/**
 * Responses are coalesced: each is encoded, header and body, behind the others in one buffer,
 * and the buffer goes out in one write per event-loop turn. Responses of sync handlers are
 * written at the end of the input chunk that carried their requests; the first response of an
 * async handler in a turn schedules a flush with setImmediate, which runs after the turn's
 * timers and I/O callbacks and the promise jobs they started, so timers that fire together
 * and promises that settle together leave in one write. The buffer is reused (the hot path
 * allocates none); one that had to grow past SHRINK_BYTES is dropped after its flush.
 */
const output = {
  buffer: Buffer.allocUnsafeSlow(SCRATCH_BYTES),
  length: 0,
  /** A setImmediate flush is pending. */
  scheduled: false,
  /** An input chunk is being dispatched: it flushes when done, no setImmediate needed. */
  holding: false,
  /**
   * Set only while a binary frame is being queued: what goes out before `buffer[partStart..]`,
   * in order (pieces of `buffer` and binary values written from where they are).
   */
  parts: [],
  partStart: 0,
  /** Bytes of binary values written from where they are, ever (see produce). */
  directBytes: 0,
};

/**
 * Queues one JSON frame; returns null, or the body's size in bytes if it is over the frame or
 * payload limit (state.maxJsonBytes), and then nothing is queued.
 */
function queueFrame(json) {
  const at = output.length + HEADER_BYTES;
  let length;
  if (json.length * 3 <= output.buffer.length - at) {
    length = output.buffer.write(json, at); // a UTF-16 unit is at most 3 UTF-8 bytes
  } else {
    length = Buffer.byteLength(json);
    if (length > state.maxJsonBytes) return length;
    reserve(HEADER_BYTES + length);
    output.buffer.write(json, at);
  }
  if (length > state.maxJsonBytes) return length;
  output.buffer.writeUInt32BE(length, output.length);
  output.length = at + length;
  scheduleFlush();
  return null;
}

function scheduleFlush() {
  if (!output.holding && !output.scheduled) {
    output.scheduled = true;
    setImmediate(flushScheduled);
  }
}

/** Binary values smaller than this are copied behind their envelope, and leave with it. */
const COPY_BELOW = 16 * 1024;

/**
 * Queues one binary frame: 0x00, the envelope's length, the envelope (`envelope`, whose
 * `$binary` lists `views` in order), then the bytes of `views`. Small values are copied into
 * the output buffer like any frame; a larger one is not copied at all: the frame, and every
 * frame queued before it, is written at once with one writev, the value from where it is, so
 * it leaves before the handler can change it. Returns null, or the frame's size if it is over
 * the frame limit (and nothing is queued).
 */
function queueBinaryFrame(envelope, views) {
  let attached = 0;
  for (const view of views) attached += view.length;
  const start = output.length;
  const at = start + HEADER_BYTES + BINARY_PREFIX;
  let length;
  if (envelope.length * 3 <= output.buffer.length - at) {
    length = output.buffer.write(envelope, at);
  } else {
    length = Buffer.byteLength(envelope);
    if (BINARY_PREFIX + length + attached > state.maxFrameBytes) {
      return BINARY_PREFIX + length + attached;
    }
    reserve(HEADER_BYTES + BINARY_PREFIX + length);
    output.buffer.write(envelope, at);
  }
  const size = BINARY_PREFIX + length + attached;
  if (size > state.maxFrameBytes) return size;
  const { buffer } = output;
  buffer.writeUInt32BE(size, start);
  buffer[start + HEADER_BYTES] = BINARY_MARK;
  buffer.writeUInt32BE(length, start + HEADER_BYTES + 1);
  output.length = at + length;
  let direct = false;
  for (const view of views) {
    if (view.length < COPY_BELOW) {
      reserve(view.length);
      output.length += view.copy(output.buffer, output.length);
    } else {
      output.parts.push(output.buffer.subarray(output.partStart, output.length), view);
      output.partStart = output.length;
      output.directBytes += view.length;
      direct = true;
    }
  }
  if (direct) flush();
  else scheduleFlush();
  return null;
}

/** Makes room for `bytes` more bytes behind what is queued. */
function reserve(bytes) {
  const needed = output.length + bytes;
  if (needed <= output.buffer.length) return;
  const grown = Buffer.allocUnsafeSlow(Math.max(needed, output.buffer.length * 2));
  output.buffer.copy(grown, 0, 0, output.length);
  output.buffer = grown;
}

function flushScheduled() {
  output.scheduled = false;
  flush();
}

/** Writes every queued frame with one write (more only if the pipe takes it in parts). */
function flush() {
  const { length, parts } = output;
  if (parts.length !== 0) {
    parts.push(output.buffer.subarray(output.partStart, length));
    output.parts = [];
    output.partStart = 0;
    writevAll(parts);
  } else if (length !== 0) {
    writeAll(output.buffer, length);
  } else {
    return;
  }
  output.length = 0;
  if (output.buffer.length > SHRINK_BYTES) output.buffer = Buffer.allocUnsafeSlow(SCRATCH_BYTES);
}

const pause = new Int32Array(new SharedArrayBuffer(4));

/**
 * Synchronous writes keep frames whole and in order without a write queue. The private
 * descriptor blocks; the fallback's fd 1 may have been left non-blocking by a parent, hence
 * EAGAIN.
 */
function writeAll(buffer, length) {
  for (let offset = 0; offset < length; ) {
    try {
      offset += fs.writeSync(channels.output, buffer, offset, length - offset);
    } catch (err) {
      writeFailed(err);
    }
  }
}

/** writeAll for a list of buffers, with writev: `parts` in order, none copied. */
function writevAll(parts) {
  let index = 0;
  let pending = parts;
  while (index < parts.length) {
    let written;
    try {
      written = fs.writevSync(channels.output, pending);
    } catch (err) {
      writeFailed(err);
      continue;
    }
    // Skip what went out; a part written in half goes again from where it stopped.
    while (index < parts.length && written >= parts[index].length) {
      written -= parts[index].length;
      index += 1;
    }
    if (index < parts.length) {
      pending = parts.slice(index);
      pending[0] = parts[index] = parts[index].subarray(written);
    }
  }
}

/** A write that failed: EAGAIN waits a little (the caller retries), EPIPE exits. */
function writeFailed(err) {
  if (err.code === "EAGAIN") {
    Atomics.wait(pause, 0, 0, 1); // a synchronous 1 ms back-off
  } else if (err.code === "EPIPE") {
    log("the pool closed the response pipe; exiting");
    process.exit(0);
  } else {
    throw err;
  }
}

// ---------------------------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------------------------

const NO_META = Object.freeze({});

/**
 * An expected failure: thrown by a handler, it is answered `success: false` with
 * "<command>: <message>" and nothing is logged. Any other error is answered the same way and
 * also logs its stack to stderr.
 */
class CommandError extends Error {}
CommandError.prototype.name = "CommandError";

/**
 * A callback call failed: the host's answer said so (`code` is its `code`, the message its
 * `error`: "callback_failed", "unknown_callback", "invalid_arguments", "bad_callback",
 * "too_many_callbacks", "timeout", "callback_deadlock", ...), or the library refused it before
 * sending anything: "cancelled" (the request was cancelled or has ended), "bad_callback" (a
 * name that is not a string, args that are not a JSON object or cannot be sent), "unsupported"
 * (the pool did not negotiate protocol 2). `callback` is the name called.
 */
class CallbackError extends Error {
  constructor(message, code, callback = null) {
    super(message);
    this.code = code;
    this.callback = callback;
  }
}
CallbackError.prototype.name = "CallbackError";

function noop() {}

/** A promise rejected with `err`, which nobody need wait for (see Context#call). */
function rejected(err) {
  const promise = Promise.reject(err);
  promise.catch(noop);
  return promise;
}

/** What a handler knows about its request; `signal` aborts when the pool cancels it. */
class Context {
  #controller = null;
  #cancelled = false;
  #ended = false;
  /** The `call` numbers of this request's callback calls still pending; null for none yet. */
  #calls = null;
  #receivedAt;

  constructor(requestId, meta, receivedAt) {
    const m = isPlainObject(meta) ? meta : NO_META;
    this.requestId = requestId;
    this.workerId = state.workerId;
    this.traceparent = typeof m.traceparent === "string" ? m.traceparent : null;
    this.tracestate = typeof m.tracestate === "string" ? m.tracestate : null;
    this.deadlineMs = typeof m.deadline_ms === "number" ? m.deadline_ms : null;
    this.#receivedAt = receivedAt;
  }

  /**
   * Seconds left of the caller's budget: `meta.deadline_ms` counted from when the request's
   * bytes arrived (also while it waited for a slot), on the monotonic clock of
   * performance.now(); negative once the deadline has passed; null without a deadline. The
   * library does not act on it: the pool sends `$cancel` when it expires.
   */
  get deadline() {
    if (this.deadlineMs === null) return null;
    return (this.#receivedAt + this.deadlineMs - performance.now()) / 1000;
  }

  /** Created on first use: most requests never look at it, and AbortControllers cost. */
  get signal() {
    if (this.#controller === null) {
      this.#controller = new AbortController();
      if (this.#cancelled) this.#controller.abort(cancelledError());
    }
    return this.#controller.signal;
  }

  /**
   * Calls the host's callback `name` (registered with `pool.register_callback`) with `args`, a
   * JSON object whose values may be binary (any Buffer, typed array or ArrayBuffer, as in a
   * result) or long strings (they take the text lane, or shared memory, as results do).
   * Resolves to the callback's result (binary values as Buffers), or rejects with a
   * CallbackError: the host's `code` and `error`, or "cancelled" at once when the request is
   * cancelled (also for a call made after that) or has ended. Calls may overlap, in one
   * handler and across requests. A call nobody waits for is not an unhandled rejection: once
   * the request is answered it is dropped, and its answer, if one comes, is ignored.
   */
  call(name, args = {}) {
    if (this.#cancelled) {
      return rejected(
        new CallbackError(
          `callback '${name}' cancelled: request ${this.requestId} was cancelled`,
          "cancelled",
          name,
        ),
      );
    }
    if (this.#ended) {
      return rejected(
        new CallbackError(
          `callback '${name}' cancelled: request ${this.requestId} has ended`,
          "cancelled",
          name,
        ),
      );
    }
    if (!state.callbacks) {
      return rejected(
        new CallbackError(
          `callback '${name}' unavailable: callbacks need protocol 2, which the pool did not ` +
            "ask for (no max_in_flight in its handshake)",
          "unsupported",
          name,
        ),
      );
    }
    if (typeof name !== "string") {
      const shown = inspect(name, { depth: 0, breakLength: Infinity }).slice(0, 100);
      return rejected(
        new CallbackError(`callback name must be a string, got ${shown}`, "bad_callback", null),
      );
    }
    if (!isJsonObject(args)) {
      return rejected(
        new CallbackError(`callback '${name}': args must be an object`, "bad_callback", name),
      );
    }
    const refusal = sendCall(this.requestId, state.nextCall, name, args);
    if (refusal !== null) {
      return rejected(new CallbackError(`callback '${name}': ${refusal}`, "bad_callback", name));
    }
    const number = state.nextCall;
    state.nextCall += 1;
    const owner = (this.#calls ??= new Set());
    owner.add(number);
    const promise = new Promise((resolve, reject) => {
      state.calls.set(number, { requestId: this.requestId, name, resolve, reject, owner });
    });
    promise.catch(noop);
    return promise;
  }

  static cancel(ctx) {
    if (ctx.#cancelled) return;
    ctx.#cancelled = true;
    if (ctx.#controller !== null) ctx.#controller.abort(cancelledError());
    const numbers = ctx.#calls;
    if (numbers === null) return;
    ctx.#calls = null;
    for (const number of numbers) {
      const pending = state.calls.get(number);
      state.calls.delete(number);
      const { name } = pending;
      const message = `callback '${name}' cancelled: request ${ctx.requestId} was cancelled`;
      pending.reject(new CallbackError(message, "cancelled", name));
    }
  }

  /** The request has been answered: its pending calls are dropped (never settled). */
  static end(ctx) {
    ctx.#ended = true;
    const numbers = ctx.#calls;
    if (numbers === null) return;
    ctx.#calls = null;
    for (const number of numbers) state.calls.delete(number);
  }

  static isCancelled(ctx) {
    return ctx.#cancelled;
  }
}

function cancelledError() {
  const err = new Error("cancelled");
  err.name = "AbortError";
  return err;
}

/** One request frame, `receivedAt` the performance.now() of the chunk that completed it. */
function receive(request, receivedAt) {
  const { id, command } = request;
  if (command === "$cancel") return cancel(id);
  if (command === "$credit") return credit(id, request.args);
  if (command === "$callback") return callback(id, request.args);
  state.requestsHandled += 1;
  const handler = state.handlers.get(command);
  if (handler === undefined) {
    return sendError(id, `unknown command '${command}' (supported: ${state.supported})`);
  }
  const args = request.args === undefined ? {} : request.args;
  if (!isPlainObject(args)) return sendError(id, `${command}: args must be a JSON object`);
  const window = streamWindow(request.meta);
  if (window === INVALID_WINDOW) {
    return sendError(id, `${command}: meta.stream.window must be an integer >= 1`);
  }
  const job = { id, command, handler, args, meta: request.meta, receivedAt, window };
  // The health check answers at once even when every slot is taken (it is sync and cheap).
  if (state.active < state.limit || handler === ping) return start(job);
  // Ids are unique per worker (PROTOCOL.md), so they key the queue, as `$cancel` finds them.
  state.queued.set(id, job);
}

const INVALID_WINDOW = -1;

/** `meta.stream.window` of a stream request; null for an ordinary request. */
function streamWindow(meta) {
  const stream = isPlainObject(meta) ? meta.stream : undefined;
  if (stream === undefined || stream === null) return null;
  const window = isPlainObject(stream) ? stream.window : undefined;
  return Number.isSafeInteger(window) && window >= 1 ? window : INVALID_WINDOW;
}

/**
 * Runs a request's handler. What it returns decides how it is answered: a generator (of an
 * `async function*` or `function*`, or of a function that returns one) is driven by produce;
 * a promise is awaited (track); anything else is the result.
 */
function start(job) {
  state.active += 1;
  const ctx = new Context(job.id, job.meta, job.receivedAt);
  let result;
  try {
    result = job.handler(job.args, ctx);
  } catch (err) {
    Context.end(ctx);
    fail(job.id, job.command, err);
    return finish();
  }
  if (isGenerator(result)) {
    drive(job, ctx, result);
  } else if (result !== null && typeof result === "object" && typeof result.then === "function") {
    track(job, ctx, result);
  } else {
    Context.end(ctx);
    answer(job, result);
    finish();
  }
}

/**
 * Answers an async request when its promise settles. A rejection after `$cancel` aborted the
 * request's signal is answered "cancelled"; a promise that resolves anyway is answered with
 * its result, as the handler did finish.
 */
function track(job, ctx, promise) {
  const { id, command } = job;
  state.running.set(id, ctx);
  const settled = () => {
    if (state.running.get(id) === ctx) state.running.delete(id);
    Context.end(ctx);
  };
  // Promise.resolve also tames a foreign thenable whose then() throws.
  Promise.resolve(promise).then(
    (result) => {
      settled();
      answer(job, result);
      finish();
    },
    (err) => {
      settled();
      if (Context.isCancelled(ctx)) sendError(id, "cancelled");
      else fail(id, command, err);
      finish();
    },
  );
}

/** A plain handler's result: the response, or, asked for a stream, its one item and the end. */
function answer(job, result) {
  if (job.window === null) return sendResult(job.id, job.command, result);
  const refusal = sendItem(job.id, result);
  if (refusal === null) sendResult(job.id, job.command, null);
  else sendError(job.id, `${job.command}: ${refusal}`);
}

/** A request was answered: its slot goes to the next one waiting. */
function finish() {
  state.active -= 1;
  if (state.queued.size !== 0) drain();
}

let draining = false;

/** Starts waiting requests, oldest first, while slots are free (a loop, never a recursion). */
function drain() {
  if (draining) return;
  draining = true;
  try {
    while (state.active < state.limit && state.queued.size !== 0) {
      const [id, job] = state.queued.entries().next().value;
      state.queued.delete(id);
      start(job);
    }
  } finally {
    draining = false;
  }
}

/**
 * `$cancel`: a request still waiting for a slot is dropped and answered "cancelled" at once; a
 * running one has its signal aborted and is answered when its handler settles (see track), or,
 * for a generator, once it is closed (see produce). A sync handler has returned before a
 * `$cancel` can be read. Anything else is ignored.
 */
function cancel(id) {
  if (state.queued.delete(id)) return sendError(id, "cancelled");
  const ctx = state.running.get(id);
  if (ctx === undefined) return;
  Context.cancel(ctx);
  const stream = state.streams.get(id);
  if (stream !== undefined) stream.wake(); // it may be waiting for credit
}

/** `$credit`: the pool has taken `args.items` more items of a stream. No answer. */
function credit(id, args) {
  const items = isPlainObject(args) ? args.items : undefined;
  if (!Number.isSafeInteger(items) || items < 1) {
    const shown = JSON.stringify(items);
    return log(`ignoring $credit for request ${id}: items=${shown} is not an integer >= 1`);
  }
  const stream = state.streams.get(id);
  if (stream === undefined) return; // it has ended (or never was a stream): nothing to credit
  stream.credit += items;
  stream.wake();
}

/**
 * `$callback`: the host's answer to the callback call `args.call` of request `id`. It settles
 * that call: `success: true` resolves it to `args.result`, anything else rejects it with a
 * CallbackError of `args.code` and `args.error`. No answer. A call that is not pending (its
 * request was cancelled or has ended, or it never was) is ignored, as is one of another
 * request.
 */
function callback(id, args) {
  const number = isPlainObject(args) ? args.call : undefined;
  if (!Number.isSafeInteger(number)) {
    const shown = JSON.stringify(number);
    return log(`ignoring $callback for request ${id}: call=${shown} is not an integer`);
  }
  const pending = state.calls.get(number);
  if (pending === undefined || pending.requestId !== id) return;
  state.calls.delete(number);
  pending.owner.delete(number);
  if (args.success === true) return pending.resolve(args.result === undefined ? null : args.result);
  const code = typeof args.code === "string" ? args.code : "callback_failed";
  const message = typeof args.error === "string" ? args.error : `callback '${pending.name}' failed`;
  pending.reject(new CallbackError(message, code, pending.name));
}

// ---------------------------------------------------------------------------------------------
// Streams
// ---------------------------------------------------------------------------------------------

/** Items a generator may produce in a row before the driver lets the event loop turn. */
const ITEMS_PER_TURN = 1024;

/** Generator objects, async or not: what generator functions return. */
function isGenerator(value) {
  const tag = Object.prototype.toString.call(value);
  return tag === "[object AsyncGenerator]" || tag === "[object Generator]";
}

/**
 * One generator being driven. Streamed (`window` not null), it starts with `window` credit
 * and its items go out as frames; otherwise (`execute`) its credit is endless and its items are
 * collected into the result.
 */
class Stream {
  #resume = null;

  constructor(job, generator) {
    this.job = job;
    this.generator = generator;
    this.async = Object.prototype.toString.call(generator) === "[object AsyncGenerator]";
    this.credit = job.window === null ? Infinity : job.window;
    this.items = job.window === null ? [] : null;
  }

  /** Resolves once credit arrives or the request is cancelled (whoever calls wake). */
  waitForCredit() {
    return new Promise((resolve) => {
      this.#resume = resolve;
    });
  }

  wake() {
    const resume = this.#resume;
    this.#resume = null;
    if (resume !== null) resume();
  }
}

/**
 * Drives a handler's generator to its answer, holding the request's slot until then. As in
 * track, a generator that throws after `$cancel` is answered "cancelled".
 */
function drive(job, ctx, generator) {
  const { id, command } = job;
  const stream = new Stream(job, generator);
  state.running.set(id, ctx);
  if (job.window !== null) state.streams.set(id, stream);
  const settled = () => {
    if (state.running.get(id) === ctx) state.running.delete(id);
    if (state.streams.get(id) === stream) state.streams.delete(id);
    Context.end(ctx);
  };
  produce(stream, ctx).then(
    (value) => {
      settled();
      end(stream, value);
      finish();
    },
    (err) => {
      settled();
      if (Context.isCancelled(ctx)) sendError(id, "cancelled");
      else fail(id, command, err);
      finish();
    },
  );
}

/**
 * Takes the generator's items while it has credit, never asking for one more without (so the
 * producer is at most `window` items ahead of the consumer), and resolves to its return value.
 * A cancel is seen between items: the generator is closed (its `finally` blocks run) and only
 * then is the request answered; an item it made after the cancel is dropped. Every
 * ITEMS_PER_TURN items, or once a buffer's worth of frames waits, the event loop gets a turn:
 * the frames leave in one write, and `$credit`, `$cancel` and other requests are read even
 * while a generator never waits. No timer per item.
 */
async function produce(stream, ctx) {
  const { generator } = stream;
  let directMark = output.directBytes;
  for (let inTurn = 1; ; inTurn += 1) {
    while (stream.credit === 0 && !Context.isCancelled(ctx)) await stream.waitForCredit();
    if (Context.isCancelled(ctx)) break;
    const step = stream.async ? await generator.next() : generator.next();
    if (Context.isCancelled(ctx)) break;
    if (step.done) return step.value;
    const refusal = take(stream, step.value);
    if (refusal !== null) {
      await generator.return(undefined);
      throw new CommandError(refusal);
    }
    if (
      inTurn >= ITEMS_PER_TURN ||
      output.length >= SCRATCH_BYTES ||
      output.directBytes - directMark >= SCRATCH_BYTES
    ) {
      await nextTurn();
      inTurn = 0;
      directMark = output.directBytes;
    }
  }
  await generator.return(undefined);
  throw cancelledError();
}

/** Sends the item or collects it; the reason if it cannot be sent, else null. */
function take(stream, item) {
  stream.credit -= 1;
  if (stream.items === null) return sendItem(stream.job.id, item);
  stream.items.push(item);
  return null;
}

/** The answer of a generator that returned `value`: one last item unless undefined or null. */
function end(stream, value) {
  const { id, command } = stream.job;
  if (stream.items === null) return sendResult(id, command, value);
  if (value !== undefined && value !== null) stream.items.push(value);
  sendResult(id, command, stream.items);
}

/**
 * Queues the call frame of callback call `number` of request `id`: `args` with its binary
 * values and long strings detached, as a result's; the reason it cannot be sent, or null.
 */
function sendCall(id, number, name, args) {
  let json;
  try {
    json = JSON.stringify(detachBinary(args, "args"));
  } catch (err) {
    forgetDetached();
    return `args are not JSON-serializable: ${describe(err)}`;
  }
  if (json === undefined || json[0] !== "{") {
    forgetDetached();
    return "args must serialize to a JSON object";
  }
  const head = `{"id":${id},"call":${number},"name":${JSON.stringify(name)},"args":${json}`;
  if (walk.views === null) return tooBig("call", queueFrame(head + "}"));
  return queueDetached(head, "call");
}

/** Queues an item frame; the reason it cannot be sent, or null. */
function sendItem(id, item) {
  let json;
  try {
    json = JSON.stringify(state.binary ? detachBinary(item, "item") : item);
  } catch (err) {
    forgetDetached();
    return `item is not JSON-serializable: ${describe(err)}`;
  }
  // As for a result, undefined (no JSON form) goes as null.
  const head = `{"id":${id},"item":${json === undefined ? "null" : json}`;
  if (walk.views === null) return tooBig("item", queueFrame(head + "}"));
  return queueDetached(head, "item");
}

function sendResult(id, command, result) {
  let json;
  try {
    json = JSON.stringify(state.binary ? detachBinary(result, "result") : result);
  } catch (err) {
    forgetDetached();
    return sendError(id, `${command}: result is not JSON-serializable: ${describe(err)}`);
  }
  // undefined (and functions) have no JSON form: a handler that returns nothing returns null.
  const head = `{"id":${id},"success":true,"result":${json === undefined ? "null" : json}`;
  const refusal =
    walk.views === null
      ? tooBig("response", queueFrame(head + "}"))
      : queueDetached(head, "response");
  if (refusal !== null) sendError(id, `${command}: ${refusal}`);
}

/**
 * Why a `what` ("response" or "item") of `size` bytes (null: it fitted) was refused: the
 * payload limit when it is over that, else the frame limit; null for none.
 */
function tooBig(what, size) {
  if (size === null) return null;
  if (size > state.maxPayloadBytes) {
    return `${what} of ${size} bytes exceeds the payload limit of ${state.maxPayloadBytes} bytes`;
  }
  return `${what} of ${size} bytes exceeds the frame limit of ${state.maxFrameBytes} bytes`;
}

/** Answer `id` with `message`; one too long for a frame is cut (a request is always answered). */
function sendError(id, message) {
  const frame = (text) => `{"id":${id},"success":false,"error":${JSON.stringify(text)}}`;
  if (queueFrame(frame(message)) === null) return;
  // Each UTF-16 unit takes at most 6 bytes once escaped (\uXXXX): this much always fits.
  const keep = Math.max(0, Math.floor((state.maxJsonBytes - 200) / 6));
  queueFrame(frame(`${message.slice(0, keep)}... [${message.length - keep} more characters]`));
}

/** A handler threw or rejected: log the stack unless it is a CommandError, then answer. */
function fail(id, command, err) {
  if (!(err instanceof CommandError)) {
    log(`command '${command}' (request ${id}) failed: ${stackOf(err)}`);
  }
  sendError(id, `${command}: ${describe(err)}`);
}

function describe(err) {
  try {
    if (err instanceof Error) return String(err.message || err.name);
    return String(err);
  } catch {
    return "an error that cannot be shown as text";
  }
}

/** The stack with cause and extra properties, as Node prints an uncaught error. */
function stackOf(err) {
  try {
    const shown = inspect(err, { depth: 3 });
    return err instanceof Error ? shown : `${shown} (thrown, not an Error: no stack)`;
  } catch {
    return describe(err);
  }
}

function isPlainObject(value) {
  return value !== null && typeof value === "object" && !Array.isArray(value);
}

/**
 * The handshake and health check; records the worker id the pool gives. A `max_in_flight` of
 * N (an integer >= 1) sets how many requests run at once to min(N, MAX_CONCURRENCY), from the
 * next request on, and gets the protocol-2 answer; without it the answer is protocol 1's and
 * the setting stays (1 unless an earlier ping changed it).
 */
function ping(args) {
  if (typeof args.worker_id === "string") state.workerId = args.worker_id;
  const v2 = args.max_in_flight !== undefined && setMaxInFlight(args.max_in_flight);
  const v2Capabilities = state.shm === null ? CAPABILITIES_V2 : CAPABILITIES_V2_SHM;
  const answer = {
    status: "ok",
    uptime: process.uptime(),
    requests_handled: state.requestsHandled,
    worker_id: state.workerId,
    runtime: RUNTIME,
    capabilities: v2 ? v2Capabilities : CAPABILITIES_V1,
    pid: process.pid,
  };
  if (v2) {
    state.binary = true;
    state.callbacks = true;
    answer.protocol = PROTOCOL;
    answer.max_concurrency = MAX_CONCURRENCY;
  }
  return answer;
}

function setMaxInFlight(value) {
  if (!Number.isSafeInteger(value) || value < 1) {
    log(`ignoring max_in_flight=${JSON.stringify(value)}: not an integer >= 1 (protocol 1)`);
    return false;
  }
  state.limit = Math.min(value, MAX_CONCURRENCY);
  return true;
}

// ---------------------------------------------------------------------------------------------
// Binary values going out
// ---------------------------------------------------------------------------------------------

/**
 * The walk of detachBinary: the key or index taken at each depth (`keys[0]` is the envelope's
 * member), the containers at each depth from CHECK_FROM on, and what it found: each value's
 * path, its bytes (a Buffer over a binary value's memory, no copy, or a string's UTF-8) and
 * whether it is text, or null for none. `textFrom` is the String length from which strings go
 * as text attachments: SNAKEPIT_TEXT_THRESHOLD, or Infinity without it.
 */
const walk = { keys: [], around: [], paths: null, views: null, texts: null, textFrom: Infinity };
/**
 * Below this depth the walk does not look for cycles (JSON.stringify refuses them anyway):
 * a cycle goes on forever, so it is found further down, at the cost of walking the part of
 * the value before it that many times at most.
 */
const CHECK_FROM = 64;
/** Thrown through the walk when it meets a cycle: JSON.stringify then says what is wrong. */
const CYCLE = Symbol("cycle");

/** A string UTF-8 can carry: one without a lone surrogate (those stay in the JSON). */
const isWellFormed =
  typeof String.prototype.isWellFormed === "function"
    ? (string) => string.isWellFormed()
    : (string) => !LONE_SURROGATE.test(string);
const LONE_SURROGATE = /[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/;

/**
 * `value` with null in the place of each binary value (any Buffer, typed array, DataView,
 * ArrayBuffer or SharedArrayBuffer, however deep) and of each string of at least
 * `walk.textFrom` UTF-16 units, those values and their paths, from `root` ("result" or
 * "item"), left in `walk` (`views` null when there are none: then `value` itself is returned).
 * Only the arrays and objects on the way to such a value are copied, shallowly; the handler's
 * own are left as they were. The walk goes where JSON.stringify goes (array elements, own
 * enumerable string keys), and an object with a `toJSON` method is left to it. It costs a
 * fifth or so of JSON.stringify's time, and only at protocol 2.
 */
function detachBinary(value, root) {
  walk.paths = walk.views = walk.texts = null;
  if (typeof value !== "object" || value === null) {
    if (typeof value !== "string" || value.length < walk.textFrom || !isWellFormed(value)) {
      return value;
    }
    walk.keys[0] = root;
    return text(value, 1);
  }
  walk.keys[0] = root;
  let detached;
  try {
    detached = detach(value, 1);
  } catch (err) {
    if (err !== CYCLE) throw err;
    detached = value;
    forgetDetached();
  }
  walk.around.length = 0;
  if (walk.views !== null && walk.views.length === 0) forgetDetached();
  return detached;
}

function forgetDetached() {
  walk.paths = walk.views = walk.texts = null;
}

/**
 * Queues `head`, an envelope without its closing brace, as a binary frame of the values
 * detachBinary found (and forgets them). Values of at least SNAKEPIT_SHM_THRESHOLD bytes go in
 * new shared-memory segments when the pool offers them (inline, should a segment fail). Returns
 * null, or why the `what` ("response" or "item") was refused: over the payload limit (checked
 * first, before any segment is made) or the frame limit (its segments are deleted).
 */
function queueDetached(head, what) {
  const { paths, views, texts } = walk;
  forgetDetached();
  const { shm } = state;
  const shmFrom = shm === null ? Infinity : shm.threshold;
  const listed = new Array(views.length);
  let values = 0;
  let shared = 0;
  for (let i = 0; i < views.length; i += 1) {
    const size = views[i].length;
    values += size;
    const entry = texts[i] ? { path: paths[i], size, text: true } : { path: paths[i], size };
    if (size >= shmFrom) {
      entry.shm = shm.prefix + shm.next++;
      shared += 1;
    }
    listed[i] = entry;
  }
  let envelope = `${head},"${BINARY_KEY}":${JSON.stringify(listed)}}`;
  // The payload is the frame's body as it would be with every value inline.
  const limit = state.maxPayloadBytes;
  if (BINARY_PREFIX + envelope.length * 3 + values > limit) {
    const payload = BINARY_PREFIX + Buffer.byteLength(envelope) + values;
    if (payload > limit) {
      return `${what} of ${payload} bytes exceeds the payload limit of ${limit} bytes`;
    }
  }
  let inline = views;
  const made = [];
  if (shared !== 0) {
    inline = [];
    let fellBack = false;
    for (let i = 0; i < views.length; i += 1) {
      const entry = listed[i];
      if (entry.shm === undefined) {
        inline.push(views[i]);
      } else if (writeSegment(entry.shm, views[i])) {
        made.push(entry.shm);
      } else {
        delete entry.shm;
        inline.push(views[i]);
        fellBack = true;
      }
    }
    if (fellBack) envelope = `${head},"${BINARY_KEY}":${JSON.stringify(listed)}}`;
  }
  const size = queueBinaryFrame(envelope, inline);
  if (size === null) return null;
  for (const name of made) removeSegment(name);
  return `${what} of ${size} bytes exceeds the frame limit of ${state.maxFrameBytes} bytes`;
}

/** `value` (an object, at `depth`) detached; see detachBinary. */
function detach(value, depth) {
  if (depth >= CHECK_FROM) {
    const { around } = walk;
    for (let d = CHECK_FROM; d < depth; d += 1) if (around[d] === value) throw CYCLE;
    around[depth] = value;
  }
  const { keys, textFrom } = walk;
  const found = walk.views === null ? 0 : walk.views.length;
  let copy = null;
  if (Array.isArray(value)) {
    for (let i = 0; i < value.length; i += 1) {
      const child = value[i];
      let out;
      if (typeof child === "object" && child !== null) {
        keys[depth] = i;
        out = detach(child, depth + 1);
        if (out === child) continue;
      } else if (typeof child === "string" && child.length >= textFrom && isWellFormed(child)) {
        keys[depth] = i;
        out = text(child, depth + 1);
      } else {
        continue;
      }
      if (copy === null) copy = value.slice();
      copy[i] = out;
    }
  } else if (ArrayBuffer.isView(value)) {
    if (Buffer.isBuffer(value)) return record(value, depth, false);
    return record(Buffer.from(value.buffer, value.byteOffset, value.byteLength), depth, false);
  } else if (value instanceof ArrayBuffer || value instanceof SharedArrayBuffer) {
    return record(Buffer.from(value), depth, false);
  } else if (textFrom !== Infinity && value instanceof String) {
    // JSON.stringify writes a String object as its string (for-in would walk its characters).
    const string = String(value);
    return string.length >= textFrom && isWellFormed(string) ? text(string, depth) : value;
  } else {
    // for-in (own keys first, in Object.keys order) allocates no key array.
    for (const key in value) {
      const child = value[key];
      let out;
      if (typeof child === "object" && child !== null) {
        if (!Object.hasOwn(value, key)) continue;
        keys[depth] = key;
        out = detach(child, depth + 1);
        if (out === child) continue;
      } else if (
        typeof child === "string" &&
        child.length >= textFrom &&
        Object.hasOwn(value, key) &&
        isWellFormed(child)
      ) {
        keys[depth] = key;
        out = text(child, depth + 1);
      } else {
        continue;
      }
      if (copy === null) copy = { ...value };
      copy[key] = out;
    }
  }
  if (copy === null) return value;
  // JSON.stringify would not serialize what was walked, but what toJSON returns.
  if (typeof value.toJSON === "function") {
    walk.paths.length = walk.views.length = walk.texts.length = found;
    return value;
  }
  return copy;
}

/** Records a string at `depth` as a text attachment: its UTF-8 bytes; null takes its place. */
function text(string, depth) {
  return record(Buffer.from(string, "utf8"), depth, true);
}

/** Records a value's bytes at `depth` (`isText`: a string's); null takes its place. */
function record(bytes, depth, isText) {
  (walk.paths ??= []).push(walk.keys.slice(0, depth));
  (walk.views ??= []).push(bytes);
  (walk.texts ??= []).push(isText);
  return null;
}

// ---------------------------------------------------------------------------------------------
// Shared-memory segments going out
// ---------------------------------------------------------------------------------------------

/**
 * Writes `bytes` to the new response segment `name`: created with O_CREAT|O_EXCL|O_NOFOLLOW
 * and mode 0600 (libuv adds O_CLOEXEC), written fully with write() (never mmap: a full tmpfs
 * would SIGBUS a mapping; Node cannot posix_fallocate, so a full one shows as ENOSPC from
 * write), then closed. True once it is complete, and the pool owns it from the frame naming
 * it on; false if anything failed: then what was made is deleted and the caller sends the
 * value inline.
 */
function writeSegment(name, bytes) {
  const file = `${state.shm.dir}/${name}`;
  let fd;
  try {
    fd = fs.openSync(file, O_CREAT | O_EXCL | O_NOFOLLOW | O_WRONLY, 0o600);
  } catch (err) {
    segmentFailed(name, bytes.length, err); // not ours (EEXIST) or never made: nothing to delete
    return false;
  }
  try {
    for (let written = 0; written < bytes.length; ) {
      const count = fs.writeSync(fd, bytes, written, bytes.length - written);
      if (count <= 0) throw new Error(`write() wrote nothing after ${written} bytes`);
      written += count;
    }
  } catch (err) {
    try {
      fs.closeSync(fd);
    } catch {
      // The write already failed; the file goes anyway.
    }
    removeSegment(name);
    segmentFailed(name, bytes.length, err);
    return false;
  }
  try {
    fs.closeSync(fd);
  } catch (err) {
    removeSegment(name);
    segmentFailed(name, bytes.length, err);
    return false;
  }
  return true;
}

/** Deletes a segment this worker made and still owns (the pool never heard of it). */
function removeSegment(name) {
  try {
    fs.unlinkSync(`${state.shm.dir}/${name}`);
  } catch (err) {
    log(`cannot delete shared-memory segment '${name}': ${describe(err)}`);
  }
}

/** Error codes of failed segments already logged: a full /dev/shm is said once, not per value. */
const segmentFailures = new Set();

function segmentFailed(name, size, err) {
  const code = err.code || describe(err);
  if (segmentFailures.has(code)) return;
  segmentFailures.add(code);
  log(
    `cannot write shared-memory segment '${name}' of ${size} bytes (${describe(err)}): ` +
      "sending the value inline (further failures like this one are not logged)",
  );
}

// ---------------------------------------------------------------------------------------------
// Running
// ---------------------------------------------------------------------------------------------

/**
 * Serves the commands of `handlerMaps` until stdin closes: `run({ name: (args, ctx) => result
 * or Promise }, ...)`. Several maps may be given (say, shared commands and a worker's own);
 * see registerHandlers for what each may hold. A bad map or setting (SNAKEPIT_MAX_FRAME_BYTES,
 * SNAKEPIT_MAX_PAYLOAD_BYTES, SNAKEPIT_TEXT_THRESHOLD, SNAKEPIT_SHM_*) exits with status 2 and
 * a message on stderr, before any frame is read.
 */
function run(...handlerMaps) {
  if (state.started) throw new Error("snakepit: run() may be called only once");
  state.started = true;
  registerHandlers(handlerMaps);
  configure();
  const frames = new FrameReader(state.maxFrameBytes);
  const input = openInput(channels.input);
  input.on("data", (chunk) => {
    const receivedAt = performance.now();
    frames.push(chunk);
    output.holding = true;
    try {
      for (let body = frames.next(); body !== null; body = frames.next()) {
        receive(parseRequest(body), receivedAt);
      }
    } catch (err) {
      if (!(err instanceof FrameError)) throw err;
      log(`protocol error: ${err.message}; exiting`);
      exit(EXIT_PROTOCOL_ERROR);
    } finally {
      output.holding = false;
    }
    flush();
  });
  input.on("end", () => exit(0));
  process.on("SIGTERM", () => exit(0));
}

/** Exits once the responses already made are written; requests still running are dropped. */
function exit(code) {
  flush();
  process.exit(code);
}

/**
 * Builds the command table from run()'s maps, or exits with status 2 naming the command.
 *
 * A map's own enumerable string keys are command names, its values the handlers. A name is a
 * duplicate when more than one of the maps registers it or when it is a command the library
 * provides itself (`ping`); names are compared exactly, case included, as on the wire. (A key
 * written twice in one object literal cannot be seen: JavaScript keeps the last.) Names
 * starting with `$` are reserved for the protocol's own frames (`$cancel`).
 */
function registerHandlers(maps) {
  const table = new Map([["ping", ping]]);
  if (maps.length === 0) startupError("run(handlers) takes an object of functions");
  for (const handlers of maps) {
    if (!isPlainObject(handlers)) startupError("run(handlers) takes an object of functions");
    for (const [name, handler] of Object.entries(handlers)) {
      if (name.startsWith("$")) {
        startupError(`command '${name}' starts with '$', which is reserved for the protocol`);
      }
      if (table.get(name) === ping) {
        startupError(`command '${name}' is registered twice: the library provides it`);
      }
      if (table.has(name)) startupError(`command '${name}' is registered twice`);
      if (typeof handler !== "function") startupError(`handler '${name}' is not a function`);
      table.set(name, handler);
    }
  }
  state.handlers = table;
  state.commands = [...table.keys()].sort();
  state.supported = state.commands.join(", ");
}

/** A pipe or socket is read through libuv's event loop; anything else (a file) by fs reads. */
function openInput(fd) {
  const stat = fs.fstatSync(fd);
  if (stat.isFIFO() || stat.isSocket()) {
    const net = require("net");
    return new net.Socket({ fd, readable: true, writable: false });
  }
  return fs.createReadStream(null, { fd });
}

/**
 * Reads the pool's settings from the environment, or exits with status 2 naming a bad one:
 * the frame and payload limits, the text threshold and shared memory (PROTOCOL.md, *Binary
 * values*).
 */
function configure() {
  state.maxFrameBytes = integerFromEnv("SNAKEPIT_MAX_FRAME_BYTES", 1) ?? DEFAULT_MAX_FRAME_BYTES;
  state.maxPayloadBytes =
    integerFromEnv("SNAKEPIT_MAX_PAYLOAD_BYTES", 1) ?? DEFAULT_MAX_PAYLOAD_BYTES;
  state.maxJsonBytes = Math.min(state.maxFrameBytes, state.maxPayloadBytes);
  walk.textFrom = integerFromEnv("SNAKEPIT_TEXT_THRESHOLD", 0) ?? Infinity;
  const dir = process.env.SNAKEPIT_SHM_DIR;
  if (dir === undefined || dir === "") return;
  const prefix = process.env.SNAKEPIT_SHM_PREFIX;
  if (prefix === undefined || prefix === "" || prefix.includes("/") || prefix.includes("\0")) {
    startupError(
      "SNAKEPIT_SHM_PREFIX must be a non-empty file name prefix (no '/') with SNAKEPIT_SHM_DIR, " +
        `got ${JSON.stringify(prefix ?? null)}`,
    );
  }
  const threshold = integerFromEnv("SNAKEPIT_SHM_THRESHOLD", 0);
  if (threshold === undefined) {
    startupError("SNAKEPIT_SHM_THRESHOLD must be set with SNAKEPIT_SHM_DIR");
  }
  state.shm = { dir, prefix, threshold, next: 0 };
}

/** The integer >= `min` in the environment variable `name`; undefined if unset or empty. */
function integerFromEnv(name, min) {
  const raw = process.env[name];
  if (raw === undefined || raw === "") return undefined;
  const value = /^\s*[0-9]+\s*$/.test(raw) ? Number(raw) : NaN;
  if (Number.isSafeInteger(value) && value >= min) return value;
  const what = min === 1 ? "a positive integer" : `an integer >= ${min}`;
  startupError(`${name} must be ${what}, got ${JSON.stringify(raw)}`);
}

/** A worker script or its environment is wrong: say why and exit 2, before reading a frame. */
function startupError(message) {
  try {
    fs.writeSync(2, `snakepit: ${message}\n`);
  } catch {
    // stderr is gone too; the exit status still tells.
  }
  process.exit(EXIT_STARTUP_ERROR);
}

function log(message) {
  try {
    fs.writeSync(2, `snakepit-node: ${message}\n`);
  } catch {
    // stderr is gone too; there is nobody left to tell.
  }
}

/** The worker's bookkeeping, for commands such as `info`. */
function status() {
  return {
    workerId: state.workerId,
    uptime: process.uptime(),
    requestsHandled: state.requestsHandled,
    commands: [...state.commands],
  };
}

module.exports = { run, status, CommandError, CallbackError, version: VERSION };
