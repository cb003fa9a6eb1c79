"""Status codes and the exception that carries them.

ttrpc reuses gRPC's status model: every failed call ends with a code, a
message and optional details (``google.protobuf.Any``). :class:`RpcError`
is raised by clients for a non-OK status and may be raised by handlers to
answer with a precise status.

Handlers that raise other exceptions are answered with a code chosen by
:func:`code_for_exception`:

====================================================  ===================
exception                                             code
====================================================  ===================
:class:`RpcError`                                     its own code
``asyncio.CancelledError``                            CANCELLED
``TimeoutError`` (includes ``asyncio.TimeoutError``)  DEADLINE_EXCEEDED
``NotImplementedError``                               UNIMPLEMENTED
``FileNotFoundError``, ``ProcessLookupError``,        NOT_FOUND
``KeyError``
``FileExistsError``                                   ALREADY_EXISTS
``PermissionError``                                   PERMISSION_DENIED
``ValueError``, ``TypeError``                         INVALID_ARGUMENT
``EOFError``                                          OUT_OF_RANGE
``BrokenPipeError``, ``ConnectionError``              UNAVAILABLE
anything else                                         UNKNOWN
====================================================  ===================

The message is ``str(exc)`` (the class name when that is empty).
"""

from __future__ import annotations

import enum
import sys
from collections.abc import Iterable, Sequence

from google.protobuf.any_pb2 import Any

from ttrpc.ttrpc_pb2 import Status

__all__ = ["Code", "ConnectionClosed", "RpcError", "code_for_exception", "status_from_exception"]


class Code(enum.IntEnum):
    """gRPC status codes, as used on the ttrpc wire."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16

    @classmethod
    def of(cls, value: int) -> Code | int:
        """The enum member for ``value``, or the bare int for codes we do not know."""
        try:
            return cls(value)
        except ValueError:
            return value


def _code_name(code: int) -> str:
    c = Code.of(code)
    return c.name if isinstance(c, Code) else str(c)


class RpcError(Exception):
    """A call ended with a non-OK status.

    ``details`` are ``google.protobuf.Any`` messages, carried unchanged.
    """

    def __init__(self, code: int, message: str = "", details: Iterable[Any] = ()) -> None:
        super().__init__(code, message)
        self.code: Code | int = Code.of(int(code))
        self.message = message
        self.details: Sequence[Any] = tuple(details)

    def __str__(self) -> str:
        return f"{_code_name(self.code)}: {self.message}" if self.message else _code_name(self.code)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({_code_name(self.code)}, {self.message!r})"

    def to_status(self) -> Status:
        """The wire form of this error."""
        return Status(code=int(self.code), message=self.message, details=self.details)

    @classmethod
    def from_status(cls, status: Status) -> RpcError:
        """Build the error a client raises for a received status."""
        return cls(status.code, status.message, status.details)


class ConnectionClosed(RpcError):
    """The connection went away; raised for every call that was pending on it (UNAVAILABLE)."""

    def __init__(self, message: str = "ttrpc: connection closed") -> None:
        super().__init__(Code.UNAVAILABLE, message)


_EXCEPTION_CODES: tuple[tuple[type[BaseException], Code], ...] = (
    (TimeoutError, Code.DEADLINE_EXCEEDED),
    (NotImplementedError, Code.UNIMPLEMENTED),
    (FileNotFoundError, Code.NOT_FOUND),
    (ProcessLookupError, Code.NOT_FOUND),
    (KeyError, Code.NOT_FOUND),
    (FileExistsError, Code.ALREADY_EXISTS),
    (PermissionError, Code.PERMISSION_DENIED),
    (ValueError, Code.INVALID_ARGUMENT),
    (TypeError, Code.INVALID_ARGUMENT),
    (EOFError, Code.OUT_OF_RANGE),
    (BrokenPipeError, Code.UNAVAILABLE),
    (ConnectionError, Code.UNAVAILABLE),
)


def code_for_exception(exc: BaseException) -> Code | int:
    """The status code a handler's exception is answered with (table in the module doc)."""
    if isinstance(exc, RpcError):
        return exc.code
    asyncio = sys.modules.get("asyncio")  # not imported here: blocking users need not pay for it
    if asyncio is not None and isinstance(exc, asyncio.CancelledError):
        return Code.CANCELLED
    for kind, code in _EXCEPTION_CODES:
        if isinstance(exc, kind):
            return code
    return Code.UNKNOWN


def status_from_exception(exc: BaseException) -> Status:
    """The wire status for a handler's exception."""
    if isinstance(exc, RpcError):
        return exc.to_status()
    message = str(exc) if not isinstance(exc, KeyError) else repr(exc.args[0]) if exc.args else ""
    return Status(code=int(code_for_exception(exc)), message=message or type(exc).__name__)
