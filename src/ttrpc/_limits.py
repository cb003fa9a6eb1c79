"""Server limits shared by the asyncio and blocking servers: defaults, checks, messages."""

from __future__ import annotations

import errno
import logging
import threading
import time

log = logging.getLogger("ttrpc")

#: Default bound on the connections a server serves at once.
MAX_CONNECTIONS = 1024
#: Default bound on the unary calls in flight on one connection; past it the server
#: stops reading that connection until some of them finish.
MAX_CALLS_PER_CONNECTION = 1024
#: Connections over the limit being answered at once; more are closed without a reply.
MAX_REFUSING = 512
#: Seconds a connection over the limit may take to send its first request.
REFUSAL_TIMEOUT = 2.0
#: Bytes read at once from a connection over the limit (request headers are all it needs).
REFUSAL_READ_SIZE = 1024

#: accept() errors that mean "out of resources for now": back off and try again.
ACCEPT_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: accept() errors that concern only the connection being accepted: go on at once.
ACCEPT_CONNECTION_ERRORS = frozenset(
    {errno.ECONNABORTED, errno.EPROTO, errno.EINTR, errno.EAGAIN, errno.EPERM}
)


def check_max_connections(value: int | None) -> int | None:
    """Validate ``max_connections``: None (no limit) or a count, 0 refusing every connection."""
    if value is not None and (isinstance(value, bool) or value < 0):
        raise ValueError("max_connections must be None or a count >= 0")
    return value


def check_max_calls(value: int | None) -> int | None:
    """Validate ``max_calls_per_connection``: None (no limit) or a count >= 1."""
    if value is not None and (isinstance(value, bool) or value < 1):
        raise ValueError("max_calls_per_connection must be None or a count >= 1")
    return value


def resume_below(limit: int) -> int:
    """Calls in flight under which a connection paused at ``limit`` is read again."""
    return limit - limit // 4


def refusal_message(limit: int) -> str:
    return (
        f"ttrpc: too many connections (the server's limit is {limit}); "
        "closing this connection, try again later"
    )


class RateLimitedLog:
    """A warning logged at most once per ``interval`` seconds, with how often it was due."""

    def __init__(self, interval: float = 10.0) -> None:
        self._interval = interval
        self._lock = threading.Lock()
        self._next = 0.0
        self._suppressed = 0

    def warning(self, message: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            if now < self._next:
                self._suppressed += 1
                return
            suppressed, self._suppressed = self._suppressed, 0
            self._next = now + self._interval
        if suppressed:
            log.warning(message + " (%d more since the last report)", *args, suppressed)
        else:
            log.warning(message, *args)
