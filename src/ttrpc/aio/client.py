"""asyncio ttrpc client: many concurrent calls multiplexed on one connection."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from typing import TypeVar, cast

from google.protobuf.message import Message

from ttrpc import address as _address
from ttrpc._calls import build_request, deadline_error, unpack_response
from ttrpc.context import Context
from ttrpc.protocol import MAX_MESSAGE_LENGTH, READ_SIZE, Buffer, CallFailed, ClientConnection
from ttrpc.status import ConnectionClosed, RpcError
from ttrpc.ttrpc_pb2 import Response

__all__ = ["Client", "connect"]

log = logging.getLogger("ttrpc")

T = TypeVar("T", bound=Message)


class _ClientProtocol(asyncio.BufferedProtocol):
    # Reading into one kept buffer spares a fresh allocation (and its page faults) per read.
    def __init__(self, client: Client) -> None:
        self._client = client
        self._view = memoryview(bytearray(READ_SIZE))

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        self._client._data_received(self._view[:nbytes])

    def connection_lost(self, exc: Exception | None) -> None:
        self._client._connection_lost(exc)


class Client:
    """A ttrpc connection for asyncio code.

    Create with :func:`connect` (or :meth:`from_socket`); close with
    :meth:`close` or ``async with``. Generated clients wrap one of these.
    """

    def __init__(
        self,
        *,
        max_message_length: int = MAX_MESSAGE_LENGTH,
        on_close: Callable[[], object] | None = None,
    ) -> None:
        self._transport: asyncio.BaseTransport | None = None
        self._conn = ClientConnection(max_message_length)
        self._waiters: dict[int, asyncio.Future[Response]] = {}
        self._on_close = on_close
        self._error: RpcError | None = None
        self._loop = asyncio.get_running_loop()
        self._closed: asyncio.Future[None] = self._loop.create_future()

    @classmethod
    async def from_socket(
        cls,
        sock: socket.socket,
        *,
        max_message_length: int = MAX_MESSAGE_LENGTH,
        on_close: Callable[[], object] | None = None,
    ) -> Client:
        """Wrap an already connected socket (it becomes the client's)."""
        client = cls(max_message_length=max_message_length, on_close=on_close)
        loop = asyncio.get_running_loop()
        client._transport, _ = await loop.create_unix_connection(
            lambda: _ClientProtocol(client), sock=sock
        )
        return client

    # -- calls -------------------------------------------------------------

    async def call(
        self,
        service: str,
        method: str,
        request: Message,
        response_type: type[T],
        ctx: Context | None = None,
    ) -> T:
        """One unary call; raises :class:`RpcError` for a non-OK status.

        Cancelling the awaiting task abandons the call (a late answer is dropped).
        """
        if self._error is not None:
            raise self._error
        wire, deadline = build_request(service, method, request, ctx)
        stream_id, frame = self._conn.send_request(wire)
        loop = self._loop
        future: asyncio.Future[Response] = loop.create_future()
        self._waiters[stream_id] = future
        transport = cast(asyncio.WriteTransport, self._transport)
        timer = None
        try:
            transport.write(frame)
            if deadline is not None:
                timer = loop.call_later(deadline - time.monotonic(), _expire, future)
            response = await future
        except BaseException:
            self._conn.abandon(stream_id)
            raise
        finally:
            del self._waiters[stream_id]
            if timer is not None:
                timer.cancel()
        return unpack_response(response, response_type)

    # -- connection events -------------------------------------------------

    def _data_received(self, data: Buffer) -> None:
        waiters = self._waiters
        for event in self._conn.receive_data(data):
            future = waiters.get(event.stream_id)
            if future is None or future.done():
                continue
            if isinstance(event, CallFailed):
                future.set_exception(event.error)
            else:
                future.set_result(event.response)

    def _connection_lost(self, exc: Exception | None) -> None:
        if self._error is None:
            reason = (
                "ttrpc: connection closed" if exc is None else f"ttrpc: connection closed: {exc}"
            )
            self._error = ConnectionClosed(reason)
        for future in self._waiters.values():
            if not future.done():
                future.set_exception(self._error)
        if not self._closed.done():
            self._closed.set_result(None)
        if self._on_close is not None:
            try:
                self._on_close()
            except Exception:
                log.exception("ttrpc: on_close callback failed")

    # -- lifecycle ---------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._error is not None

    async def close(self) -> None:
        """Close the connection; pending calls fail with :class:`ConnectionClosed`."""
        if self._error is None:
            self._error = ConnectionClosed()
        if self._transport is not None:
            self._transport.close()
        await asyncio.shield(self._closed)

    async def wait_closed(self) -> None:
        """Return once the connection is gone (closed by either side)."""
        await asyncio.shield(self._closed)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def _expire(future: asyncio.Future[Response]) -> None:
    if not future.done():
        future.set_exception(deadline_error())


async def connect(
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
    if isinstance(address, socket.socket):
        sock = address
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            target = _address.parse_unix_address(address)
            loop = asyncio.get_running_loop()
            await asyncio.wait_for(loop.sock_connect(sock, target), timeout)
        except BaseException:
            sock.close()
            raise
    return await Client.from_socket(sock, max_message_length=max_message_length, on_close=on_close)
