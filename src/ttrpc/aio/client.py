"""asyncio ttrpc client: many concurrent calls and streams multiplexed on one connection."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
import weakref
from collections import deque
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Callable,
    Coroutine,
    Iterable,
    Sequence,
)
from functools import partial
from typing import Any, Generic, TypeAlias, TypeVar, cast

from google.protobuf.message import Message

from ttrpc import address as _address
from ttrpc._calls import (
    build_request,
    deadline_error,
    decode_message,
    finished_error,
    serialize,
    stalled_error,
    status_of_response,
    unpack_response,
)
from ttrpc.context import Context
from ttrpc.interceptors import CallInfo, Interceptor, chain_unary, check_interceptors
from ttrpc.protocol import (
    MAX_MESSAGE_LENGTH,
    STREAM_BUFFER_SIZE,
    Buffer,
    CallFailed,
    ClientConnection,
    ResponseReceived,
    StreamEnded,
    StreamMessage,
    read_buffer,
)
from ttrpc.status import Code, ConnectionClosed, RpcError
from ttrpc.ttrpc_pb2 import Response

__all__ = ["Client", "ClientStream", "Requests", "connect"]

log = logging.getLogger("ttrpc")

T = TypeVar("T", bound=Message)
ResponseT = TypeVar("ResponseT", bound=Message)
M = TypeVar("M", bound=Message)

Requests: TypeAlias = AsyncIterable[M] | Iterable[M]
"""What client-streaming and bidi calls take: an async or plain iterable of requests."""

#: Stream messages are written together once this much is waiting, or at the end
#: of the loop iteration that queued them.
_COALESCE = 64 * 1024
#: Seconds a stream's consumer may leave a full receive buffer untouched before
#: the stream fails (reading from the connection is paused meanwhile).
STREAM_STALL_TIMEOUT = 1.0


class _ClientProtocol(asyncio.BufferedProtocol):
    # Reading into one kept buffer spares a fresh allocation (and its page faults) per read.
    def __init__(self, client: Client) -> None:
        self._client = client
        self._view = read_buffer()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        self._client._data_received(self._view[:nbytes])

    def connection_lost(self, exc: Exception | None) -> None:
        self._client._connection_lost(exc)

    def pause_writing(self) -> None:
        self._client._write_paused = True

    def resume_writing(self) -> None:
        self._client._resume_writing()


class Client:
    """A ttrpc connection for asyncio code.

    Create with :func:`connect` (or :meth:`from_socket`); close with
    :meth:`close` or ``async with``. Generated clients wrap one of these.

    ``interceptors`` wrap every call (see :mod:`ttrpc.interceptors`).
    ``stream_buffer_size`` bounds each stream's receive buffer (bytes); when a
    stream's consumer leaves it full for ``stream_stall_timeout`` seconds the
    stream fails with RESOURCE_EXHAUSTED (reading pauses meanwhile: the
    protocol has no flow control of its own).
    """

    def __init__(
        self,
        *,
        max_message_length: int = MAX_MESSAGE_LENGTH,
        on_close: Callable[[], object] | None = None,
        interceptors: Sequence[Interceptor] | None = None,
        stream_buffer_size: int = STREAM_BUFFER_SIZE,
        stream_stall_timeout: float = STREAM_STALL_TIMEOUT,
    ) -> None:
        self._transport: asyncio.BaseTransport | None = None
        self._conn = ClientConnection(max_message_length, stream_buffer_size)
        self._waiters: dict[int, asyncio.Future[Response]] = {}
        # Weak: a stream object dropped unfinished is abandoned by its finalizer.
        self._streams: dict[int, weakref.ref[ClientStream[Any]]] = {}
        self._interceptors = check_interceptors(interceptors)
        self._chains: dict[tuple[str, str, type[Message]], Callable[..., Any]] = {}
        self._on_close = on_close
        self._error: RpcError | None = None
        self._loop = asyncio.get_running_loop()
        self._closed: asyncio.Future[None] = self._loop.create_future()
        self._wbuf = bytearray()
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._read_paused = False
        self._stall_timeout = stream_stall_timeout
        self._stall_timer: asyncio.TimerHandle | None = None
        self._progress = 0.0

    @classmethod
    async def from_socket(
        cls,
        sock: socket.socket,
        *,
        max_message_length: int = MAX_MESSAGE_LENGTH,
        on_close: Callable[[], object] | None = None,
        interceptors: Sequence[Interceptor] | None = None,
        stream_buffer_size: int = STREAM_BUFFER_SIZE,
        stream_stall_timeout: float = STREAM_STALL_TIMEOUT,
    ) -> Client:
        """Wrap an already connected socket (it becomes the client's)."""
        client = cls(
            max_message_length=max_message_length,
            on_close=on_close,
            interceptors=interceptors,
            stream_buffer_size=stream_buffer_size,
            stream_stall_timeout=stream_stall_timeout,
        )
        loop = asyncio.get_running_loop()
        if sock.family == socket.AF_UNIX:
            client._transport, _ = await loop.create_unix_connection(
                lambda: _ClientProtocol(client), sock=sock
            )
        else:  # vsock
            client._transport, _ = await loop.create_connection(
                lambda: _ClientProtocol(client), sock=sock
            )
        return client

    # -- unary calls -------------------------------------------------------

    def call(
        self,
        service: str,
        method: str,
        request: Message,
        response_type: type[T],
        ctx: Context | None = None,
    ) -> Coroutine[Any, Any, T]:
        """One unary call (``await`` it); raises :class:`RpcError` for a non-OK status.

        Cancelling the awaiting task abandons the call (a late answer is dropped).
        """
        if self._interceptors:
            return self._intercepted_call(service, method, request, response_type, ctx)
        # The call's own coroutine, not one wrapping it: one frame less per call.
        return self._call(service, method, request, ctx, response_type=response_type)

    async def _intercepted_call(
        self,
        service: str,
        method: str,
        request: Message,
        response_type: type[T],
        ctx: Context | None,
    ) -> T:
        key = (service, method, response_type)
        invoke = self._chains.get(key)
        if invoke is None:  # built once per method
            invoke = self._chains[key] = chain_unary(
                self._interceptors,
                "client_unary",
                CallInfo(service, method),
                partial(self._call, service, method, response_type=response_type),
            )
        return cast(T, await invoke(request, Context() if ctx is None else ctx.copy()))

    async def _call(
        self,
        service: str,
        method: str,
        request: Message,
        ctx: Context | None,
        *,
        response_type: type[T],
    ) -> T:
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
            if self._wbuf:
                self._flush()
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

    # -- streams -----------------------------------------------------------

    def open_stream(
        self,
        service: str,
        method: str,
        response_type: type[ResponseT],
        ctx: Context | None = None,
        *,
        request: Message | None = None,
        client_streaming: bool,
        server_streaming: bool,
    ) -> ClientStream[ResponseT]:
        """Start a streaming call and return its :class:`ClientStream` (no waiting).

        A server-streaming call takes its one ``request`` here; client-streaming
        and bidi calls send theirs with :meth:`ClientStream.send`.
        """
        info = CallInfo(
            service, method, client_streaming=client_streaming, server_streaming=server_streaming
        )
        if not client_streaming and request is None:
            raise TypeError("a server-streaming call needs its request")
        terminal = partial(self._open_stream, info, response_type)
        if self._interceptors:
            ctx = Context() if ctx is None else ctx.copy()
            for interceptor in reversed(self._interceptors):
                terminal = partial(_stream_step, interceptor.client_stream, info, terminal)
        stream: ClientStream[ResponseT] = terminal(request, ctx)
        return stream

    def _open_stream(
        self,
        info: CallInfo,
        response_type: type[ResponseT],
        request: Message | None,
        ctx: Context | None,
    ) -> ClientStream[ResponseT]:
        if self._error is not None:
            raise self._error
        wire, deadline = build_request(
            info.service, info.method, None if info.client_streaming else request, ctx
        )
        stream_id, frame = self._conn.open_stream(wire, client_streaming=info.client_streaming)
        stream = ClientStream(self, stream_id, info, response_type)
        self._streams[stream_id] = weakref.ref(stream)
        self._write(frame)
        if deadline is not None:
            stream._timer = self._loop.call_later(
                deadline - time.monotonic(), stream._finish, deadline_error(), True
            )
        return stream

    def server_stream(
        self,
        service: str,
        method: str,
        request: Message,
        response_type: type[ResponseT],
        ctx: Context | None = None,
    ) -> ClientStream[ResponseT]:
        """A server-streaming call: ``async for reply in client.server_stream(...)``."""
        return self.open_stream(
            service,
            method,
            response_type,
            ctx,
            request=request,
            client_streaming=False,
            server_streaming=True,
        )

    async def client_stream(
        self,
        service: str,
        method: str,
        requests: AsyncIterable[Message] | Iterable[Message],
        response_type: type[ResponseT],
        ctx: Context | None = None,
    ) -> ResponseT:
        """A client-streaming call: sends every request, then returns the one reply."""
        stream = self.open_stream(
            service, method, response_type, ctx, client_streaming=True, server_streaming=False
        )
        try:
            await _send_all(stream, requests)
            return await stream.result()
        finally:
            stream.cancel()

    def bidi_stream(
        self,
        service: str,
        method: str,
        requests: AsyncIterable[Message] | Iterable[Message] | None,
        response_type: type[ResponseT],
        ctx: Context | None = None,
    ) -> ClientStream[ResponseT]:
        """A bidi call. With ``requests``, a task sends them and then closes the
        sending side; with None, use :meth:`ClientStream.send` and ``close_send``."""
        stream = self.open_stream(
            service, method, response_type, ctx, client_streaming=True, server_streaming=True
        )
        if requests is not None:
            stream._pump = self._loop.create_task(_pump(stream, requests))
        return stream

    # -- writing -----------------------------------------------------------

    def _write(self, frame: bytes) -> None:
        """Write now (after whatever stream data is queued, to keep the order)."""
        if self._wbuf:
            self._flush()
        if self._transport is not None:
            cast(asyncio.WriteTransport, self._transport).write(frame)

    def _write_data(self, frame: bytes) -> bool:
        """Queue a stream frame; True when a full batch was just written."""
        buf = self._wbuf
        if not buf:
            self._loop.call_soon(self._flush)
        buf += frame
        if len(buf) >= _COALESCE:
            self._flush()
            return True
        return False

    def _flush(self) -> None:
        if self._wbuf and self._transport is not None and self._error is None:
            cast(asyncio.WriteTransport, self._transport).write(bytes(self._wbuf))
        self._wbuf.clear()

    async def _drain(self) -> None:
        while self._write_paused and self._error is None:
            future: asyncio.Future[None] = self._loop.create_future()
            self._drain_waiters.append(future)
            await future

    def _resume_writing(self) -> None:
        self._write_paused = False
        waiters, self._drain_waiters = self._drain_waiters, []
        for future in waiters:
            if not future.done():
                future.set_result(None)

    def _abandon_stream(self, stream_id: int) -> None:
        self._streams.pop(stream_id, None)
        frame = self._conn.abandon_stream(stream_id)
        if frame and self._error is None:
            self._write_data(frame)
        self._check_backlog()

    # -- connection events -------------------------------------------------

    def _data_received(self, data: Buffer) -> None:
        waiters = self._waiters
        conn = self._conn
        for event in conn.receive_data(data):
            future = waiters.get(event.stream_id)
            if future is not None:
                if future.done():
                    continue
                if isinstance(event, CallFailed):
                    future.set_exception(event.error)
                else:
                    future.set_result(event.response)  # type: ignore[union-attr]
                continue
            ref = self._streams.get(event.stream_id)
            stream = ref() if ref is not None else None
            if stream is not None:
                stream._event(event)
            elif type(event) is StreamMessage:  # dropped, not yet abandoned: not buffered
                conn.message_consumed(event.stream_id, len(event.payload))
        if conn.backlogged and not self._read_paused:
            self._pause_reading()

    def _pause_reading(self) -> None:
        transport = self._transport
        if transport is None or self._error is not None:
            return
        cast(asyncio.ReadTransport, transport).pause_reading()
        self._read_paused = True
        self._progress = self._loop.time()
        self._stall_timer = self._loop.call_later(self._stall_timeout, self._stall_check)

    def _consumed(self, stream_id: int, nbytes: int) -> None:
        conn = self._conn
        conn.message_consumed(stream_id, nbytes)
        if self._read_paused:
            self._progress = self._loop.time()
            self._check_backlog()

    def _check_backlog(self) -> None:
        if self._read_paused and not self._conn.backlogged:
            self._read_paused = False
            if self._stall_timer is not None:
                self._stall_timer.cancel()
                self._stall_timer = None
            if self._transport is not None and self._error is None:
                cast(asyncio.ReadTransport, self._transport).resume_reading()

    def _stall_check(self) -> None:
        self._stall_timer = None
        if not self._read_paused:
            return
        idle = self._loop.time() - self._progress
        if idle < self._stall_timeout:
            self._stall_timer = self._loop.call_later(self._stall_timeout - idle, self._stall_check)
            return
        for stream_id in self._conn.full_streams():
            ref = self._streams.get(stream_id)
            stream = ref() if ref is not None else None
            if stream is not None:
                stream._finish(stalled_error(stream_id, self._stall_timeout), True)
            else:
                self._abandon_stream(stream_id)
        self._check_backlog()

    def _connection_lost(self, exc: Exception | None) -> None:
        if self._error is None:
            reason = (
                "ttrpc: connection closed" if exc is None else f"ttrpc: connection closed: {exc}"
            )
            self._error = ConnectionClosed(reason)
        for future in self._waiters.values():
            if not future.done():
                future.set_exception(self._error)
        for ref in list(self._streams.values()):
            stream = ref()
            if stream is not None:
                stream._finish(self._error, False)
        self._streams.clear()
        self._resume_writing()
        if self._stall_timer is not None:
            self._stall_timer.cancel()
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
        if self._wbuf and self._error is None:
            self._flush()
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


def _stream_step(hook: Any, info: CallInfo, call_next: Any, request: Any, ctx: Context) -> Any:
    return hook(request, ctx, info, call_next)


class ClientStream(AsyncIterator[ResponseT], Generic[ResponseT]):
    """One streaming call, client side (asyncio).

    ``async for reply in stream`` (or :meth:`recv`) reads the server's
    messages; :meth:`send` and :meth:`close_send` write ours (client-streaming
    and bidi calls); :meth:`result` is the one reply of a client-streaming
    call. A non-OK end raises :class:`RpcError` from whichever of these is
    waiting. :meth:`cancel` (or leaving ``async with``) gives up on the call:
    later messages are dropped and our sending side is closed, which is all
    the protocol can tell the server.
    """

    def __init__(
        self, client: Client, stream_id: int, info: CallInfo, response_type: type[ResponseT]
    ) -> None:
        self._client = client
        self.stream_id = stream_id
        self.info = info
        self._response_type = response_type
        self._queue: deque[bytes] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._done = False
        self._error: RpcError | None = None
        self._reply: bytes | None = None
        self._callbacks: list[Callable[[RpcError | None], object]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._pump: asyncio.Task[None] | None = None

    # -- receiving --

    async def recv(self) -> ResponseT | None:
        """The next message from the server; None once the stream ended OK."""
        queue = self._queue
        while not queue:
            if self._done:
                if self._error is not None:
                    raise self._error
                return None
            waiter = self._client._loop.create_future()
            self._waiter = waiter
            try:
                await waiter
            finally:
                self._waiter = None
        payload = queue.popleft()
        self._client._consumed(self.stream_id, len(payload))
        try:
            return decode_message(payload, self._response_type)
        except RpcError as exc:
            self._finish(exc, True)
            raise

    def __aiter__(self) -> ClientStream[ResponseT]:
        return self

    async def __anext__(self) -> ResponseT:
        message = await self.recv()
        if message is None:
            raise StopAsyncIteration
        return message

    async def result(self) -> ResponseT:
        """A client-streaming call's reply: closes our side, waits for the server's answer."""
        await self.close_send()
        while not self._done:
            waiter = self._client._loop.create_future()
            self._waiter = waiter
            try:
                await waiter
            finally:
                self._waiter = None
        if self._error is not None:
            raise self._error
        if self._reply is None:
            raise RpcError(Code.INTERNAL, "ttrpc: stream ended without a response")
        return decode_message(self._reply, self._response_type)

    # -- sending --

    async def send(self, message: Message) -> None:
        """Send one message (client-streaming and bidi calls)."""
        if self._done:
            raise self._error or finished_error()
        client = self._client
        frame = client._conn.send_message(self.stream_id, serialize(message, Message))
        if client._write_data(frame):
            await asyncio.sleep(0)  # a full batch went out: let the loop breathe
        if client._write_paused:
            await client._drain()

    async def close_send(self) -> None:
        """Tell the server we are done sending (idempotent)."""
        if self._done:
            return
        frame = self._client._conn.close_send(self.stream_id)
        if frame:
            self._client._write_data(frame)

    # -- outcome --

    @property
    def done(self) -> bool:
        """True once the call has ended (messages may still be waiting in :meth:`recv`)."""
        return self._done

    @property
    def error(self) -> RpcError | None:
        return self._error

    def add_done_callback(self, fn: Callable[[RpcError | None], object]) -> None:
        """Call ``fn(error)`` when the call ends (``error`` None when OK); now if it has."""
        if self._done:
            fn(self._error)
        else:
            self._callbacks.append(fn)

    def cancel(self) -> None:
        """Give up on the call: its remaining messages are dropped (CANCELLED)."""
        if not self._done:
            self._finish(RpcError(Code.CANCELLED, "ttrpc: stream cancelled"), True)
        self._queue.clear()

    async def __aenter__(self) -> ClientStream[ResponseT]:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.cancel()

    def __del__(self) -> None:
        # An abandoned iterator (a ``break`` out of ``async for``) must not keep its
        # stream buffering on the connection.
        if not getattr(self, "_done", True):
            with contextlib.suppress(Exception):
                self._client._loop.call_soon_threadsafe(
                    self._client._abandon_stream, self.stream_id
                )

    # -- driven by the client --

    def _event(self, event: object) -> None:
        if self._done:
            return
        if type(event) is StreamMessage:
            self._queue.append(event.payload)
            self._wake()
        elif type(event) is StreamEnded:
            self._finish(None, False)
        elif type(event) is ResponseReceived:
            error = status_of_response(event.response)
            if error is None:
                self._reply = event.response.payload
            self._finish(error, False)
        elif type(event) is CallFailed:
            self._finish(event.error, True)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _finish(self, error: RpcError | None, abandon: bool) -> None:
        """The call ended (``abandon``: we end it, so tell the core and the server)."""
        if self._done:
            return
        self._done = True
        self._error = error
        client = self._client
        if error is not None and abandon:
            self._queue.clear()
        if abandon:
            client._abandon_stream(self.stream_id)
        else:
            client._streams.pop(self.stream_id, None)
            client._check_backlog()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._pump is not None and not self._pump.done():
            self._pump.cancel()
        self._wake()
        callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            try:
                fn(error)
            except Exception:
                log.exception("ttrpc: stream done callback failed")


async def _send_all(
    stream: ClientStream[Any], requests: AsyncIterable[Message] | Iterable[Message]
) -> None:
    """Send every request, then close our side; stops quietly if the call ends first."""
    try:
        if isinstance(requests, AsyncIterable):
            async for message in requests:
                if stream.done:
                    return
                await stream.send(message)
        else:
            for message in requests:
                if stream.done:
                    return
                await stream.send(message)
        await stream.close_send()
    except RpcError:
        if not stream.done:
            raise


async def _pump(
    stream: ClientStream[Any], requests: AsyncIterable[Message] | Iterable[Message]
) -> None:
    try:
        await _send_all(stream, requests)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        failure = RpcError(Code.CANCELLED, f"ttrpc: request iterator failed: {exc!r}")
        failure.__cause__ = exc
        stream._pump = None
        stream._finish(failure, True)


async def connect(
    address: str | socket.socket,
    *,
    timeout: float | None = None,
    max_message_length: int = MAX_MESSAGE_LENGTH,
    on_close: Callable[[], object] | None = None,
    interceptors: Sequence[Interceptor] | None = None,
    stream_buffer_size: int = STREAM_BUFFER_SIZE,
    stream_stall_timeout: float = STREAM_STALL_TIMEOUT,
) -> Client:
    """Connect to a ttrpc server.

    ``address`` is ``unix:///path``, ``unix://@name``, a bare path, ``fd://N``,
    ``vsock://CID:PORT`` or an already connected socket.
    """
    if isinstance(address, socket.socket):
        sock = address
    else:
        family, target = _address.resolve(address)
        if family is None:
            sock = _address.socket_from_fd(int(target))
        else:
            sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            sock.setblocking(False)
            try:
                loop = asyncio.get_running_loop()
                await asyncio.wait_for(loop.sock_connect(sock, target), timeout)
            except BaseException:
                sock.close()
                raise
    return await Client.from_socket(
        sock,
        max_message_length=max_message_length,
        on_close=on_close,
        interceptors=interceptors,
        stream_buffer_size=stream_buffer_size,
        stream_stall_timeout=stream_stall_timeout,
    )
