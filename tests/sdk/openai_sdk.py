"""The official `openai` Python package against a live gateway's HTTP front.

Usage: python openai_sdk.py http://127.0.0.1:8080/v1

The gateway routes `openai/*` to the mock upstream (see .ci/run), whose `+directives` on the
model name script faults. Exits non-zero on the first failed check.
"""

import json
import os
import sys

import openai

try:  # the HTTP client the SDK is built on (httpx2 in openai 3.x)
    import httpx2 as httpx
except ImportError:
    import httpx

BASE = sys.argv[1]
requests_sent = 0


def count(_request):
    global requests_sent
    requests_sent += 1


client = openai.OpenAI(
    base_url=BASE,
    api_key=os.environ["OPENAI_API_KEY"],
    max_retries=2,
    timeout=20.0,
    http_client=httpx.Client(event_hooks={"request": [count]}),
)
user = [{"role": "user", "content": "hello sdk"}]


def check(name, ok, detail=""):
    print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}")
    if not ok:
        sys.exit(1)


# Chat.
r = client.chat.completions.create(model="openai/gpt-4o-mini", messages=user, temperature=0.2)
check("chat", r.choices[0].message.content == "Mock reply to: hello sdk", r.choices[0].message)
check("chat usage", r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens > 0)

# Stream, with the usage chunk.
text, usage, finish = "", None, None
stream = client.chat.completions.create(
    model="openai/gpt-4o-mini",
    messages=[{"role": "user", "content": "stream sdk"}],
    stream=True,
    stream_options={"include_usage": True},
)
for chunk in stream:
    if chunk.choices:
        text += chunk.choices[0].delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
    if chunk.usage:
        usage = chunk.usage
check("stream text", text == "Mock reply to: stream sdk", repr(text))
check("stream finish and usage", finish == "stop" and usage is not None and usage.prompt_tokens > 0)

# Tools.
tools = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather at a place",
        "parameters": {"type": "object", "properties": {"location": {"type": "string"}}},
    },
}]
r = client.chat.completions.create(
    model="openai/gpt-4o-mini+tools", messages=user, tools=tools, tool_choice="auto",
    parallel_tool_calls=True,
)
call = r.choices[0].message.tool_calls[0]
check("tool call", r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather")
check("tool arguments", json.loads(call.function.arguments)["location"] == "Paris")
r = client.chat.completions.create(
    model="openai/gpt-4o-mini",
    messages=user + [
        {"role": "assistant", "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
    ],
    tools=tools,
)
check("tool result round trip", r.choices[0].message.content is not None)

# JSON mode (the mock does not write JSON; the gateway accepts and forwards the mode).
r = client.chat.completions.create(
    model="openai/gpt-4o-mini", messages=user, response_format={"type": "json_object"},
)
check("json mode", r.choices[0].finish_reason == "stop")

# An error, with the field named.
try:
    client.chat.completions.create(model="openai/gpt-4o-mini", messages=user, temperature=5)
    check("bad request", False)
except openai.BadRequestError as err:
    check("bad request", err.status_code == 400 and err.body["param"] == "temperature", err.body)

# The SDK's own retry on 429 (honouring retry-after): three requests, then RateLimitError.
requests_sent = 0
try:
    client.chat.completions.create(
        model="openai/gpt-4o-mini+status=429+retry_after=1", messages=user,
    )
    check("rate limited", False)
except openai.RateLimitError as err:
    check("rate limited, retried by the sdk", requests_sent == 3, f"requests={requests_sent}")

# A stream that breaks after it began raises, never looks complete.
try:
    for _ in client.chat.completions.create(
        model="openai/gpt-4o-mini+truncate+chunks=6", messages=user, stream=True,
    ):
        pass
    check("broken stream raises", False)
except openai.APIError as err:
    check("broken stream raises", True, type(err).__name__)

# Embeddings: the SDK asks for base64 by default and decodes it; floats on request. The mock
# upstream's vectors are deterministic and closer for texts sharing words.
texts = ["reset my password", "how to reset a password", "quarterly revenue report"]
r = client.embeddings.create(model="openai/text-embedding-3-small", input=texts)
vectors = [d.embedding for d in sorted(r.data, key=lambda d: d.index)]
check("embeddings batch", len(vectors) == 3 and all(len(v) == 256 for v in vectors))
check("embeddings usage", r.usage.prompt_tokens == 11 and r.usage.total_tokens == 11, r.usage)
dot = lambda a, b: sum(x * y for x, y in zip(a, b))
check("embeddings are unit vectors", abs(dot(vectors[0], vectors[0]) - 1.0) < 1e-4)
check("shared words are closer", dot(vectors[0], vectors[1]) > dot(vectors[0], vectors[2]) + 0.2)
r = client.embeddings.create(
    model="openai/text-embedding-3-small", input="reset my password", dimensions=16,
    encoding_format="float",
)
check("embeddings dimensions, float", len(r.data[0].embedding) == 16)
again = client.embeddings.create(
    model="openai/text-embedding-3-small", input="reset my password", dimensions=16,
)
check("embeddings are deterministic, base64 = float",
      all(abs(a - b) < 1e-6 for a, b in zip(again.data[0].embedding, r.data[0].embedding)))
try:
    client.embeddings.create(model="openai/text-embedding-3-small", input=[])
    check("embeddings bad request", False)
except openai.BadRequestError as err:
    check("embeddings bad request", err.status_code == 400 and err.body["param"] == "input", err.body)

models = client.models.list()
check("models", any(m.id == "openai/gpt-4o-mini" for m in models.data))
print("openai python sdk: all checks passed")
