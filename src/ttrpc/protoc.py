"""``python -m ttrpc.protoc``: protoc (from grpcio-tools) with the ttrpc plugin ready to use.

Takes protoc's own arguments, e.g.::

    python -m ttrpc.protoc -I proto --python_out=out --pyi_out=out --ttrpc_out=out proto/foo.proto

The well-known types (``google/protobuf/*.proto``) are on the include path,
and ``--ttrpc_out`` works whether or not ``protoc-gen-ttrpc`` is on ``PATH``.
"""

from __future__ import annotations

import os
import shlex
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

__all__ = ["main"]

_PLUGIN_NAME = "protoc-gen-ttrpc"


def main(argv: Sequence[str] | None = None) -> int:
    """Run protoc with ``argv`` (default: the command line); returns its exit status."""
    try:
        import grpc_tools
        from grpc_tools import protoc
    except ImportError:
        print(
            "ttrpc.protoc needs protoc from grpcio-tools: pip install 'ttrpc[codegen]'",
            file=sys.stderr,
        )
        return 1
    args = list(sys.argv[1:] if argv is None else argv)
    # Appended last so the caller's own -I directories win over the bundled copies.
    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    with _plugin_executable() as plugin:
        command = ["protoc"]
        if not any(_names_our_plugin(arg) for arg in args):
            command.append(f"--plugin={_PLUGIN_NAME}={plugin}")
        # protoc searches "." only when no include path is given; keep that default.
        if not any(arg.startswith(("-I", "--proto_path")) for arg in args):
            command.append("-I.")
        command.extend(args)
        command.append(f"-I{well_known}")
        return int(protoc.main(command))


def _names_our_plugin(arg: str) -> bool:
    return arg.startswith((f"--plugin={_PLUGIN_NAME}=", f"{_PLUGIN_NAME}="))


@contextmanager
def _plugin_executable() -> Iterator[str]:
    """The plugin as an executable protoc can run, tied to this interpreter.

    That is the console script installed next to ``sys.executable`` (same
    environment; a ``protoc-gen-ttrpc`` elsewhere on PATH might not be), or
    else a temporary shell wrapper around ``sys.executable``.
    """
    installed = os.path.join(os.path.dirname(sys.executable), _PLUGIN_NAME)
    if os.path.isfile(installed) and os.access(installed, os.X_OK):
        yield installed
        return
    with _plugin_wrapper() as path:
        yield path


@contextmanager
def _plugin_wrapper() -> Iterator[str]:
    """A temporary executable running the plugin with ``sys.executable`` and this ttrpc."""
    import ttrpc

    # The directory ttrpc was imported from, for callers that extended sys.path themselves;
    # appended, so it never shadows the interpreter's own modules.
    root = os.path.dirname(os.path.dirname(os.path.abspath(ttrpc.__file__)))
    code = (
        "import sys\n"
        f"if {root!r} not in sys.path: sys.path.append({root!r})\n"
        "from ttrpc.codegen.plugin import main\n"
        "sys.exit(main())\n"
    )
    with tempfile.TemporaryDirectory(prefix="ttrpc-protoc-") as tmp:
        path = os.path.join(tmp, _PLUGIN_NAME)
        with open(path, "w", encoding="utf-8") as f:
            f.write(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -c {shlex.quote(code)}\n")
        os.chmod(path, 0o700)
        yield path


if __name__ == "__main__":
    sys.exit(main())
