// A Node client of llm-gateway: stubs loaded from proto/ at run time with
// @grpc/proto-loader, calls through @grpc/grpc-js, exactly as a Node service would.
//
//   npm install --prefix examples/node
//   node examples/node/client.js 127.0.0.1:50051 [proto dir]
//
// It calls Chat and ChatStream (with a deadline) on the built-in `mock/echo` model, and
// checks that invalid input gets INVALID_ARGUMENT with its rich details (ErrorInfo and a
// BadRequest field violation, decoded from `grpc-status-details-bin`).
"use strict";

const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");
const protobuf = require("protobufjs");

const target = process.argv[2] || "127.0.0.1:50051";
const protoDir = process.argv[3] || path.join(__dirname, "..", "..", "proto");

const definition = protoLoader.loadSync("llmgateway/v1/gateway.proto", {
  includeDirs: [protoDir],
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
});
const { LlmGateway } = grpc.loadPackageDefinition(definition).llmgateway.v1;

// The google.rpc messages of the rich error model (wire-compatible subsets).
const rpc = protobuf.parse(`
  syntax = "proto3";
  package google.rpc;
  message Any { string type_url = 1; bytes value = 2; }
  message Status { int32 code = 1; string message = 2; repeated Any details = 3; }
  message ErrorInfo { string reason = 1; string domain = 2; map<string, string> metadata = 3; }
  message BadRequest {
    message FieldViolation { string field = 1; string description = 2; }
    repeated FieldViolation field_violations = 1;
  }
`, { keepCase: true }).root;

function richDetails(err) {
  const [bin] = err.metadata.get("grpc-status-details-bin");
  const status = rpc.lookupType("google.rpc.Status").decode(bin);
  const out = {};
  for (const any of status.details) {
    const name = any.type_url.split("/").pop(); // e.g. google.rpc.BadRequest
    const type = rpc.lookup(name);
    if (type) out[name.replace("google.rpc.", "")] = type.toObject(type.decode(any.value));
  }
  return out;
}

const user = (text) => ({ role: "ROLE_USER", content: [{ text }] });
const deadline = (ms) => new Date(Date.now() + ms);

let passed = 0;
let failed = 0;
function check(name, ok, detail = "") {
  console.log(`${ok ? "ok  " : "FAIL"} ${name} ${ok ? "" : detail}`);
  if (ok) passed += 1; else failed += 1;
}

function chat(client, request) {
  return new Promise((resolve, reject) =>
    client.Chat(request, { deadline: deadline(10_000) }, (err, res) => (err ? reject(err) : resolve(res))));
}

function chatStream(client, request, ms) {
  return new Promise((resolve, reject) => {
    const events = [];
    const call = client.ChatStream(request, { deadline: deadline(ms) });
    call.on("data", (e) => events.push(e));
    call.on("error", reject);
    call.on("end", () => resolve(events));
  });
}

async function main() {
  const client = new LlmGateway(target, grpc.credentials.createInsecure());
  await new Promise((resolve, reject) =>
    client.waitForReady(deadline(30_000), (err) => (err ? reject(err) : resolve())));

  const reply = await chat(client, { model: "mock/echo", messages: [user("hello from node")] });
  const text = reply.message.content.map((p) => p.text || "").join("");
  check("unary chat", text.includes("hello from node"), text);
  check("unary usage", Number(reply.usage.input_tokens) > 0, JSON.stringify(reply.usage));

  const events = await chatStream(client, { model: "mock/echo", messages: [user("stream it")] }, 10_000);
  check("stream starts with start", events[0]?.event === "start", JSON.stringify(events[0]));
  const last = events[events.length - 1];
  check("stream ends with finish", last?.event === "finish", JSON.stringify(last));
  const streamed = events.filter((e) => e.event === "delta").map((e) => e.delta.text || "").join("");
  check("stream text", streamed.includes("stream it"), streamed);

  try {
    await chat(client, { model: "", messages: [user("x")] });
    check("invalid argument", false, "the call succeeded");
  } catch (err) {
    check("invalid argument code", err.code === grpc.status.INVALID_ARGUMENT, String(err.code));
    const details = richDetails(err);
    check("error info", details.ErrorInfo?.domain === "llmgateway", JSON.stringify(details));
    const fields = (details.BadRequest?.field_violations || []).map((v) => v.field);
    check("invalid argument field", fields.join() === "model", JSON.stringify(fields));
  }

  const models = await new Promise((resolve, reject) =>
    client.ListModels({}, { deadline: deadline(10_000) }, (err, res) => (err ? reject(err) : resolve(res))));
  check("list models", models.models.some((m) => m.id === "mock/echo"));
  client.close();
  console.log(`node example: ${passed} passed, ${failed} failed`);
  process.exit(failed ? 1 : 0);
}

main().catch((err) => {
  console.error(`node example failed: ${err}`);
  process.exit(1);
});
