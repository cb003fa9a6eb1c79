"""Exit codes and the one-line errors the ``ttrpc`` command reports.

Every failure ends as one line on stderr and an exit code:

==========  ==============================================================
exit code   meaning
==========  ==============================================================
0           the call answered OK
1-16        the call failed with that gRPC status code (``4`` is
            DEADLINE_EXCEEDED, ``12`` UNIMPLEMENTED, ``14`` UNAVAILABLE,
            which is also what an unreachable socket gives); codes outside
            1-63 exit with 2 (UNKNOWN)
64          usage: bad flags, bad ``--timeout``/``--metadata``, an unknown
            service, method or type
65          bad data: request JSON that does not parse or does not fit the
            message, a ``.proto`` that does not compile, a bad descriptor set
66          an input file cannot be read (``-d @FILE``, ``--proto``, ...)
69          ``--proto`` without protoc
70          internal error (a bug; ``TTRPC_DEBUG=1`` shows the traceback)
130         interrupted (Ctrl-C)
==========  ==============================================================
"""

from __future__ import annotations

from ttrpc.status import Code

__all__ = [
    "EXIT_DATAERR",
    "EXIT_INTERRUPTED",
    "EXIT_NOINPUT",
    "EXIT_OK",
    "EXIT_SOFTWARE",
    "EXIT_UNAVAILABLE",
    "EXIT_USAGE",
    "CliError",
    "Reported",
    "exit_code_for_status",
    "one_line",
    "status_name",
]

EXIT_OK = 0
EXIT_USAGE = 64  # sysexits.h EX_USAGE
EXIT_DATAERR = 65  # EX_DATAERR
EXIT_NOINPUT = 66  # EX_NOINPUT
EXIT_UNAVAILABLE = 69  # EX_UNAVAILABLE
EXIT_SOFTWARE = 70  # EX_SOFTWARE
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


class CliError(Exception):
    """A failure the command reports as ``ttrpc: <message>`` and exits with ``exit_code``."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message


class Reported(Exception):
    """A failure already printed in full: the command only exits with ``exit_code``."""

    def __init__(self, exit_code: int) -> None:
        super().__init__(exit_code)
        self.exit_code = exit_code


def exit_code_for_status(code: int) -> int:
    """The exit code for a call that ended with status ``code`` (its number; 2 if out of range)."""
    if code == Code.OK:
        return EXIT_OK
    return int(code) if 1 <= code <= 63 else int(Code.UNKNOWN)


def status_name(code: int) -> str:
    """``NOT_FOUND`` for 5; the number itself for codes gRPC does not define."""
    known = Code.of(code)
    return known.name if isinstance(known, Code) else str(code)


def one_line(text: str) -> str:
    """``text`` with its lines joined, so that a message never spans several lines."""
    parts = [part.strip() for part in text.splitlines()]
    return " ".join(part for part in parts if part)
