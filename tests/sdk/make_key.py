"""Creates a gateway key with the `chat` scope through the Admin API (generated stubs) and
prints its secret, for the SDK checks. Usage: make_key.py HOST:PORT ADMIN_TOKEN NAME"""

import sys

import grpc

from llmgateway.v1 import admin_pb2, admin_pb2_grpc

target, token, name = sys.argv[1:4]
with grpc.insecure_channel(target) as channel:
    grpc.channel_ready_future(channel).result(timeout=30)
    admin = admin_pb2_grpc.LlmGatewayAdminStub(channel)
    created = admin.CreateKey(
        admin_pb2.CreateKeyRequest(key=admin_pb2.Key(name=name, scopes=["chat"])),
        metadata=[("authorization", f"Bearer {token}")],
        timeout=10,
    )
    print(created.secret)
