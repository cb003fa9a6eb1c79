"""asyncio ttrpc server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, cast

from google.protobuf.message import Message

from ttrpc import _limits
from ttrpc import address as _address
from ttrpc._calls import decode_message, serialize, stalled_error
from ttrpc.context import Context
from ttrpc.handshake import Handshake, PeerCredentials, log_refusal, peer_credentials
from ttrpc.interceptors import CallInfo, Interceptor, check_interceptors
from ttrpc.protocol import (
    FLAG_REMOTE_OPEN,
    MAX_MESSAGE_LENGTH,
    STREAM_BUFFER_SIZE,
    RefusingConnection,
    RequestReceived,
    ServerConnection,
    StreamEnded,
    StreamMessage,
    StreamReset,
    read_buffer,
)
from ttrpc.service import Method, Service, ServiceProvider, ServiceRegistry, encode_result
from ttrpc.status import Code, RpcError, status_from_exception
from ttrpc.ttrpc_pb2 import Request, Status

__all__ = ["Server", "ServerStream"]

log = logging.getLogger("ttrpc")

_DEADLINE_STATUS = Status(code=Code.DEADLINE_EXCEEDED, message="context deadline exceeded")
_COALESCE = 64 * 1024
#: Seconds a handler may leave its full receive buffer untouched before its stream fails.
STREAM_STALL_TIMEOUT = 1.0

# Why a connection is not being read (any of them pauses it; reading resumes once none is left).
_PAUSED_BACKLOG = 1  # a stream's receive buffer is full
_PAUSED_WRITE = 2  # the transport's write buffer is over its high-water mark
_PAUSED_CALLS = 4  # max_calls_per_connection unary calls are in flight

_NO_BUFFER = memoryview(b"")


class _Connection(asyncio.BufferedProtocol):
    """One accepted connection: reads requests, runs each handler in its own task."""

    def __init__(self, server: Server) -> None:
        self._server = server
        self._loop = asyncio.get_running_loop()
        self._view = _NO_BUFFER  # allocated once the connection is served
        self._conn = ServerConnection(server.max_message_length, server.stream_buffer_size)
        self._max_calls = server.max_calls_per_connection
        self._calls_resume = 0 if self._max_calls is None else _limits.resume_below(self._max_calls)
        self._transport: asyncio.Transport | None = None
        self._peer: PeerCredentials | None = None
        self._calls: dict[int, tuple[asyncio.Task[None], Context]] = {}
        self._streams: dict[int, ServerStream] = {}
        self._closing = False
        self._wbuf = bytearray()
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._paused = 0  # _PAUSED_* reasons
        self._stall_timer: asyncio.TimerHandle | None = None
        self._progress = 0.0

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
            log_refusal(self._peer)
            self._closing = True
            transport.abort()
            return
        server = self._server
        limit = server.max_connections
        if limit is not None and len(server._connections) >= limit:
            # Over the limit: another protocol answers this connection's requests and closes it.
            self._closing = True
            server._refuse(transport, limit)
            return
        # Reading into one kept buffer spares a fresh allocation (and its page faults) per read.
        self._view = read_buffer()
        server._connections.add(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        if self._closing:
            return
        conn = self._conn
        events = conn.receive_data(self._view[:nbytes])
        out = conn.data_to_send()
        if out:
            self._write(out)
        for event in events:
            if type(event) is RequestReceived:
                self._start(event)
                continue
            stream = self._streams.get(event.stream_id)
            if type(event) is StreamMessage:
                if stream is None:
                    conn.message_consumed(event.stream_id, len(event.payload))
                else:
                    stream._push(event.payload)
            elif stream is None:
                continue
            elif type(event) is StreamEnded:
                stream._end_input()
            elif type(event) is StreamReset:
                stream._reset()
        if conn.backlogged and not self._paused & _PAUSED_BACKLOG:
            self._pause_reading()
        limit = self._max_calls
        if limit is not None and len(self._calls) - len(self._streams) >= limit:
            self._pause(_PAUSED_CALLS)

    def _start(self, event: RequestReceived) -> None:
        stream_id = event.stream_id
        registry = self._server._registry
        try:
            method, message, ctx = registry.prepare(event.request, self._peer)
        except RpcError as exc:
            self._write(self._conn.encode_error(stream_id, exc.to_status()))
            return
        if ctx.deadline is not None and ctx.time_remaining() <= 0:  # type: ignore[operator]
            self._write(self._conn.encode_error(stream_id, _DEADLINE_STATUS))
            return
        if method.client_streaming or method.server_streaming:
            self._start_stream(stream_id, event, method, ctx)
            return
        handler = method.handler
        if registry.intercepted:
            handler = registry.chain(method, handler)
        task = self._loop.create_task(self._run(stream_id, handler, method, message, ctx))
        self._calls[stream_id] = (task, ctx)

    async def _run(
        self,
        stream_id: int,
        handler: Callable[[Any, Context], Any],
        method: Method,
        message: Message,
        ctx: Context,
    ) -> None:
        conn = self._conn
        try:
            if self._write_paused:
                # The peer is not reading: start no handler whose answer would pile up.
                await self._drain()
            if ctx.deadline is None:
                result = await handler(message, ctx)
            else:
                remaining = ctx.time_remaining()
                result = await asyncio.wait_for(handler(message, ctx), remaining)
                if ctx.time_remaining() <= 0:  # type: ignore[operator]
                    raise asyncio.TimeoutError  # done at its deadline: answered as expired
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
        if self._paused & _PAUSED_CALLS:
            self._calls_done()
        if not self._calls and self._server._shutting_down:
            self.close()

    # -- streams ---------------------------------------------------------------

    def _start_stream(
        self, stream_id: int, event: RequestReceived, method: Method, ctx: Context
    ) -> None:
        request: Request = event.request
        registry = self._server._registry
        stream = ServerStream(self, stream_id, method, ctx, registry.call_info(method))
        if not method.client_streaming:
            # Server-streaming: the request carries the one message, even an empty one.
            stream._first = request.payload
            stream._input_open = False
        else:
            # Go's clients may put a first message in the request; ours never do.
            if request.payload:
                stream._first = request.payload
            stream._input_open = bool(event.flags & FLAG_REMOTE_OPEN)
        invoke: Callable[[ServerStream], Any] = _run_stream_handler
        if registry.intercepted:
            invoke = registry.chain(method, _run_stream_handler)
        self._streams[stream_id] = stream
        task = self._loop.create_task(self._run_stream(stream, invoke))
        self._calls[stream_id] = (task, ctx)

    async def _run_stream(
        self, stream: ServerStream, invoke: Callable[[ServerStream], Any]
    ) -> None:
        conn = self._conn
        stream_id = stream.stream_id
        method = stream._method
        ctx = stream.ctx
        try:
            if ctx.deadline is None:
                result = await invoke(stream)
            else:
                result = await asyncio.wait_for(invoke(stream), ctx.time_remaining())
                if ctx.time_remaining() <= 0:  # type: ignore[operator]
                    raise asyncio.TimeoutError  # done at its deadline: answered as expired
            if method.server_streaming:
                frame = conn.encode_end(stream_id)
            else:
                frame = conn.encode_response(stream_id, encode_result(method, result))
        except asyncio.TimeoutError:
            frame = conn.encode_error(stream_id, _DEADLINE_STATUS)
        except asyncio.CancelledError:
            if stream._failure is None:
                self._end_stream(stream_id)
                if not stream._reset_by_peer:
                    raise  # the connection went away: nobody to answer
                # The core answered the client already (a protocol error on the stream).
                if not self._calls and self._server._shutting_down:
                    self.close()
                return
            frame = conn.encode_error(stream_id, stream._failure.to_status())
        except Exception as exc:
            if not isinstance(exc, RpcError):
                log.debug("ttrpc: handler %s raised", ctx.method, exc_info=True)
            frame = conn.encode_error(stream_id, status_from_exception(exc))
        stream._finished = True
        self._end_stream(stream_id)
        if not stream._reset_by_peer:
            self._write(frame)
        else:
            conn.forget_stream(stream_id)
        if not self._calls and self._server._shutting_down:
            self.close()

    def _end_stream(self, stream_id: int) -> None:
        self._calls.pop(stream_id, None)
        stream = self._streams.pop(stream_id, None)
        if stream is not None:
            stream._finished = True
            stream._wake()
        self._check_backlog()

    # -- flow control ----------------------------------------------------------------

    def _pause(self, reason: int) -> None:
        if not self._paused and self._transport is not None and not self._closing:
            self._transport.pause_reading()
        self._paused |= reason

    def _unpause(self, reason: int) -> None:
        if self._paused & reason:
            self._paused &= ~reason
            if not self._paused and self._transport is not None and not self._closing:
                self._transport.resume_reading()

    def _calls_done(self) -> None:
        if len(self._calls) - len(self._streams) < self._calls_resume:
            self._unpause(_PAUSED_CALLS)

    # -- receive buffers -----------------------------------------------------------

    def _pause_reading(self) -> None:
        if self._transport is None or self._closing:
            return
        self._pause(_PAUSED_BACKLOG)
        self._progress = self._loop.time()
        self._stall_timer = self._loop.call_later(
            self._server.stream_stall_timeout, self._stall_check
        )

    def _consumed(self, stream_id: int, nbytes: int) -> None:
        self._conn.message_consumed(stream_id, nbytes)
        if self._paused & _PAUSED_BACKLOG:
            self._progress = self._loop.time()
            self._check_backlog()

    def _check_backlog(self) -> None:
        if self._paused & _PAUSED_BACKLOG and not self._conn.backlogged:
            if self._stall_timer is not None:
                self._stall_timer.cancel()
                self._stall_timer = None
            self._unpause(_PAUSED_BACKLOG)

    def _stall_check(self) -> None:
        self._stall_timer = None
        if not self._paused & _PAUSED_BACKLOG:
            return
        timeout = self._server.stream_stall_timeout
        idle = self._loop.time() - self._progress
        if idle < timeout:
            self._stall_timer = self._loop.call_later(timeout - idle, self._stall_check)
            return
        for stream_id in self._conn.full_streams():
            stream = self._streams.get(stream_id)
            if stream is not None:
                stream._fail(stalled_error(stream_id, timeout))
            else:
                self._conn.forget_stream(stream_id)
        self._check_backlog()

    # -- writing -------------------------------------------------------------

    def _write(self, frame: bytes) -> None:
        if not self._closing and self._transport is not None:
            if self._wbuf:
                self._flush()
            self._transport.write(frame)

    def _write_data(self, frame: bytes) -> bool:
        buf = self._wbuf
        if not buf:
            self._loop.call_soon(self._flush)
        buf += frame
        if len(buf) >= _COALESCE:
            self._flush()
            return True
        return False

    def _flush(self) -> None:
        if self._wbuf and not self._closing and self._transport is not None:
            self._transport.write(bytes(self._wbuf))
        self._wbuf.clear()

    # The transport's write buffer passed its high-water mark: the peer is not reading.
    # Until it drains, no more requests are read, no new unary handler starts and stream
    # senders wait (ServerStream.send), so what is buffered stays bounded.

    @property
    def _write_paused(self) -> bool:
        return bool(self._paused & _PAUSED_WRITE)

    def pause_writing(self) -> None:
        self._pause(_PAUSED_WRITE)

    def resume_writing(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for future in waiters:
            if not future.done():
                future.set_result(None)
        self._unpause(_PAUSED_WRITE)

    async def _drain(self) -> None:
        while self._write_paused and not self._closing:
            future: asyncio.Future[None] = self._loop.create_future()
            self._drain_waiters.append(future)
            await future

    # -- lifecycle -------------------------------------------------------------

    def close(self) -> None:
        if self._transport is not None:
            self._flush()
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
        for stream in self._streams.values():
            stream._finished = True
            stream._wake()
        self._streams.clear()
        self.resume_writing()
        if self._stall_timer is not None:
            self._stall_timer.cancel()
        self._server._connection_closed(self)


class _Refusal(asyncio.BufferedProtocol):
    """A connection over the server's limit: each request it sends is answered with
    RESOURCE_EXHAUSTED, then it is closed (once a request has been answered, or after
    :data:`~ttrpc._limits.REFUSAL_TIMEOUT` seconds, whichever comes first)."""

    def __init__(self, server: Server, transport: asyncio.Transport, limit: int) -> None:
        self._server = server
        self._transport = transport
        self._conn = RefusingConnection(Code.RESOURCE_EXHAUSTED, _limits.refusal_message(limit))
        self._view = memoryview(bytearray(_limits.REFUSAL_READ_SIZE))
        self._timer = asyncio.get_running_loop().call_later(
            _limits.REFUSAL_TIMEOUT, transport.abort
        )
        self._done = False

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        if self._done:
            return
        conn = self._conn
        out = conn.receive_data(self._view[:nbytes])
        if out:
            self._transport.write(out)
        if conn.answered and not conn.mid_frame:
            # close() sends what is buffered first; the timer aborts a peer that never reads.
            self._done = True
            self._transport.close()

    def eof_received(self) -> bool | None:
        return None  # the peer is done: close

    def connection_lost(self, exc: Exception | None) -> None:
        self._timer.cancel()
        self._server._refusal_closed(self)

    def abort(self) -> None:
        self._transport.abort()


class ServerStream:
    """One streaming call on an asyncio server: what stream interceptors get.

    Handlers see it through the iterators they are given; interceptors may
    call :meth:`recv` and :meth:`send` themselves, or wrap it.
    ``ctx`` is the call's :class:`~ttrpc.Context`, ``info`` its
    :class:`~ttrpc.interceptors.CallInfo`.
    """

    def __init__(
        self,
        connection: _Connection,
        stream_id: int,
        method: Method,
        ctx: Context,
        info: CallInfo,
    ) -> None:
        self._connection = connection
        self.stream_id = stream_id
        self._method = method
        self.ctx = ctx
        self.info = info
        self._first: bytes | None = None
        self._queue: deque[bytes] = deque()
        self._input_open = True
        self._waiter: asyncio.Future[None] | None = None
        self._finished = False
        self._reset_by_peer = False
        self._failure: RpcError | None = None

    async def recv(self) -> Message | None:
        """The client's next message; None once it has closed its side."""
        first = self._first
        if first is not None:
            self._first = None
            return decode_message(first, self._method.request_type)
        queue = self._queue
        while not queue:
            if not self._input_open or self._finished:
                if self._failure is not None:
                    raise self._failure
                return None
            waiter = self._connection._loop.create_future()
            self._waiter = waiter
            try:
                await waiter
            finally:
                self._waiter = None
        payload = queue.popleft()
        self._connection._consumed(self.stream_id, len(payload))
        return decode_message(payload, self._method.request_type)

    def __aiter__(self) -> AsyncIterator[Message]:
        return self._requests()

    async def _requests(self) -> AsyncIterator[Message]:
        while True:
            message = await self.recv()
            if message is None:
                return
            yield message

    async def send(self, message: Message) -> None:
        """Send one message to the client (server-streaming and bidi methods)."""
        if self._finished:
            raise self._failure or RpcError(Code.CANCELLED, "ttrpc: the call has ended")
        connection = self._connection
        frame = connection._conn.encode_message(
            self.stream_id, serialize(message, self._method.response_type)
        )
        if connection._write_data(frame):
            await asyncio.sleep(0)  # a full batch went out: let the loop breathe
        if connection._write_paused:
            await connection._drain()

    # -- driven by the connection --

    def _push(self, payload: bytes) -> None:
        self._queue.append(payload)
        self._wake()

    def _end_input(self) -> None:
        self._input_open = False
        self._wake()

    def _reset(self) -> None:
        """The core answered a protocol error on this stream: drop the handler quietly."""
        self._reset_by_peer = True
        self._finished = True
        self._cancel_handler()

    def _fail(self, error: RpcError) -> None:
        """End the call with ``error`` (answered once the handler is cancelled)."""
        self._failure = error
        self._queue.clear()
        self._cancel_handler()

    def _cancel_handler(self) -> None:
        entry = self._connection._calls.get(self.stream_id)
        if entry is not None:
            entry[0].cancel()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


async def _aiterate(result: Any) -> AsyncIterator[Any]:
    """What a streaming handler returned, as an async iterator."""
    if not hasattr(result, "__aiter__") and hasattr(result, "__await__"):
        result = await result
    if not hasattr(result, "__aiter__"):
        raise RpcError(
            Code.INTERNAL,
            f"ttrpc: streaming handler returned {type(result).__name__}, not an async iterator",
        )
    async for message in result:
        yield message


async def _run_stream_handler(stream: ServerStream) -> Message | None:
    """Drive a streaming handler of any kind over its stream (the chain's innermost step)."""
    method = stream._method
    ctx = stream.ctx
    if method.client_streaming:
        requests = stream._requests()
        if not method.server_streaming:
            result = method.handler(requests, ctx)
            return cast(Message, await result)
        output = method.handler(requests, ctx)
    else:
        request = await stream.recv()
        if request is None:
            raise RpcError(Code.INVALID_ARGUMENT, "ttrpc: server-streaming call without a request")
        output = method.handler(request, ctx)
    async for message in _aiterate(output):
        await stream.send(message)
    return None


class Server:
    """Serves registered services to any number of connections, on one event loop.

    ::

        server = Server(handshake=require_same_user())
        server.register(MyService())
        await server.start("unix:///run/my.sock")
        ...
        await server.shutdown(timeout=5)

    ``handshake`` decides, from the peer's credentials, whether a connection
    is served (refused ones are closed without a reply, and logged).
    ``interceptors`` wrap every call (see :mod:`ttrpc.interceptors`).
    ``stream_buffer_size`` bounds each stream's receive buffer (bytes); a
    handler that leaves it full for ``stream_stall_timeout`` seconds has its
    call failed with RESOURCE_EXHAUSTED.
    ``on_connection_closed`` is called after each connection goes away.

    ``max_connections`` (default 1024; None: no limit) bounds the connections
    served at once. A connection over it is still accepted and answered: each
    request it sends gets RESOURCE_EXHAUSTED ("too many connections"), then
    it is closed, so a client sees a status rather than a silent hang-up (up
    to 512 such connections at once; more, or ones that send nothing for
    2 s, are closed without a reply). Running out of descriptors (EMFILE) on
    accept is logged by asyncio, which retries a second later.

    ``max_calls_per_connection`` (default 1024; None: no limit) bounds the
    unary calls in flight on one connection: at the limit the server stops
    reading that connection (the client's writes block) and reads again once a
    quarter of them have finished. Streaming calls are not counted (their
    handlers may wait for input that only further reads deliver). Calls that
    wait for a later call on the same connection must stay below this.

    A peer that stops reading is not buffered for without bound: once the
    transport's write buffer passes its high-water mark the server stops
    reading that connection, starts no new unary handler for it and makes its
    stream senders wait, until the peer reads again. What stays buffered is
    the high-water mark plus the answers of handlers already running. Other
    connections are not affected.
    """

    def __init__(
        self,
        *,
        handshake: Handshake | None = None,
        max_message_length: int = MAX_MESSAGE_LENGTH,
        on_connection_closed: Callable[[], object] | None = None,
        interceptors: Sequence[Interceptor] | None = None,
        stream_buffer_size: int = STREAM_BUFFER_SIZE,
        stream_stall_timeout: float = STREAM_STALL_TIMEOUT,
        max_connections: int | None = _limits.MAX_CONNECTIONS,
        max_calls_per_connection: int | None = _limits.MAX_CALLS_PER_CONNECTION,
    ) -> None:
        self.handshake = handshake
        self.max_message_length = max_message_length
        self.max_connections = _limits.check_max_connections(max_connections)
        self.max_calls_per_connection = _limits.check_max_calls(max_calls_per_connection)
        self.stream_buffer_size = stream_buffer_size
        self.stream_stall_timeout = stream_stall_timeout
        self._on_connection_closed = on_connection_closed
        self._registry = ServiceRegistry(
            asynchronous=True, interceptors=check_interceptors(interceptors)
        )
        self._servers: list[asyncio.AbstractServer] = []
        self._owned_addresses: list[str] = []
        self._connections: set[_Connection] = set()
        self._refusing: set[_Refusal] = set()
        self._refusals = _limits.RateLimitedLog()
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
        """Start serving on an address (a path socket is created 0600) or a listening socket.

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
        if sock.family == socket.AF_UNIX:
            server = await loop.create_unix_server(lambda: _Connection(self), sock=sock)
        else:  # vsock
            server = await loop.create_server(lambda: _Connection(self), sock=sock)
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
        for refusal in list(self._refusing):
            refusal.abort()
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
        if self._connections or self._refusing:
            self._drained = asyncio.Event()
            await self._drained.wait()

    async def close(self) -> None:
        """Close listeners and every connection now; handlers in flight are cancelled."""
        self._shutting_down = True
        self._stop_listening()
        for refusal in list(self._refusing):
            refusal.abort()
        for conn in list(self._connections):
            conn.abort()
        # Transports report connection_lost on a later loop iteration.
        await self._wait_drained()
        if self._done is not None:
            self._done.set()

    @property
    def connections(self) -> int:
        """Connections being served now (not counting those refused over the limit)."""
        return len(self._connections)

    def _refuse(self, transport: asyncio.Transport, limit: int) -> None:
        if len(self._refusing) >= _limits.MAX_REFUSING:
            self._refusals.warning(
                "ttrpc: connection limit (%d) reached and %d refusals under way: "
                "closing a new connection without a reply",
                limit,
                len(self._refusing),
            )
            transport.abort()
            return
        self._refusals.warning(
            "ttrpc: connection limit (%d) reached: answering a new connection "
            "RESOURCE_EXHAUSTED and closing it",
            limit,
        )
        refusal = _Refusal(self, transport, limit)
        self._refusing.add(refusal)
        transport.set_protocol(refusal)
        refusal.connection_made(transport)

    def _refusal_closed(self, refusal: _Refusal) -> None:
        self._refusing.discard(refusal)
        if not self._connections and not self._refusing and self._drained is not None:
            self._drained.set()

    def _connection_closed(self, conn: _Connection) -> None:
        if conn not in self._connections:
            return  # never served (refused by the handshake or the limit)
        self._connections.discard(conn)
        if not self._connections and not self._refusing and self._drained is not None:
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
