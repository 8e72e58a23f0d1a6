"""Regenerate jserve_pb2.py / jserve_pb2.pyi / jserve_pb2_grpc.py from jserve.proto.

Run from anywhere: ``python -m server.proto.generate``. Needs grpcio-tools (a dev dependency).
Paths are relative to the repository root so the stubs import each other as ``server.proto.*``.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTO = "server/proto/jserve.proto"


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def protoc(args: list[str]) -> None:
    """Run grpc_tools' bundled protoc with the repository root as the include path."""
    from grpc_tools import protoc as _protoc

    root = repo_root()
    include = Path(_protoc.__file__).parent / "_proto"
    code = _protoc.main(["grpc_tools.protoc", f"-I{root}", f"-I{include}", *args, str(root / PROTO)])
    if code != 0:
        raise RuntimeError(f"protoc failed with exit code {code} on {PROTO}")


def main() -> int:
    root = str(repo_root())
    protoc([f"--python_out={root}", f"--pyi_out={root}", f"--grpc_python_out={root}"])
    print(f"regenerated stubs for {PROTO}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
