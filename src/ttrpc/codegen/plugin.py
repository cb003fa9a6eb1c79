"""The protoc plugin entry point: CodeGeneratorRequest on stdin, CodeGeneratorResponse on stdout.

Installed as ``protoc-gen-ttrpc``; also runnable as ``python -m ttrpc.codegen.plugin``.
"""

from __future__ import annotations

import sys

from google.protobuf.compiler import plugin_pb2
from google.protobuf.message import DecodeError

from ttrpc.codegen.generator import generate

__all__ = ["main"]


def main() -> int:
    """Run one plugin exchange with protoc; returns the process exit status."""
    if sys.stdin.isatty():
        print(
            "protoc-gen-ttrpc is a protoc plugin: run it through protoc "
            "(e.g. python -m ttrpc.protoc --ttrpc_out=DIR -I. foo.proto)",
            file=sys.stderr,
        )
        return 2
    try:
        request = plugin_pb2.CodeGeneratorRequest.FromString(sys.stdin.buffer.read())
    except DecodeError as exc:
        print(f"protoc-gen-ttrpc: cannot parse the CodeGeneratorRequest: {exc}", file=sys.stderr)
        return 1
    response = generate(request)
    sys.stdout.buffer.write(response.SerializeToString())
    sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
