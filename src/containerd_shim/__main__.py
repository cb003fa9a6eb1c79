"""``containerd-shim-pyrunc-v2``: the runtime v2 binary (``start``, ``delete``, or the daemon)."""

from __future__ import annotations

import os
import sys

import containerd_shim
from containerd_shim.flags import parse

__all__ = ["main", "run"]


def _self_argv() -> list[str]:
    """How to run this shim again (for the daemon): the shim's interpreter and module."""
    return [containerd_shim.python, "-m", "containerd_shim"]


def _full_interpreter(args: list[str]) -> None:
    """Under the fast launcher (no site-packages), re-execute as the full shim.

    ``start``, a ``delete`` with nothing to clean and a zygote-served one need
    only the standard library; the daemon and a local full ``delete`` need
    protobuf from site-packages.
    """
    if sys.flags.no_site or sys.executable != containerd_shim.python:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(containerd_shim.python, [*_self_argv(), *args])


def _delete_in_zygote(args: list[str]) -> int | None:
    """Run ``delete`` in a child of the zygote (pre-imported); None if there is none."""
    from containerd_shim import zygote

    if zygote.in_child() or not zygote.enabled():
        return None
    sys.stdout.flush()
    sys.stderr.flush()
    return zygote.request(
        zygote.socket_path(), "delete", [*_self_argv(), *args], [1, 2], timeout=None
    )


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    flags = parse(args)
    if flags.version:
        from ttrpc import __version__

        print(f"{os.path.basename(sys.argv[0])}:")
        print(f"  Version:  {__version__}")
        print("  Runtime:  io.containerd.pyrunc.v2")
        return 0
    try:
        if flags.action == "start":
            from containerd_shim.manager import start

            address = start(flags, _self_argv())
            sys.stdout.write(address)
            sys.stdout.flush()
            return 0
        if flags.action == "delete":
            from containerd_shim.manager import quick_delete

            response = quick_delete(flags)
            if response is not None:
                sys.stdout.buffer.write(response)
                sys.stdout.flush()
                return 0
            status = _delete_in_zygote(args)
            if status is not None:
                return status
            _full_interpreter(args)
            from containerd_shim.manager import delete

            sys.stdout.buffer.write(delete(flags))
            sys.stdout.flush()
            return 0
        if flags.action:
            raise SystemExit(f"unknown action {flags.action!r}")
        _full_interpreter(args)
        from containerd_shim.serve import serve

        return serve(flags)
    except SystemExit as exc:
        if isinstance(exc.code, str):
            sys.stderr.write(f"io.containerd.pyrunc.v2: {exc.code}")
            return 1
        raise
    except Exception as exc:
        # containerd shows this text (stdout and stderr together) as the failure.
        sys.stderr.write(f"io.containerd.pyrunc.v2: {exc}")
        return 1


def run() -> None:
    """:func:`main`, then exit without the interpreter's teardown (the launchers' entry).

    ``start`` and ``delete`` run once per container and containerd waits for them;
    tearing down the modules they imported costs more than some of their work. What
    they write goes out through ``os`` calls or the flushed standard streams.
    """
    try:
        code = main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if isinstance(exc.code, str):
            sys.stderr.write(exc.code + "\n")
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
