// The official `openai` Node package against a live gateway's HTTP front.
// Usage: node openai_sdk.mjs http://127.0.0.1:8080/v1
import OpenAI from "openai";

let requestsSent = 0;
const countingFetch = (url, init) => {
  requestsSent += 1;
  return fetch(url, init);
};
const client = new OpenAI({
  baseURL: process.argv[2],
  apiKey: process.env.OPENAI_API_KEY,
  maxRetries: 2,
  timeout: 20_000,
  fetch: countingFetch,
});
const user = [{ role: "user", content: "hello node" }];

function check(name, ok, detail = "") {
  console.log(`${ok ? "ok  " : "FAIL"} ${name} ${detail}`);
  if (!ok) process.exit(1);
}

const r = await client.chat.completions.create({ model: "openai/gpt-4o-mini", messages: user });
check("chat", r.choices[0].message.content === "Mock reply to: hello node");

let text = "";
let usage = null;
const stream = await client.chat.completions.create({
  model: "openai/gpt-4o-mini",
  messages: [{ role: "user", content: "stream node" }],
  stream: true,
  stream_options: { include_usage: true },
});
for await (const chunk of stream) {
  if (chunk.choices.length) text += chunk.choices[0].delta.content ?? "";
  if (chunk.usage) usage = chunk.usage;
}
check("stream", text === "Mock reply to: stream node" && usage?.total_tokens > 0, JSON.stringify(text));

const tools = [{
  type: "function",
  function: { name: "get_weather", parameters: { type: "object", properties: { location: { type: "string" } } } },
}];
const t = await client.chat.completions.create({ model: "openai/gpt-4o-mini+tools", messages: user, tools });
const call = t.choices[0].message.tool_calls[0];
check("tools", call.function.name === "get_weather" && JSON.parse(call.function.arguments).location === "Paris");

const j = await client.chat.completions.create({
  model: "openai/gpt-4o-mini",
  messages: user,
  response_format: { type: "json_schema", json_schema: { name: "a", schema: { type: "object" } } },
});
check("json schema mode", j.choices[0].finish_reason === "stop");

try {
  await client.chat.completions.create({ model: "", messages: user });
  check("bad request", false);
} catch (err) {
  check("bad request", err instanceof OpenAI.BadRequestError && err.param === "model", String(err));
}

requestsSent = 0;
try {
  await client.chat.completions.create({ model: "openai/gpt-4o-mini+status=429+retry_after=1", messages: user });
  check("rate limited", false);
} catch (err) {
  check("rate limited, retried by the sdk", err instanceof OpenAI.RateLimitError && requestsSent === 3,
    `requests=${requestsSent}`);
}
console.log("openai node sdk: all checks passed");
