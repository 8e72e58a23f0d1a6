"""Stream a completion over jserve's gRPC API (proto: server/proto/jserve.proto)."""
import sys

import grpc

from server.proto import jserve_pb2 as pb
from server.proto import jserve_pb2_grpc as rpc

stub = rpc.GenerationStub(grpc.insecure_channel(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051"))
req = pb.GenerateRequest(text="def fibonacci(n):", sampling_params=pb.SamplingParams(max_tokens=32))
for msg in stub.Generate(req):
    print("".join(c.text for c in msg.choices), end="", flush=True)
print()
