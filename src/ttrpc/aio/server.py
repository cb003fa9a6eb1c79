"""asyncio ttrpc server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from typing import cast

from google.protobuf.message import Message

from ttrpc import address as _address
from ttrpc.context import Context
from ttrpc.handshake import Handshake, PeerCredentials, peer_credentials
from ttrpc.protocol import MAX_MESSAGE_LENGTH, READ_SIZE, RequestReceived, ServerConnection
from ttrpc.service import Method, Service, ServiceProvider, ServiceRegistry, encode_result
from ttrpc.status import Code, RpcError, status_from_exception
from ttrpc.ttrpc_pb2 import Status

__all__ = ["Server"]

log = logging.getLogger("ttrpc")

_DEADLINE_STATUS = Status(code=Code.DEADLINE_EXCEEDED, message="context deadline exceeded")


class _Connection(asyncio.BufferedProtocol):
    """One accepted connection: reads requests, runs each handler in its own task."""

    def __init__(self, server: Server) -> None:
        self._server = server
        self._loop = asyncio.get_running_loop()
        # Reading into one kept buffer spares a fresh allocation (and its page faults) per read.
        self._view = memoryview(bytearray(READ_SIZE))
        self._conn = ServerConnection(server.max_message_length)
        self._transport: asyncio.Transport | None = None
        self._peer: PeerCredentials | None = None
        self._calls: dict[int, tuple[asyncio.Task[None], Context]] = {}
        self._closing = False

    @property
    def idle(self) -> bool:
        return not self._calls

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing asyncio.Transport.
        self._transport = transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                self._peer = peer_credentials(sock)
            except OSError:
                self._peer = None
        handshake = self._server.handshake
        if handshake is not None and not handshake(self._peer):
            self._closing = True
            transport.abort()
            return
        self._server._connections.add(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        if self._closing:
            return
        conn = self._conn
        events = conn.receive_data(self._view[:nbytes])
        out = conn.data_to_send()
        transport = self._transport
        assert transport is not None
        if out:
            transport.write(out)
        for event in events:
            self._start(event)

    def _start(self, event: RequestReceived) -> None:
        stream_id = event.stream_id
        try:
            method, message, ctx = self._server._registry.prepare(event.request, self._peer)
        except RpcError as exc:
            self._write(self._conn.encode_error(stream_id, exc.to_status()))
            return
        if ctx.deadline is not None and ctx.time_remaining() <= 0:  # type: ignore[operator]
            self._write(self._conn.encode_error(stream_id, _DEADLINE_STATUS))
            return
        task = self._loop.create_task(self._run(stream_id, method, message, ctx))
        self._calls[stream_id] = (task, ctx)

    async def _run(self, stream_id: int, method: Method, message: Message, ctx: Context) -> None:
        conn = self._conn
        try:
            if ctx.deadline is None:
                result = await method.handler(message, ctx)
            else:
                remaining = ctx.time_remaining()
                result = await asyncio.wait_for(method.handler(message, ctx), remaining)
            frame = conn.encode_response(stream_id, encode_result(method, result))
        except asyncio.TimeoutError:
            frame = conn.encode_error(stream_id, _DEADLINE_STATUS)
        except asyncio.CancelledError:
            # Only the connection going away cancels a handler: nobody to answer.
            self._calls.pop(stream_id, None)
            raise
        except Exception as exc:
            if not isinstance(exc, RpcError):
                log.debug("ttrpc: handler %s raised", ctx.method, exc_info=True)
            frame = conn.encode_error(stream_id, status_from_exception(exc))
        self._calls.pop(stream_id, None)
        self._write(frame)
        if not self._calls and self._server._shutting_down:
            self.close()

    def _write(self, frame: bytes) -> None:
        if not self._closing and self._transport is not None:
            self._transport.write(frame)

    def close(self) -> None:
        if self._transport is not None:
            self._closing = True
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._closing = True
            self._transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        for task, ctx in self._calls.values():
            ctx.cancel()
            task.cancel()
        self._calls.clear()
        self._server._connection_closed(self)


class Server:
    """Serves registered services to any number of connections, on one event loop.

    ::

        server = Server(handshake=require_same_user())
        server.register(MyService())
        await server.start("unix:///run/my.sock")
        ...
        await server.shutdown(timeout=5)

    ``handshake`` decides, from the peer's credentials, whether a connection
    is served (refused ones are closed without a reply).
    ``on_connection_closed`` is called after each connection goes away.
    """

    def __init__(
        self,
        *,
        handshake: Handshake | None = None,
        max_message_length: int = MAX_MESSAGE_LENGTH,
        on_connection_closed: Callable[[], object] | None = None,
    ) -> None:
        self.handshake = handshake
        self.max_message_length = max_message_length
        self._on_connection_closed = on_connection_closed
        self._registry = ServiceRegistry(asynchronous=True)
        self._servers: list[asyncio.AbstractServer] = []
        self._owned_addresses: list[str] = []
        self._connections: set[_Connection] = set()
        self._shutting_down = False
        self._drained: asyncio.Event | None = None
        self._done: asyncio.Event | None = None

    def register(self, service: Service | ServiceProvider) -> None:
        """Add a service (a :class:`Service` or a generated service object)."""
        self._registry.register(service)

    @property
    def services(self) -> dict[str, Service]:
        return dict(self._registry.services)

    async def start(self, listener: str | socket.socket) -> None:
        """Start serving on an address (the socket is created 0600) or a listening socket.

        Returns once the server accepts connections; call again to serve more listeners.
        """
        if self._shutting_down:
            raise RuntimeError("server is shut down")
        if isinstance(listener, str):
            sock = _address.listen(listener)
            self._owned_addresses.append(listener)
        else:
            sock = listener
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        if self._done is None:
            self._done = asyncio.Event()
        server = await loop.create_unix_server(lambda: _Connection(self), sock=sock)
        self._servers.append(server)

    async def serve_forever(self) -> None:
        """Block until the server is shut down or closed."""
        if self._done is None:
            raise RuntimeError("start() the server first")
        await self._done.wait()

    def _stop_listening(self) -> None:
        for server in self._servers:
            server.close()
        self._servers.clear()
        for addr in self._owned_addresses:
            _address.unlink_socket(addr)
        self._owned_addresses.clear()

    async def shutdown(self, timeout: float | None = None) -> bool:
        """Stop accepting, let calls in flight finish, close connections as they go idle.

        After ``timeout`` seconds whatever is still open is closed. Returns
        True if every call finished in time.
        """
        self._shutting_down = True
        self._stop_listening()
        for conn in list(self._connections):
            if conn.idle:
                conn.close()
        graceful = True
        try:
            await asyncio.wait_for(self._wait_drained(), timeout)
        except asyncio.TimeoutError:
            graceful = False
        await self.close()
        return graceful

    async def _wait_drained(self) -> None:
        if self._connections:
            self._drained = asyncio.Event()
            await self._drained.wait()

    async def close(self) -> None:
        """Close listeners and every connection now; handlers in flight are cancelled."""
        self._shutting_down = True
        self._stop_listening()
        for conn in list(self._connections):
            conn.abort()
        # Transports report connection_lost on a later loop iteration.
        await self._wait_drained()
        if self._done is not None:
            self._done.set()

    def _connection_closed(self, conn: _Connection) -> None:
        self._connections.discard(conn)
        if not self._connections and self._drained is not None:
            self._drained.set()
        if self._on_connection_closed is not None:
            try:
                self._on_connection_closed()
            except Exception:
                log.exception("ttrpc: on_connection_closed callback failed")

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        with contextlib.suppress(Exception):
            await self.close()
