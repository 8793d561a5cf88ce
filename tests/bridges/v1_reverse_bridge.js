#!/usr/bin/env node
// A protocol-1 bridge in Node with its own commands (ping, reverse), written from
// docs/PROTOCOL.md with Node's standard library only and no snakepit code. The handshake answer
// has no `protocol` and no `capabilities` key (max_in_flight is ignored): the pool sends one
// request at a time, and this bridge handles each before it reads the next.
"use strict";

const fs = require("fs");
const net = require("net");

const MAX_FRAME = Number(process.env.SNAKEPIT_MAX_FRAME_BYTES) || 64 * 1024 * 1024;
const started = Date.now();
let handled = 0;

// Stdout protection: private descriptors on the protocol's pipes (re-opened through
// /proc/self/fd, since Node has no dup), then fd 0 re-opened on /dev/null and fd 1 on stderr,
// so console.log, fs.writeSync(1, ...) and children cannot touch the protocol.
const input = fs.openSync("/proc/self/fd/0", "r");
const output = fs.openSync("/proc/self/fd/1", "a");
fs.closeSync(0);
if (fs.openSync("/dev/null", "r") !== 0) fatal("could not re-open fd 0");
fs.closeSync(1);
if (fs.openSync("/proc/self/fd/2", "a") !== 1) fatal("could not re-open fd 1");

function fatal(why) {
  fs.writeSync(2, `v1 reverse bridge: ${why}\n`);
  process.exit(3); // the stream cannot be trusted any more
}

function writeFrame(message) {
  let body = Buffer.from(JSON.stringify(message), "utf8");
  if (body.length > MAX_FRAME) {
    const error = `response of ${body.length} bytes exceeds the frame limit of ${MAX_FRAME} bytes`;
    body = Buffer.from(JSON.stringify({ id: message.id, success: false, error }), "utf8");
  }
  const frame = Buffer.alloc(4 + body.length);
  frame.writeUInt32BE(body.length, 0);
  body.copy(frame, 4);
  for (let sent = 0; sent < frame.length; ) sent += fs.writeSync(output, frame, sent);
}

class Refused extends Error {}

const commands = {
  ping: (args) => ({
    status: "ok",
    runtime: "node",
    worker_id: typeof args.worker_id === "string" ? args.worker_id : process.env.SNAKEPIT_WORKER_ID,
    uptime: (Date.now() - started) / 1000,
    requests_handled: handled,
    pid: process.pid,
  }),
  reverse: (args) => {
    if (typeof args.text !== "string") throw new Refused("text is required (a string)");
    return Array.from(args.text).reverse().join("");
  },
};

function answer(request) {
  const id = request.id;
  if (!Number.isInteger(id)) fatal("a request without an integer id");
  const command = request.command;
  if (command === "$cancel") return; // no cancel capability: nothing else runs meanwhile
  handled += 1;
  const handler = Object.hasOwn(commands, command) ? commands[command] : undefined;
  if (handler === undefined) {
    const supported = Object.keys(commands).sort().join(", ");
    writeFrame({ id, success: false, error: `unknown command '${command}' (supported: ${supported})` });
    return;
  }
  const args = request.args !== null && typeof request.args === "object" ? request.args : {};
  try {
    writeFrame({ id, success: true, result: handler(args) });
  } catch (err) {
    writeFrame({ id, success: false, error: `${command}: ${err.message}` });
  }
}

// Frames from the byte stream: chunks wait until a whole frame is there.
let pending = Buffer.alloc(0);
// A socket on the pipe, not fs.createReadStream: a read blocked on the thread pool would keep
// process.exit() from returning on SIGTERM.
const reader = new net.Socket({ fd: input, readable: true, writable: false });
reader.on("data", (chunk) => {
  pending = pending.length ? Buffer.concat([pending, chunk]) : chunk;
  while (pending.length >= 4) {
    const length = pending.readUInt32BE(0);
    if (length > MAX_FRAME) fatal(`frame of ${length} bytes exceeds the limit of ${MAX_FRAME}`);
    if (pending.length < 4 + length) break;
    const body = pending.subarray(4, 4 + length);
    pending = pending.subarray(4 + length);
    let request;
    try {
      request = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(body));
    } catch (err) {
      fatal(`undecodable frame: ${err.message}`);
    }
    if (request === null || typeof request !== "object" || Array.isArray(request)) {
      fatal("a frame that is not an object");
    }
    answer(request);
  }
});
reader.on("end", () => {
  if (pending.length) fatal("input ended inside a frame");
  process.exit(0); // end of input between frames: the pool is done with us
});
reader.on("error", (err) => fatal(`read: ${err.message}`));
process.on("SIGTERM", () => process.exit(0));
