"""jserve's servers: the OpenAI-compatible HTTP API and the gRPC API over jserve's AsyncEngine.

Depends on jserve (never the other way round). Entry point: ``jserve serve`` (server/cli.py).
"""
