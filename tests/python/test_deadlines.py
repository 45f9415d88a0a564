"""Deadlines as a gRPC-core client sees them (issue 13).

grpcio (like every client on the gRPC C core: Ruby, C++, C#, PHP) rounds the `grpc-timeout`
it sends up to a coarse grid, so the header can say up to 1% more than the caller's real
deadline, and the client's own timer fires at the real one. The gateway must still answer
first, with its own DEADLINE_EXCEEDED and the attempt trail (ErrorInfo), not leave the caller
with grpcio's local "Deadline Exceeded" that carries no details.

The script starts the mock upstream and a gateway (its binaries are the arguments), routes a
policy to two hanging targets, and calls it with several deadlines. About 4 s in all.

    python tests/python/test_deadlines.py target/debug/llm-gateway target/debug/llm-gateway-mock
"""

import os
import socket
import subprocess
import sys
import tempfile
import time

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from llmgateway.v1 import gateway_pb2, gateway_pb2_grpc

DEADLINES = [0.1, 0.25, 0.5, 1.0, 2.0]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, seconds=30):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def error_info(err):
    status = rpc_status.from_call(err)
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None


def main():
    gateway_bin, mock_bin = sys.argv[1], sys.argv[2]
    procs = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            mock_port = free_port()
            procs.append(
                subprocess.Popen(
                    [mock_bin, "--listen", f"127.0.0.1:{mock_port}"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            wait_port(mock_port)
            port = free_port()
            config = os.path.join(tmp, "gateway.toml")
            with open(config, "w") as f:
                f.write(
                    f"""
[server]
listen = "127.0.0.1:{port}"
[store]
path = "{tmp}/gateway.db"
[metrics]
listen = "off"
[log]
level = "warn"
[providers.a]
kind = "openai-compatible"
base_url = "http://127.0.0.1:{mock_port}/v1"
[providers.b]
kind = "openai-compatible"
base_url = "http://127.0.0.1:{mock_port}/v1"
[policies.hangs]
targets = [{{ provider = "a", model = "m+hang" }}, {{ provider = "b", model = "m+hang" }}]
"""
                )
            env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
            procs.append(subprocess.Popen([gateway_bin, "--config", config], env=env))
            wait_port(port)

            channel = grpc.insecure_channel(f"127.0.0.1:{port}")
            grpc.channel_ready_future(channel).result(timeout=30)
            stub = gateway_pb2_grpc.LlmGatewayStub(channel)
            request = gateway_pb2.ChatRequest(
                model="hangs",
                messages=[
                    gateway_pb2.Message(
                        role=gateway_pb2.ROLE_USER,
                        content=[gateway_pb2.ContentPart(text="hi")],
                    )
                ],
            )
            failed = 0
            for deadline in DEADLINES:
                try:
                    stub.Chat(request, timeout=deadline)
                    print(f"FAIL {deadline}s: the call succeeded against hanging targets")
                    failed += 1
                    continue
                except grpc.RpcError as err:
                    code, details = err.code(), err.details()
                    info = error_info(err)
                ok = (
                    code == grpc.StatusCode.DEADLINE_EXCEEDED
                    and info is not None
                    and info.reason == "DEADLINE_EXCEEDED"
                    and info.metadata.get("attempt.1", "").startswith("a/m+hang primary")
                )
                if ok:
                    print(
                        f"ok   {deadline}s: the gateway's DEADLINE_EXCEEDED with "
                        f"{info.metadata['attempts']} attempt(s): {details}"
                    )
                else:
                    failed += 1
                    print(
                        f"FAIL {deadline}s: {code} {details!r} "
                        f"(error info: {info}): the caller's own timer fired first"
                    )
            channel.close()
        finally:
            for p in reversed(procs):
                p.terminate()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
    if failed:
        print(f"{failed} of {len(DEADLINES)} deadlines failed")
        sys.exit(1)
    print(f"all {len(DEADLINES)} deadlines passed")


if __name__ == "__main__":
    main()
