"""A fast launcher for the v2 shim binary: ``python -m containerd_shim.launcher [--bindir DIR]``.

containerd executes ``containerd-shim-pyrunc-v2`` twice per container
(``start``, then ``delete``) and waits for both. The console script pip
installs starts a full interpreter with site-packages first; here ``site``
alone costs 20-80 ms (``.pth`` hooks), more than our whole ``start``. The
launcher this writes is a two-line ``/bin/sh`` script that runs
``start``/``delete`` isolated and without site-packages (``python -I -S``),
the package's directory appended to ``sys.path``: both need only the
standard library and this package (the zygote does the heavy work).
Anything else (the daemon, a ``delete`` that has cleaning up to do and no
zygote) re-executes itself with the full interpreter
(:func:`containerd_shim.__main__.main`).

Put ``DIR`` ahead of the console scripts on containerd's ``PATH``, and write
it again after moving the installation: it names this interpreter and this
package's directory. (The v1 shim gains nothing: containerd runs it once, as
the daemon itself.)
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # typing's costs ``start`` an import (it uses package_root)
if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["NAME", "install", "script"]

NAME = "containerd-shim-pyrunc-v2"


def package_root() -> str:
    """The directory that holds the ``containerd_shim`` package (a ``sys.path`` entry)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def script(
    *,
    python: str = sys.executable,
    path_entry: str | None = None,
    env: Mapping[str, str] | None = None,
) -> str:
    """The text of the launcher (a ``/bin/sh`` script).

    ``env`` adds exported variables (for the processes the shim starts; the
    launched interpreter itself ignores ``PYTHON*`` variables).
    """
    import json
    import shlex

    entry = path_entry or package_root()
    bootstrap = (
        f"import sys; sys.argv[0] = {json.dumps(NAME)}; sys.path.append({json.dumps(entry)}); "
        "from containerd_shim.__main__ import main; sys.exit(main())"
    )
    lines = ["#!/bin/sh", f"# {NAME}: written by python -m containerd_shim.launcher"]
    for key, value in (env or {}).items():
        lines.append(f"{key}={shlex.quote(value)}; export {key}")
    lines.append(f'exec {shlex.quote(python)} -I -S -c {shlex.quote(bootstrap)} "$@"')
    return "\n".join(lines) + "\n"


def install(
    bindir: str, *, python: str = sys.executable, env: Mapping[str, str] | None = None
) -> str:
    """Write the launcher into ``bindir`` (mode 0755, replaced atomically); its path."""
    os.makedirs(bindir, exist_ok=True)
    path = os.path.join(bindir, NAME)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(script(python=python, env=env))
    os.chmod(tmp, 0o755)
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m containerd_shim.launcher",
        description=f"Write a fast launcher for {NAME}.",
    )
    parser.add_argument("--bindir", default="/usr/local/sbin", help="where (default %(default)s)")
    args = parser.parse_args(argv)
    print(install(args.bindir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
