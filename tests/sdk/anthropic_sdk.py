"""The official `anthropic` Python package against a live gateway's HTTP front.

Usage: python anthropic_sdk.py http://127.0.0.1:8080

`anthropic/*` goes to the mock upstream through the gateway's Anthropic adapter, so both
ends speak Anthropic's format. Exits non-zero on the first failed check.
"""

import os
import sys

import anthropic

client = anthropic.Anthropic(base_url=sys.argv[1], api_key=os.environ["ANTHROPIC_API_KEY"], max_retries=0)
MODEL = "anthropic/claude-sonnet-4-5"


def check(name, ok, detail=""):
    print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}")
    if not ok:
        sys.exit(1)


m = client.messages.create(
    model=MODEL, max_tokens=100, system="be brief",
    messages=[{"role": "user", "content": "hello claude"}],
)
check("messages", m.content[0].text == "Mock reply to: hello claude", m.content)
check("usage", m.usage.output_tokens > 0 and m.stop_reason == "end_turn")

with client.messages.stream(
    model=MODEL, max_tokens=100, messages=[{"role": "user", "content": "stream claude"}],
) as stream:
    text = "".join(stream.text_stream)
    final = stream.get_final_message()
check("stream", text == "Mock reply to: stream claude", repr(text))
check("stream final message", final.stop_reason == "end_turn" and final.usage.output_tokens > 0)

tools = [{"name": "get_weather", "description": "Weather at a place",
          "input_schema": {"type": "object", "properties": {"location": {"type": "string"}}}}]
m = client.messages.create(
    model=MODEL + "+tools", max_tokens=100, tools=tools,
    messages=[{"role": "user", "content": "weather in Paris?"}],
)
use = next(b for b in m.content if b.type == "tool_use")
check("tool use", m.stop_reason == "tool_use" and use.name == "get_weather"
      and use.input["location"] == "Paris", m.content)
m = client.messages.create(
    model=MODEL, max_tokens=100, tools=tools,
    messages=[
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": [use.model_dump()]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny"}]},
    ],
)
check("tool result round trip", m.content[0].type == "text")

with client.messages.stream(
    model=MODEL + "+tools", max_tokens=100, tools=tools,
    messages=[{"role": "user", "content": "weather, streamed"}],
) as stream:
    final = stream.get_final_message()
use = next(b for b in final.content if b.type == "tool_use")
check("streamed tool use", use.input["location"] == "Paris", final.content)

try:
    client.messages.create(model=MODEL, max_tokens=0, messages=[{"role": "user", "content": "x"}])
    check("bad request", False)
except anthropic.BadRequestError as err:
    check("bad request", err.status_code == 400 and "max_tokens" in str(err), str(err))

try:
    with client.messages.stream(
        model=MODEL + "+truncate+chunks=6", max_tokens=100,
        messages=[{"role": "user", "content": "break"}],
    ) as stream:
        for _ in stream:
            pass
    check("broken stream raises", False)
except anthropic.APIError as err:
    check("broken stream raises", True, type(err).__name__)
print("anthropic python sdk: all checks passed")
