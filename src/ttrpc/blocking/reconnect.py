"""A client that redials its server when the connection is lost (blocking)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from google.protobuf.message import Message

from ttrpc._backoff import Backoff
from ttrpc.blocking.client import STREAM_STALL_TIMEOUT, Client, ClientStream, connect
from ttrpc.context import Context
from ttrpc.interceptors import CallInfo, Interceptor, check_interceptors
from ttrpc.protocol import MAX_MESSAGE_LENGTH, STREAM_BUFFER_SIZE
from ttrpc.status import Code, RpcError

__all__ = ["ReconnectingClient"]


class ReconnectingClient(Client):
    """A :class:`Client` for long-lived callers: it dials on first use and redials after
    the connection is lost, with exponential backoff. Thread-safe.

    While the server is unreachable calls fail fast with UNAVAILABLE (no waiting,
    no dial) until the backoff allows the next attempt, which the next call makes
    (one thread dials; the others wait for it). Calls in flight when a connection
    drops fail with :class:`~ttrpc.ConnectionClosed` and are not retried. It stands
    in for a :class:`Client` everywhere, generated clients included.
    """

    def __init__(
        self,
        address: str,
        *,
        backoff: Backoff | None = None,
        connect_timeout: float | None = 5.0,
        max_message_length: int = MAX_MESSAGE_LENGTH,
        interceptors: Sequence[Interceptor] | None = None,
        stream_buffer_size: int = STREAM_BUFFER_SIZE,
        stream_stall_timeout: float = STREAM_STALL_TIMEOUT,
    ) -> None:
        # Not Client.__init__: this object owns no connection itself.
        self.address = address
        self.backoff = backoff or Backoff()
        self._connect_timeout = connect_timeout
        self._options: dict[str, Any] = {
            "max_message_length": max_message_length,
            "stream_buffer_size": stream_buffer_size,
            "stream_stall_timeout": stream_stall_timeout,
        }
        self._interceptors = check_interceptors(interceptors)
        self._chains: dict[tuple[str, str, type[Message]], Any] = {}
        self._dial_lock = threading.Lock()
        self._current: Client | None = None
        self._closed_for_good = False
        self.connects = 0  # successful dials so far

    def _connection(self) -> Client:
        current = self._current
        if current is not None and not current.closed:
            return current
        with self._dial_lock:
            if self._closed_for_good:
                raise RpcError(Code.UNAVAILABLE, "ttrpc: client closed")
            current = self._current
            if current is not None and not current.closed:
                return current  # another thread dialled meanwhile
            self.backoff.check(self.address)  # fail fast while the server is down
            try:
                client = connect(self.address, timeout=self._connect_timeout, **self._options)
            except OSError as exc:
                self.backoff.failed(exc)
                raise RpcError(
                    Code.UNAVAILABLE,
                    f"ttrpc: cannot connect to {self.address}: {exc or 'timed out'}",
                ) from None
            self.backoff.succeeded()
            self.connects += 1
            self._current = client
            return client

    def connect(self) -> None:
        """Dial now (if not connected); raises UNAVAILABLE when that fails."""
        self._connection()

    def _call(
        self,
        service: str,
        method: str,
        request: Message,
        ctx: Context | None,
        *,
        response_type: Any,
    ) -> Any:
        return self._connection()._call(service, method, request, ctx, response_type=response_type)

    def _open_stream(
        self,
        info: CallInfo,
        response_type: Any,
        request: Message | None,
        ctx: Context | None,
    ) -> ClientStream[Any]:
        return self._connection()._open_stream(info, response_type, request, ctx)

    @property
    def connected(self) -> bool:
        return self._current is not None and not self._current.closed

    @property
    def closed(self) -> bool:
        return self._closed_for_good

    def close(self) -> None:
        with self._dial_lock:
            self._closed_for_good = True
            current = self._current
        if current is not None:
            current.close()

    def __enter__(self) -> ReconnectingClient:
        return self
