"""``ttrpc``: a command-line client for any ttrpc service, with containerd's API built in.

::

    ttrpc call ADDRESS SERVICE/METHOD [-d JSON|@FILE|-] [-m K=V] [-t 5s] [-f json|text]
    ttrpc list [SERVICE]
    ttrpc describe [SERVICE[/METHOD]|TYPE]
    ttrpc shims [--state DIR] [-n NS] [-f table|json]
    ttrpc completion bash|zsh

Run as ``ttrpc`` (the console script) or ``python -m ttrpc.cli``; see
``docs/cli.md``. :func:`main` takes the arguments and returns the exit code.
"""

from ttrpc.cli.app import main

__all__ = ["main"]
