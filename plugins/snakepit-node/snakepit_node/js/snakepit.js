"use strict";
/**
 * snakepit bridge library for Node.js: write handlers, get a snakepit worker.
 *
 *     const { run } = require("snakepit");
 *     run({
 *       shout: async (args, ctx) => ({ text: args.text.toUpperCase() }),
 *       add: (args) => args.a + args.b,
 *     });
 *
 * The library implements docs/PROTOCOL.md on the process's stdin/stdout: length-prefixed JSON
 * frames, the `ping` handshake, `$cancel` (handlers get `ctx.signal`), error mapping (a thrown
 * error becomes `success: false` with "<command>: <message>") and stdout protection. Handlers
 * get `(args, ctx)`; `ctx` has requestId, workerId, traceparent, tracestate, deadlineMs, signal.
 * Node's standard library only.
 */

const fs = require("fs");

const VERSION = "0.2.0";
const RUNTIME = "node";
const CAPABILITIES = Object.freeze(["cancel"]);
const DEFAULT_MAX_FRAME_BYTES = 64 * 1024 * 1024;
const EXIT_PROTOCOL_ERROR = 3;
const HEADER_BYTES = 4;
const FD_DIRS = ["/proc/self/fd/", "/dev/fd/"];
const { O_RDONLY, O_WRONLY, O_APPEND } = fs.constants;

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
  /** Async requests still running, by id: what `$cancel` can reach. */
  running: new Map(),
  maxFrameBytes: DEFAULT_MAX_FRAME_BYTES,
  /** Reused for every response that fits, so the hot path allocates no output buffer. */
  scratch: Buffer.allocUnsafeSlow(64 * 1024),
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

/**
 * Splits the input byte stream into frame bodies. Chunks wait in a list, with an offset into
 * the first, so a frame is copied only when it spans chunks and never re-concatenated.
 */
class FrameReader {
  constructor(maxBytes) {
    this.maxBytes = maxBytes;
    this.chunks = [];
    this.offset = 0; // bytes of chunks[0] already consumed
    this.buffered = 0;
    this.bodyLength = -1;
  }

  push(chunk) {
    this.chunks.push(chunk);
    this.buffered += chunk.length;
  }

  /** The next complete frame body, or null until more bytes arrive. */
  next() {
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
    if (this.buffered < this.bodyLength) return null;
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
    for (let filled = 0; filled < n; ) {
      const chunk = this.chunks[0];
      const count = Math.min(chunk.length - this.offset, n - filled);
      chunk.copy(out, filled, this.offset, this.offset + count);
      filled += count;
      this.consume(count);
    }
    return out;
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

function decodeUtf8(bytes) {
  try {
    return utf8.decode(bytes);
  } catch {
    throw new FrameError("frame is not valid UTF-8");
  }
}

function parseRequest(body) {
  let request;
  try {
    request = JSON.parse(decodeUtf8(body));
  } catch (err) {
    if (err instanceof FrameError) throw err;
    throw new FrameError(`frame is not valid JSON: ${err.message}`);
  }
  if (!isPlainObject(request)) throw new FrameError("frame is not a JSON object");
  if (!Number.isSafeInteger(request.id) || request.id < 0) {
    throw new FrameError("request has no valid 'id' (a non-negative integer)");
  }
  return request;
}

/** Writes one frame with a single buffer for header and body; false if over the size limit. */
function writeFrame(json) {
  let frame = state.scratch;
  let length;
  if (json.length * 3 + HEADER_BYTES <= frame.length) {
    length = frame.write(json, HEADER_BYTES); // a UTF-16 unit is at most 3 UTF-8 bytes
  } else {
    length = Buffer.byteLength(json);
    if (length > state.maxFrameBytes) return false;
    frame = Buffer.allocUnsafe(HEADER_BYTES + length);
    frame.write(json, HEADER_BYTES);
  }
  if (length > state.maxFrameBytes) return false;
  frame.writeUInt32BE(length, 0);
  writeAll(frame, HEADER_BYTES + length);
  return true;
}

const pause = new Int32Array(new SharedArrayBuffer(4));

/**
 * Synchronous writes keep frames whole and in order without a queue. The private descriptor
 * blocks; the fallback's fd 1 may have been left non-blocking by a parent, hence EAGAIN.
 */
function writeAll(buffer, length) {
  for (let offset = 0; offset < length; ) {
    try {
      offset += fs.writeSync(channels.output, buffer, offset, length - offset);
    } catch (err) {
      if (err.code === "EAGAIN") {
        Atomics.wait(pause, 0, 0, 1); // a synchronous 1 ms back-off
      } else if (err.code === "EPIPE") {
        log("the pool closed the response pipe; exiting");
        process.exit(0);
      } else {
        throw err;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------------------------

const NO_META = Object.freeze({});

/** What a handler knows about its request; `signal` aborts when the pool cancels it. */
class Context {
  #controller = null;
  #cancelled = false;

  constructor(requestId, meta) {
    const m = isPlainObject(meta) ? meta : NO_META;
    this.requestId = requestId;
    this.workerId = state.workerId;
    this.traceparent = typeof m.traceparent === "string" ? m.traceparent : null;
    this.tracestate = typeof m.tracestate === "string" ? m.tracestate : null;
    this.deadlineMs = typeof m.deadline_ms === "number" ? m.deadline_ms : null;
  }

  /** Created on first use: most requests never look at it, and AbortControllers cost. */
  get signal() {
    if (this.#controller === null) {
      this.#controller = new AbortController();
      if (this.#cancelled) this.#controller.abort(cancelledError());
    }
    return this.#controller.signal;
  }

  static cancel(ctx) {
    ctx.#cancelled = true;
    if (ctx.#controller !== null) ctx.#controller.abort(cancelledError());
  }
}

function cancelledError() {
  const err = new Error("cancelled");
  err.name = "AbortError";
  return err;
}

function dispatch(request) {
  const { id, command } = request;
  if (command === "$cancel") return cancel(id);
  state.requestsHandled += 1;
  const handler = state.handlers.get(command);
  if (handler === undefined) {
    return sendError(id, `unknown command '${command}' (supported: ${state.supported})`);
  }
  const args = request.args === undefined ? {} : request.args;
  if (!isPlainObject(args)) return sendError(id, `${command}: args must be a JSON object`);
  const ctx = new Context(id, request.meta);
  let result;
  try {
    result = handler(args, ctx);
  } catch (err) {
    return sendError(id, `${command}: ${describe(err)}`);
  }
  if (result !== null && typeof result === "object" && typeof result.then === "function") {
    track(id, command, ctx, result);
  } else {
    sendResult(id, command, result);
  }
}

/** Answers an async request when it settles, unless `$cancel` answered it first. */
function track(id, command, ctx, promise) {
  state.running.set(id, ctx);
  const settle = () => {
    if (state.running.get(id) !== ctx) return false;
    state.running.delete(id);
    return true;
  };
  // Promise.resolve also tames a foreign thenable whose then() throws.
  Promise.resolve(promise).then(
    (result) => settle() && sendResult(id, command, result),
    (err) => settle() && sendError(id, `${command}: ${describe(err)}`),
  );
}

function cancel(id) {
  const ctx = state.running.get(id);
  if (ctx === undefined) return; // finished, never started or unknown: nothing to do
  state.running.delete(id);
  sendError(id, "cancelled");
  Context.cancel(ctx);
}

function sendResult(id, command, result) {
  let json;
  try {
    json = JSON.stringify(result);
  } catch (err) {
    return sendError(id, `${command}: result is not JSON-serializable: ${describe(err)}`);
  }
  // undefined (and functions) have no JSON form: a handler that returns nothing returns null.
  const frame = `{"id":${id},"success":true,"result":${json === undefined ? "null" : json}}`;
  if (!writeFrame(frame)) {
    sendError(id, `${command}: response exceeds the frame limit of ${state.maxFrameBytes} bytes`);
  }
}

function sendError(id, message) {
  writeFrame(`{"id":${id},"success":false,"error":${JSON.stringify(message)}}`);
}

function describe(err) {
  if (err instanceof Error) return err.message || err.name;
  return String(err);
}

function isPlainObject(value) {
  return value !== null && typeof value === "object" && !Array.isArray(value);
}

/** The handshake: records the worker id the pool gave us. */
function ping(args) {
  if (typeof args.worker_id === "string") state.workerId = args.worker_id;
  return {
    status: "ok",
    uptime: process.uptime(),
    requests_handled: state.requestsHandled,
    worker_id: state.workerId,
    runtime: RUNTIME,
    capabilities: CAPABILITIES,
    pid: process.pid,
  };
}

// ---------------------------------------------------------------------------------------------
// Running
// ---------------------------------------------------------------------------------------------

/** Serves `handlers` ({name: (args, ctx) => result or Promise}) until stdin closes. */
function run(handlers) {
  if (state.started) throw new Error("snakepit: run() may be called only once");
  registerHandlers(handlers);
  state.started = true;
  state.maxFrameBytes = frameLimit();
  const frames = new FrameReader(state.maxFrameBytes);
  const input = openInput(channels.input);
  input.on("data", (chunk) => {
    frames.push(chunk);
    try {
      for (let body = frames.next(); body !== null; body = frames.next()) {
        dispatch(parseRequest(body));
      }
    } catch (err) {
      if (!(err instanceof FrameError)) throw err;
      log(`protocol error: ${err.message}; exiting`);
      process.exit(EXIT_PROTOCOL_ERROR);
    }
  });
  input.on("end", () => process.exit(0));
  process.on("SIGTERM", () => process.exit(0));
}

function registerHandlers(handlers) {
  if (!isPlainObject(handlers)) {
    throw new TypeError("snakepit: run(handlers) takes an object of functions");
  }
  const table = new Map([["ping", ping]]);
  for (const [name, handler] of Object.entries(handlers)) {
    if (typeof handler !== "function") {
      throw new TypeError(`snakepit: handler '${name}' is not a function`);
    }
    if (table.has(name) || name.startsWith("$")) {
      throw new TypeError(`snakepit: '${name}' is provided by the library and cannot be replaced`);
    }
    table.set(name, handler);
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

function frameLimit() {
  const raw = process.env.SNAKEPIT_MAX_FRAME_BYTES;
  if (!raw) return DEFAULT_MAX_FRAME_BYTES;
  const limit = Number(raw);
  if (Number.isSafeInteger(limit) && limit > 0) return limit;
  log(`ignoring SNAKEPIT_MAX_FRAME_BYTES=${raw}: not a positive integer`);
  return DEFAULT_MAX_FRAME_BYTES;
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

module.exports = { run, status, version: VERSION };
