"""Regenerate the checked-in Python stubs from tessera.proto (needs grpcio-tools):

    python proto/generate.py

The stubs import as `proto.tessera_pb2` / `proto.tessera_pb2_grpc`; tests/test_proto.py checks that
the checked-in files equal a fresh generation.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def generate(out_dir: Path) -> None:
    from grpc_tools import protoc
    import grpc_tools

    include = str(Path(grpc_tools.__file__).parent / "_proto")
    rc = protoc.main(["protoc", f"-I{ROOT}", f"-I{include}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
                      f"--grpc_python_out={out_dir}", str(ROOT / "proto" / "tessera.proto")])
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc}")


if __name__ == "__main__":
    generate(ROOT)
    print("wrote proto/tessera_pb2.py, proto/tessera_pb2.pyi, proto/tessera_pb2_grpc.py", file=sys.stderr)
