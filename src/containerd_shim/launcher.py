"""Fast launchers for the shim binaries: ``python -m containerd_shim.launcher [--bindir DIR]``.

containerd executes ``containerd-shim-pyrunc-v2`` twice per container
(``start``, then ``delete``) and waits for both. The console script pip
installs starts a full interpreter with site-packages first; here ``site``
alone costs 20-80 ms (``.pth`` hooks), more than our whole ``start``. The
launchers this writes are short Python scripts the kernel runs with the interpreter
isolated and without site-packages (``#!python -IS``; a ``/bin/sh`` script where the
interpreter's path cannot stand in a ``#!`` line), the directories they need appended
to ``sys.path``:

* ``containerd-shim-pyrunc-v2``: this package's directory only. ``start`` and
  ``delete`` need the standard library and this package (the zygote does the
  heavy work); anything else (the daemon, a ``delete`` that has cleaning up to
  do and no zygote) re-executes itself with the full interpreter
  (:func:`containerd_shim.__main__.main`).
* ``containerd-shim-pyrunc-v1``: also protobuf's directory. containerd runs it
  once, as the daemon; without ``site`` it starts sooner and holds ~2 MiB less.

Put ``DIR`` ahead of the console scripts on containerd's ``PATH``, and write
them again after moving the installation: they name this interpreter and
these directories.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # typing's costs ``start`` an import (it uses package_root)
if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["NAME", "NAME_V1", "install", "script"]

NAME = "containerd-shim-pyrunc-v2"
NAME_V1 = "containerd-shim-pyrunc-v1"
_MODULES = {NAME: "containerd_shim.__main__", NAME_V1: "containerd_shim.v1"}


def package_root() -> str:
    """The directory that holds the ``containerd_shim`` package (a ``sys.path`` entry)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _protobuf_root(python: str = sys.executable) -> str:
    """The directory holding the ``google`` package of ``python``'s protobuf."""
    if python != sys.executable:
        import subprocess

        find = "import containerd_shim.launcher as l; print(l._protobuf_root())"
        env = dict(os.environ, PYTHONPATH=package_root())
        out = subprocess.run([python, "-c", find], check=True, capture_output=True, env=env)
        return out.stdout.decode().strip()
    import google.protobuf

    # google/protobuf/__init__.py -> the directory holding the ``google`` package
    return os.path.dirname(os.path.dirname(os.path.dirname(google.protobuf.__file__)))


# What a kernel passes of a ``#!`` line (older kernels: 127 bytes); a path with spaces
# cannot be written there either. Such interpreters get the /bin/sh launcher.
_SHEBANG_LIMIT = 127


def script(
    name: str = NAME,
    *,
    python: str = sys.executable,
    start_python: str | None = None,
    path_entry: str | None = None,
    env: Mapping[str, str] | None = None,
) -> str:
    """The text of the launcher for ``name`` (:data:`NAME` or :data:`NAME_V1`): a Python
    script the kernel runs with ``python -I -S`` (a ``/bin/sh`` one where the interpreter
    cannot stand in a ``#!`` line).

    ``python`` runs the shim (its zygote and daemons; for v1 the whole shim).
    ``start_python`` runs ``start`` and ``delete`` of the v2 shim instead, which need the
    standard library only: one that starts sooner saves that much twice per container
    (a distribution's statically linked ``python3`` starts ~4 ms sooner than a
    shared-library build here). ``path_entry`` replaces this package's directory; ``env``
    adds environment variables (for the processes the shim starts: the launched
    interpreter itself ignores ``PYTHON*`` variables)."""
    import json
    import shlex

    entries = [path_entry or package_root()]
    if name == NAME_V1:
        entries.append(_protobuf_root(python))
    lines = [
        # start and delete live for milliseconds: no collections while they import (~0.5 ms).
        *(["import gc", "gc.disable()"] if name == NAME else []),
        "import sys",
        f"sys.argv[0] = {json.dumps(name)}",
        f"sys.path += {json.dumps(entries)}",
    ]
    if env:
        lines += ["import os", f"os.environ.update({json.dumps(dict(env))})"]
    runner = python
    if name == NAME:
        if start_python and start_python != python:
            runner = start_python
            lines += ["import containerd_shim", f"containerd_shim.python = {json.dumps(python)}"]
        lines += ["from containerd_shim.__main__ import run", "run()"]
    else:
        lines += [f"from {_MODULES[name]} import main", "sys.exit(main())"]
    header = f"# {name}: written by python -m containerd_shim.launcher"
    shebang = f"#!{runner} -IS"
    if " " not in runner and len(shebang) <= _SHEBANG_LIMIT:
        return "\n".join([shebang, header, *lines]) + "\n"
    command = f"exec {shlex.quote(runner)} -I -S -c {shlex.quote('; '.join(lines))}"
    return f'#!/bin/sh\n{header}\n{command} "$@"\n'


def install(
    bindir: str,
    *,
    python: str = sys.executable,
    start_python: str | None = None,
    env: Mapping[str, str] | None = None,
) -> list[str]:
    """Write both launchers into ``bindir`` (mode 0755, replaced atomically); their paths."""
    os.makedirs(bindir, exist_ok=True)
    paths = []
    for name in _MODULES:
        path = os.path.join(bindir, name)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(script(name, python=python, start_python=start_python, env=env))
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m containerd_shim.launcher",
        description=f"Write fast launchers for {NAME} and {NAME_V1}.",
    )
    parser.add_argument("--bindir", default="/usr/local/sbin", help="where (default %(default)s)")
    parser.add_argument(
        "--python",
        default=sys.executable,
        help="the interpreter the shims run on (default: this one); CPython 3.12+ lets "
        "the shims share most of their memory (docs/benchmarks.md)",
    )
    parser.add_argument(
        "--start-python",
        help="the interpreter the v2 shim's start and delete run on (default: --python); "
        "they need the standard library only, and run twice per container: a statically "
        "linked python3 that starts sooner saves that time",
    )
    args = parser.parse_args(argv)
    for path in install(args.bindir, python=args.python, start_python=args.start_python):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
