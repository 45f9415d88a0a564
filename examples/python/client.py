"""A Python client of llm-gateway, with stubs generated from proto/ by grpcio-tools.

This is how our users' other languages see the gateway. Generate the stubs, then run it
against a gateway (by default the zero-config one on 127.0.0.1:50051):

    python -m grpc_tools.protoc -I proto --python_out=examples/python/gen \
        --grpc_python_out=examples/python/gen proto/llmgateway/v1/gateway.proto
    PYTHONPATH=examples/python/gen python examples/python/client.py 127.0.0.1:50051

It calls Chat and ChatStream on the built-in `mock/echo` model, checks the final stream event,
and checks that invalid input gets INVALID_ARGUMENT with a BadRequest field violation.
"""

import sys

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from llmgateway.v1 import gateway_pb2, gateway_pb2_grpc


def user(text):
    return gateway_pb2.Message(
        role=gateway_pb2.ROLE_USER, content=[gateway_pb2.ContentPart(text=text)]
    )


def wait_ready(channel, seconds=30):
    grpc.channel_ready_future(channel).result(timeout=seconds)


def bad_request_fields(err):
    """Field paths from the google.rpc.BadRequest detail of an error."""
    status = rpc_status.from_call(err)
    if status is None:
        return []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            return [v.field for v in bad.field_violations]
    return []


def main():
    target = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051"
    channel = grpc.insecure_channel(target)
    wait_ready(channel)
    stub = gateway_pb2_grpc.LlmGatewayStub(channel)
    passed, failed = 0, 0

    def check(name, ok, detail=""):
        nonlocal passed, failed
        if ok:
            passed += 1
            print(f"ok   {name}")
        else:
            failed += 1
            print(f"FAIL {name} {detail}")

    reply = stub.Chat(
        gateway_pb2.ChatRequest(model="mock/echo", messages=[user("hello from python")]),
        timeout=10,
    )
    text = "".join(p.text for p in reply.message.content)
    check("unary chat", "You said: hello from python" in text, text)
    check("unary usage", reply.usage.source == gateway_pb2.USAGE_SOURCE_PROVIDER)

    events = list(
        stub.ChatStream(
            gateway_pb2.ChatRequest(model="mock/echo", messages=[user("stream it")]),
            timeout=10,
        )
    )
    kinds = [e.WhichOneof("event") for e in events]
    streamed = "".join(e.delta.text for e in events if e.WhichOneof("event") == "delta")
    check("stream starts with start", kinds[0] == "start", kinds)
    check("stream ends with finish", kinds[-1] == "finish", kinds)
    check("stream text", streamed.endswith("You said: stream it"), streamed)
    check("stream usage", events[-1].finish.usage.total_tokens > 0)

    try:
        stub.Chat(gateway_pb2.ChatRequest(model="", messages=[user("x")]), timeout=10)
        check("invalid argument", False, "no error")
    except grpc.RpcError as err:
        check("invalid argument code", err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.code())
        check("invalid argument field", bad_request_fields(err) == ["model"], bad_request_fields(err))

    models = stub.ListModels(gateway_pb2.ListModelsRequest(), timeout=10)
    check("list models", any(m.id == "mock/echo" for m in models.models))

    print(f"python example: {passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
