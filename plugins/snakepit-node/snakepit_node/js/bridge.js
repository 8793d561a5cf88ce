"use strict";
/**
 * The bundled snakepit Node.js bridge: the built-in commands of docs/PROTOCOL.md, written with
 * the bridge library like any custom worker. Each handler refuses bad input with a CommandError,
 * an expected failure whose message the library prefixes with the command name ("compute:
 * division by zero") and logs nothing for; any other error would also log its stack.
 */

// The library first: requiring it moves the protocol pipes aside before anything can write.
const { run, status, version, CommandError, CallbackError } = require("./snakepit");
const { randomBytes } = require("crypto");
const fs = require("fs");
const { setTimeout: delay } = require("timers/promises");

const MAX_SAFE = "integer beyond 2^53 cannot be represented exactly in JavaScript";

// ---------------------------------------------------------------------------------------------
// compute
// ---------------------------------------------------------------------------------------------

const OPERATIONS = {
  add: (a, b) => a + b,
  subtract: (a, b) => a - b,
  multiply: (a, b) => a * b,
  divide: (a, b) => {
    if (b === 0) throw new CommandError("division by zero");
    return a / b;
  },
  power: (a, b) => a ** b,
  sqrt: (a) => Math.sqrt(a),
};
const UNARY = new Set(["sqrt"]);

function compute(args) {
  const { operation, a, b } = args;
  const apply = lookup(OPERATIONS, operation, "operation");
  requireNumber("a", a);
  if (!UNARY.has(operation) || b !== undefined) requireNumber("b", b);
  const result = apply(a, b);
  // Non-finite first: 1e308 * 10 is an overflow, although 1e308 is also an unsafe integer.
  if (!Number.isFinite(result)) throw new CommandError("result is not a finite number");
  if ([a, b, result].some(isUnsafeInteger)) throw new CommandError(MAX_SAFE);
  return { operation, inputs: { a, b: b === undefined ? null : b }, result };
}

/** Every float64 of magnitude 2^53 or more is integral, so "integer" here means the value. */
function isUnsafeInteger(value) {
  return Number.isInteger(value) && !Number.isSafeInteger(value);
}

// ---------------------------------------------------------------------------------------------
// random
// ---------------------------------------------------------------------------------------------

const DISTRIBUTIONS = {
  uniform: (args) => {
    const { min, max } = bounds(args, 0, 1);
    const u = Math.random();
    return { value: clamp(min * (1 - u) + max * u, min, max), min, max };
  },
  integer: (args) => {
    const { min, max } = bounds(args, 0, 100);
    if (![min, max].every(Number.isSafeInteger)) {
      throw new CommandError(
        "'min' and 'max' must be integers within ±(2^53 - 1) for type 'integer'",
      );
    }
    const value = min + Math.floor(Math.random() * (max - min + 1));
    return { value: Math.min(value, max), min, max };
  },
  normal: (args) => {
    const { mean = 0, std = 1 } = args;
    requireNumber("mean", mean);
    requireNumber("std", std);
    if (std < 0) throw new CommandError("'std' must not be negative");
    return { value: mean + std * standardNormal(), mean, std };
  },
};

function random(args) {
  const type = args.type === undefined ? "uniform" : args.type;
  const { value, ...params } = lookup(DISTRIBUTIONS, type, "type")(args);
  if (!Number.isFinite(value)) throw new CommandError("result is not a finite number");
  return { type, value, ...params };
}

function bounds(args, defaultMin, defaultMax) {
  const { min = defaultMin, max = defaultMax } = args;
  requireNumber("min", min);
  requireNumber("max", max);
  if (min > max) throw new CommandError(`'min' (${min}) must not exceed 'max' (${max})`);
  return { min, max };
}

/** Box-Muller; 1 - random() is in (0, 1], so the logarithm is finite. */
function standardNormal() {
  const radius = Math.sqrt(-2 * Math.log(1 - Math.random()));
  return radius * Math.cos(2 * Math.PI * Math.random());
}

function clamp(value, min, max) {
  return Math.min(Math.max(value, min), max);
}

// ---------------------------------------------------------------------------------------------
// info, sleep
// ---------------------------------------------------------------------------------------------

function info() {
  const bridge = status();
  const memoryUsage = process.memoryUsage();
  return {
    runtime: "node",
    runtime_version: process.versions.node,
    bridge_version: version,
    platform: process.platform,
    arch: process.arch,
    pid: process.pid,
    worker_id: bridge.workerId,
    uptime: bridge.uptime,
    requests_handled: bridge.requestsHandled,
    memory: { rss_bytes: memoryUsage.rss },
    memory_usage: memoryUsage,
    commands: bridge.commands,
  };
}

async function sleep(args, ctx) {
  const { seconds } = args;
  if (typeof seconds !== "number" || !(seconds >= 0 && seconds <= 3600)) {
    throw new CommandError("'seconds' must be a number from 0 to 3600");
  }
  await delay(seconds * 1000, undefined, { signal: ctx.signal });
  return { slept: seconds };
}

// ---------------------------------------------------------------------------------------------
// call_host
// ---------------------------------------------------------------------------------------------

const MAX_HOST_CALLS = 100_000;

/**
 * Calls the host's callback `name` with `args`, `times` times (one after another, or all at
 * once with `parallel`): {"results": [...]} in call order (PROTOCOL.md, *The call_host
 * command*). A CallbackError fails the command with "<code>: <message>".
 */
async function callHost(args, ctx) {
  const { name } = args;
  const callArgs = args.args ?? {};
  const times = args.times ?? 1;
  if (typeof name !== "string" || name === "") {
    throw new CommandError("'name' must be a non-empty string");
  }
  if (!isPlainObject(callArgs)) throw new CommandError("'args' must be an object");
  if (!Number.isSafeInteger(times) || times < 1 || times > MAX_HOST_CALLS) {
    throw new CommandError(`'times' must be an integer from 1 to ${MAX_HOST_CALLS}`);
  }
  try {
    if (args.parallel === true) {
      const calls = Array.from({ length: times }, () => ctx.call(name, callArgs));
      return { results: await Promise.all(calls) };
    }
    const results = [];
    for (let i = 0; i < times; i += 1) results.push(await ctx.call(name, callArgs));
    return { results };
  } catch (error) {
    if (error instanceof CallbackError) throw new CommandError(`${error.code}: ${error.message}`);
    throw error;
  }
}

// ---------------------------------------------------------------------------------------------
// stream
// ---------------------------------------------------------------------------------------------

const MAX_STREAM_COUNT = 1_000_000;
/** How often `wait_for` looks for its file. */
const POLL_MS = 10;

/**
 * Yields {"i": 0} ... {"i": count - 1}, then returns `final` (the last item unless null): a
 * producer for tests of streaming, backpressure and cancellation (PROTOCOL.md, *The stream
 * command*). Before item i: the `delay`, then the `fail_at` check, then `progress` = i + 1.
 * Its arguments are checked on the first step, so a bad one fails before any item.
 */
async function* stream(args, ctx) {
  const { count, seconds, failAt, waitFor, progress, final } = streamArgs(args);
  for (let i = 0; i < count; i += 1) {
    if (seconds > 0) await delay(seconds * 1000, undefined, { signal: ctx.signal });
    if (i === failAt) throw new CommandError(`failed at item ${i}`);
    if (progress !== null) writeAtomically(progress, String(i + 1));
    yield { i };
    // Resumed only when the driver asks for item 1, so item 0 is already on its way out.
    if (i === 0 && waitFor !== null && count > 1) await waitForFile(waitFor, ctx.signal);
  }
  return final;
}

/** The checked arguments of `stream`; null (or absent) optional ones are not given. */
function streamArgs(args) {
  const { count } = args;
  const seconds = args.delay ?? 0;
  const failAt = args.fail_at ?? null;
  if (!Number.isSafeInteger(count) || count < 0 || count > MAX_STREAM_COUNT) {
    throw new CommandError(`'count' must be an integer from 0 to ${MAX_STREAM_COUNT}`);
  }
  if (typeof seconds !== "number" || !(seconds >= 0 && seconds <= 3600)) {
    throw new CommandError("'delay' must be a number from 0 to 3600");
  }
  if (failAt !== null && !Number.isSafeInteger(failAt)) {
    throw new CommandError("'fail_at' must be an integer");
  }
  const waitFor = optionalPath(args, "wait_for");
  const progress = optionalPath(args, "progress");
  return { count, seconds, failAt, waitFor, progress, final: args.final ?? null };
}

function optionalPath(args, name) {
  const path = args[name] ?? null;
  if (path === null) return null;
  if (typeof path !== "string" || path === "") {
    throw new CommandError(`'${name}' must be a non-empty string (a file path)`);
  }
  return path;
}

/** A reader of `path` sees the old text or the new, never half of it: rename is atomic. */
function writeAtomically(path, text) {
  const temporary = `${path}.${process.pid}.tmp`;
  fs.writeFileSync(temporary, text);
  fs.renameSync(temporary, path);
}

async function waitForFile(path, signal) {
  while (!fs.existsSync(path)) await delay(POLL_MS, undefined, { signal });
}

// ---------------------------------------------------------------------------------------------
// Session state: store, retrieve, clear_session
// ---------------------------------------------------------------------------------------------

/** session_id -> Map(key -> value); a session exists only while it holds a value. */
const sessions = new Map();

function store(args) {
  const sessionId = requireSession(args);
  const key = requireKey(args);
  if (!Object.hasOwn(args, "value")) throw new CommandError("'value' is required");
  let values = sessions.get(sessionId);
  if (values === undefined) sessions.set(sessionId, (values = new Map()));
  values.set(key, args.value);
  return { stored: true, session_id: sessionId, key };
}

function retrieve(args) {
  const sessionId = requireSession(args);
  const key = requireKey(args);
  const values = sessions.get(sessionId);
  const found = values !== undefined && values.has(key);
  return { found, session_id: sessionId, key, value: found ? values.get(key) : null };
}

function clearSession(args) {
  const sessionId = requireSession(args);
  const values = sessions.get(sessionId);
  sessions.delete(sessionId);
  return { cleared: values !== undefined, session_id: sessionId, keys: values ? values.size : 0 };
}

function requireSession(args) {
  const sessionId = args.session_id;
  if (typeof sessionId !== "string" || sessionId === "") {
    throw new CommandError("session_id is required (use execute_in_session)");
  }
  return sessionId;
}

function requireKey(args) {
  if (typeof args.key !== "string" || args.key === "") {
    throw new CommandError("'key' must be a non-empty string");
  }
  return args.key;
}

// ---------------------------------------------------------------------------------------------
// Programs: create_program, execute_program
// ---------------------------------------------------------------------------------------------

function createProgram(args) {
  const { signature, program_id: programId, session_id: _sessionId, ...config } = args;
  const { inputs, outputs } = parseSignature(signature);
  return {
    program_id: programId || `prog_${randomBytes(8).toString("hex")}`,
    signature,
    inputs,
    outputs,
    config,
  };
}

function executeProgram(args) {
  const { program, inputs: values } = args;
  if (!isPlainObject(program) || typeof program.signature !== "string") {
    throw new CommandError("'program' must be an object with a 'signature'");
  }
  if (!isPlainObject(values)) throw new CommandError("'inputs' must be an object");
  const { inputs, outputs } = parseSignature(program.signature);
  const missing = inputs.find((name) => !Object.hasOwn(values, name));
  if (missing !== undefined) throw new CommandError(`missing input '${missing}'`);
  const call = inputs.map((name) => `${name}=${formatValue(values[name])}`).join(", ");
  const results = {};
  for (const name of outputs) results[name] = `${name}(${call})`;
  return { program_id: program.program_id || null, outputs: results };
}

/** "in1, in2 -> out1, out2": names trimmed, blanks dropped, both sides non-empty. */
function parseSignature(signature) {
  const sides = typeof signature === "string" ? signature.split("->").map(splitNames) : [];
  if (sides.length !== 2 || sides.some((names) => names.length === 0)) {
    throw new CommandError(
      `signature must look like 'in1, in2 -> out1, out2' (got ${JSON.stringify(signature)})`,
    );
  }
  return { inputs: sides[0], outputs: sides[1] };
}

function splitNames(side) {
  return side
    .split(",")
    .map((name) => name.trim())
    .filter((name) => name !== "");
}

/** Strings as they are, anything else as compact JSON. */
function formatValue(value) {
  return typeof value === "string" ? value : JSON.stringify(value);
}

// ---------------------------------------------------------------------------------------------
// Argument checks shared by the commands
// ---------------------------------------------------------------------------------------------

/** `table[name]`, or an error listing the supported names (own keys only, never prototypes). */
function lookup(table, name, what) {
  if (typeof name === "string" && Object.hasOwn(table, name)) return table[name];
  const supported = Object.keys(table).join(", ");
  throw new CommandError(`unknown ${what} '${name}' (supported: ${supported})`);
}

function requireNumber(name, value) {
  if (typeof value !== "number") throw new CommandError(`'${name}' must be a number`);
}

function isPlainObject(value) {
  return value !== null && typeof value === "object" && !Array.isArray(value);
}

run({
  echo: (args) => ({ echoed: args }),
  call_host: callHost,
  compute,
  random,
  info,
  sleep,
  stream,
  store,
  retrieve,
  clear_session: clearSession,
  create_program: createProgram,
  execute_program: executeProgram,
});
