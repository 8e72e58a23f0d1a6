"""The jserve.v1 gRPC API: jserve.proto and its generated Python stubs.

Where it sits: server/grpc_service.py implements ``Generation`` from these stubs; clients (the
``jserve bench`` gRPC backend, tests) import the same stubs. The stubs are generated from
jserve.proto by ``python -m server.proto.generate`` (needs grpcio-tools, a dev dependency) and
committed, so serving needs only grpcio + protobuf at run time. A test checks that the
committed stubs describe exactly what jserve.proto says.
"""
