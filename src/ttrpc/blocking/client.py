"""Blocking ttrpc client: thread-safe, one connection shared by any number of threads.

There is no background thread and no hidden event loop. Whichever calling
thread finds nobody reading becomes the reader: it reads frames, hands
other threads their responses, and passes the reader role on once its own
response has arrived (a leader/followers scheme). A lone caller therefore
sends and reads on its own thread, with no hand-off at all.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from google.protobuf.message import Message

from ttrpc import address as _address
from ttrpc._calls import build_request, deadline_error, unpack_response
from ttrpc.context import Context
from ttrpc.protocol import MAX_MESSAGE_LENGTH, READ_SIZE, CallFailed, ClientConnection
from ttrpc.status import ConnectionClosed, RpcError
from ttrpc.ttrpc_pb2 import Response

__all__ = ["Client", "connect"]

log = logging.getLogger("ttrpc")

T = TypeVar("T", bound=Message)


class _Waiter:
    """One call's slot. ``wake`` is held exactly while ``signalled`` is false."""

    __slots__ = ("done", "error", "response", "signalled", "wake")

    def __init__(self) -> None:
        self.wake = threading.Lock()
        self.wake.acquire()
        self.signalled = False
        self.done = False
        self.response: Response | None = None
        self.error: RpcError | None = None


class Client:
    """A ttrpc connection for threaded code; see :func:`connect`."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        max_message_length: int = MAX_MESSAGE_LENGTH,
        on_close: Callable[[], object] | None = None,
    ) -> None:
        sock.setblocking(True)
        self._sock = sock
        self._poll = select.poll()
        self._poll.register(sock.fileno(), select.POLLIN)
        self._conn = ClientConnection(max_message_length)
        # Reading into one kept buffer spares a fresh allocation (and its page faults) per read.
        self._view = memoryview(bytearray(READ_SIZE))
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._waiters: dict[int, _Waiter] = {}
        self._reading = False
        self._error: RpcError | None = None
        self._socket_closed = False
        self._on_close = on_close

    # -- calls -------------------------------------------------------------

    def call(
        self,
        service: str,
        method: str,
        request: Message,
        response_type: type[T],
        ctx: Context | None = None,
    ) -> T:
        """One unary call; raises :class:`RpcError` for a non-OK status. Safe from any thread."""
        wire, deadline = build_request(service, method, request, ctx)
        waiter = _Waiter()
        try:
            # Ids are allocated and written under one lock: the server requires them increasing.
            with self._send_lock:
                with self._lock:
                    if self._error is not None:
                        raise self._error
                    stream_id, frame = self._conn.send_request(wire)
                    self._waiters[stream_id] = waiter
                self._sock.sendall(frame)
        except OSError as exc:
            self._fail(exc)
        return unpack_response(self._wait(stream_id, waiter, deadline), response_type)

    def _wait(self, stream_id: int, waiter: _Waiter, deadline: float | None) -> Response:
        while True:
            with self._lock:
                if waiter.signalled:
                    # Re-arm: afterwards the lock is held, whether or not we consumed the signal.
                    waiter.signalled = False
                    waiter.wake.acquire(False)
                if waiter.done:
                    break
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    self._conn.abandon(stream_id)
                    del self._waiters[stream_id]
                    raise deadline_error()
                lead = not self._reading
                if lead:
                    self._reading = True
            if lead:
                self._read(waiter, deadline)
            else:
                waiter.wake.acquire(True, -1 if remaining is None else remaining)
        if waiter.error is not None:
            raise waiter.error
        assert waiter.response is not None
        return waiter.response

    def _read(self, waiter: _Waiter, deadline: float | None) -> None:
        """Read as the leader until our own call is done or its deadline passes."""
        sock = self._sock
        view = self._view  # only the reader uses it, and there is one reader at a time
        try:
            while not waiter.done:
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or not self._poll.poll(max(1, int(remaining * 1000))):
                        return
                n = sock.recv_into(view)
                if not n:
                    raise ConnectionResetError("peer closed the connection")
                with self._lock:
                    events = self._conn.receive_data(view[:n])
                    waiters = self._waiters
                    for event in events:
                        w = waiters.pop(event.stream_id, None)
                        if w is None:
                            continue
                        if isinstance(event, CallFailed):
                            w.error = event.error
                        else:
                            w.response = event.response
                        w.done = True
                        if w is not waiter:
                            self._signal(w)
        except OSError as exc:
            self._fail(exc)
        finally:
            with self._lock:
                self._reading = False
                for w in self._waiters.values():
                    if w is not waiter and not w.done:
                        self._signal(w)
                        break
                close_now = self._error is not None
            if close_now:
                self._close_socket()

    @staticmethod
    def _signal(waiter: _Waiter) -> None:
        # Caller holds self._lock.
        if not waiter.signalled:
            waiter.signalled = True
            waiter.wake.release()

    # -- failure and close -------------------------------------------------

    def _fail(self, exc: BaseException | None) -> None:
        """The connection is gone: fail every pending call, once."""
        with self._lock:
            if self._error is not None:
                return
            reason = (
                "ttrpc: connection closed" if exc is None else f"ttrpc: connection closed: {exc}"
            )
            self._error = error = ConnectionClosed(reason)
            for w in self._waiters.values():
                w.error = error
                w.done = True
                self._signal(w)
            self._waiters.clear()
            reading = self._reading
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        if not reading:
            self._close_socket()
        if self._on_close is not None:
            try:
                self._on_close()
            except Exception:
                log.exception("ttrpc: on_close callback failed")

    def _close_socket(self) -> None:
        # Only once nobody is inside recv(), so the fd number cannot be reused under a reader.
        with self._lock:
            if self._socket_closed or self._reading:
                return
            self._socket_closed = True
        self._sock.close()

    @property
    def closed(self) -> bool:
        return self._error is not None

    def close(self) -> None:
        """Close the connection; pending calls fail with :class:`ConnectionClosed`."""
        self._fail(None)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def connect(
    address: str | socket.socket,
    *,
    timeout: float | None = None,
    max_message_length: int = MAX_MESSAGE_LENGTH,
    on_close: Callable[[], object] | None = None,
) -> Client:
    """Connect to a ttrpc server.

    ``address`` is ``unix:///path``, ``unix://@name``, a bare path, ``fd://N``
    or an already connected socket.
    """
    sock = (
        address if isinstance(address, socket.socket) else _address.connect_socket(address, timeout)
    )
    return Client(sock, max_message_length=max_message_length, on_close=on_close)
