"""Blocking ttrpc server: a thread reads each connection, handlers run on a thread pool."""

from __future__ import annotations

import contextlib
import heapq
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

from google.protobuf.message import Message

from ttrpc import address as _address
from ttrpc._calls import deadline_error, decode_message, serialize, stalled_error
from ttrpc.context import Context
from ttrpc.handshake import Handshake, PeerCredentials, log_refusal, peer_credentials
from ttrpc.interceptors import CallInfo, Interceptor, check_interceptors
from ttrpc.protocol import (
    FLAG_REMOTE_OPEN,
    MAX_MESSAGE_LENGTH,
    STREAM_BUFFER_SIZE,
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
#: Seconds a handler may leave its full receive buffer untouched before its stream fails.
STREAM_STALL_TIMEOUT = 1.0
_ACCEPT_POLL = 0.2


class _Deadlines:
    """One thread that answers DEADLINE_EXCEEDED for calls whose handlers overrun."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, _Connection, int]] = []
        self._cond = threading.Condition()
        self._seq = 0
        self._stopped = False
        self._thread: threading.Thread | None = None

    def add(self, deadline: float, conn: _Connection, stream_id: int) -> None:
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="ttrpc-deadlines", daemon=True
                )
                self._thread.start()
            self._seq += 1
            heapq.heappush(self._heap, (deadline, self._seq, conn, stream_id))
            if self._heap[0][1] == self._seq:
                self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped:
                    if not self._heap:
                        self._cond.wait()
                        continue
                    wait = self._heap[0][0] - time.monotonic()
                    if wait <= 0:
                        break
                    self._cond.wait(wait)
                if self._stopped:
                    return
                _, _, conn, stream_id = heapq.heappop(self._heap)
            conn.expire(stream_id)


class _Connection:
    def __init__(self, server: Server, sock: socket.socket, peer: PeerCredentials | None) -> None:
        self._server = server
        self._sock = sock
        self._peer = peer
        self._conn = ServerConnection(server.max_message_length, server.stream_buffer_size)
        self._lock = threading.Lock()  # guards _calls, _streams, the core and the write side
        self._drained = threading.Condition(self._lock)
        self._calls: dict[int, Context] = {}
        self._streams: dict[int, ServerStream] = {}
        self._progress = 0.0
        self._closed = False
        self.thread = threading.Thread(target=self._read_loop, name="ttrpc-conn", daemon=True)

    @property
    def idle(self) -> bool:
        with self._lock:
            return not self._calls

    def _read_loop(self) -> None:
        sock = self._sock
        conn = self._conn
        registry = self._server._registry
        # Reading into one kept buffer spares a fresh allocation (and its page faults) per read.
        view = read_buffer()
        try:
            while True:
                if conn.backlogged:
                    self._wait_for_room()
                n = sock.recv_into(view)
                if not n:
                    break
                if conn.open_streams:
                    with self._lock:
                        events = conn.receive_data(view[:n])
                        out = conn.data_to_send()
                        requests = self._stream_events(events)
                else:
                    events = conn.receive_data(view[:n])
                    out = conn.data_to_send()
                    requests = events
                if out:
                    self._send(out)
                for event in requests:
                    if type(event) is not RequestReceived:
                        if conn.open_streams:
                            with self._lock:
                                self._stream_events([event])
                        continue
                    stream_id = event.stream_id
                    try:
                        method, message, ctx = registry.prepare(event.request, self._peer)
                    except RpcError as exc:
                        self._send(conn.encode_error(stream_id, exc.to_status()))
                        continue
                    if ctx.deadline is not None and ctx.deadline <= time.monotonic():
                        self._send(conn.encode_error(stream_id, _DEADLINE_STATUS))
                        continue
                    if method.client_streaming or method.server_streaming:
                        self._start_stream(stream_id, event, method, ctx)
                        continue
                    handler = method.handler
                    if registry.intercepted:
                        handler = registry.chain(method, handler)
                    with self._lock:
                        self._calls[stream_id] = ctx
                    if ctx.deadline is not None:
                        self._server._deadlines.add(ctx.deadline, self, stream_id)
                    self._server._pool.submit(self._run, stream_id, handler, method, message, ctx)
        except OSError:
            pass
        finally:
            self.close()
            self._sock.close()  # only this thread reads, so the fd cannot be reused under it

    def _stream_events(self, events: list[Any]) -> list[Any]:
        """Hand stream events to their streams (lock held); the rest comes back in order.

        Requests must be started in order with the messages that follow them in the
        same read, so everything after the first request goes back to the caller.
        """
        for index, event in enumerate(events):
            kind = type(event)
            if kind is RequestReceived:
                return events[index:]
            stream = self._streams.get(event.stream_id)
            if kind is StreamMessage:
                if stream is None:
                    self._conn.message_consumed(event.stream_id, len(event.payload))
                else:
                    stream._push(event.payload)
            elif stream is None:
                continue
            elif kind is StreamEnded:
                stream._end_input()
            elif kind is StreamReset:
                stream._reset()
        return []

    def _run(
        self,
        stream_id: int,
        handler: Callable[[Any, Context], Any],
        method: Method,
        message: Message,
        ctx: Context,
    ) -> None:
        conn = self._conn
        try:
            payload = encode_result(method, handler(message, ctx))
            if conn.open_streams:  # the core's stream table is shared: mutate it locked
                with self._lock:
                    frame = conn.encode_response(stream_id, payload)
            else:
                frame = conn.encode_response(stream_id, payload)
        except Exception as exc:
            if not isinstance(exc, RpcError):
                log.debug("ttrpc: handler %s raised", ctx.method, exc_info=True)
            with self._lock:
                frame = conn.encode_error(stream_id, status_from_exception(exc))
        self._finish(stream_id, frame)

    # -- streams ---------------------------------------------------------------------

    def _start_stream(
        self, stream_id: int, event: RequestReceived, method: Method, ctx: Context
    ) -> None:
        registry = self._server._registry
        stream = ServerStream(self, stream_id, method, ctx, registry.call_info(method))
        request: Request = event.request
        if not method.client_streaming:
            stream._first = request.payload  # the one message, even an empty one
            stream._input_open = False
        else:
            if request.payload:  # Go's clients may put a first message in the request
                stream._first = request.payload
            stream._input_open = bool(event.flags & FLAG_REMOTE_OPEN)
        invoke: Callable[[ServerStream], Any] = _run_stream_handler
        if registry.intercepted:
            invoke = registry.chain(method, _run_stream_handler)
        with self._lock:
            self._calls[stream_id] = ctx
            self._streams[stream_id] = stream
        if ctx.deadline is not None:
            self._server._deadlines.add(ctx.deadline, self, stream_id)
        self._server._pool.submit(self._run_stream, stream, invoke)

    def _run_stream(self, stream: ServerStream, invoke: Callable[[ServerStream], Any]) -> None:
        conn = self._conn
        stream_id = stream.stream_id
        method = stream._method
        try:
            result = invoke(stream)
            if stream._failure is not None:
                raise stream._failure
            payload = b"" if method.server_streaming else encode_result(method, result)
            with self._lock:
                if method.server_streaming:
                    frame = conn.encode_end(stream_id)
                else:
                    frame = conn.encode_response(stream_id, payload)
        except Exception as exc:
            error: BaseException = exc
            if stream._failure is not None:
                error = stream._failure
            elif not isinstance(exc, RpcError):
                log.debug("ttrpc: handler %s raised", stream.ctx.method, exc_info=True)
            with self._lock:
                frame = conn.encode_error(stream_id, status_from_exception(error))
        self._finish(stream_id, frame)

    def _wait_for_room(self) -> None:
        """A stream's buffer is full: wait for its handler to take messages; fail it if it
        takes none for the stall timeout."""
        timeout = self._server.stream_stall_timeout
        failed: list[tuple[int, bytes]] = []
        with self._lock:
            self._progress = time.monotonic()
            while self._conn.backlogged and not self._closed:
                now = time.monotonic()
                if now - self._progress >= timeout:
                    for stream_id in self._conn.full_streams():
                        stream = self._streams.get(stream_id)
                        error = stalled_error(stream_id, timeout)
                        if stream is not None:
                            stream._fail(error)
                            frame = self._conn.encode_error(stream_id, error.to_status())
                            failed.append((stream_id, frame))
                        else:
                            self._conn.forget_stream(stream_id)
                    break
                self._drained.wait(self._progress + timeout - now)
        # Answered now, as for a deadline: the handler cannot be interrupted.
        for stream_id, frame in failed:
            self._finish(stream_id, frame)

    def _consumed(self, stream_id: int, nbytes: int) -> None:
        # Caller holds the lock.
        self._conn.message_consumed(stream_id, nbytes)
        self._progress = time.monotonic()
        if not self._conn.backlogged:
            self._drained.notify_all()

    def send_message(self, stream: ServerStream, frame: bytes) -> None:
        with self._lock:
            if self._closed or stream._finished:
                raise stream._failure or RpcError(Code.CANCELLED, "ttrpc: the call has ended")
            self._sock.sendall(frame)

    # -- answers -----------------------------------------------------------------------

    def expire(self, stream_id: int) -> None:
        """The call's deadline passed: answer now; the handler's late result is dropped."""
        with self._lock:
            ctx = self._calls.get(stream_id)
            stream = self._streams.get(stream_id)
            if stream is not None:
                stream._failure = deadline_error()
                stream._finished = True
                stream._cond.notify_all()
            frame = self._conn.encode_error(stream_id, _DEADLINE_STATUS) if ctx else b""
        if ctx is not None:
            ctx.cancel()
            self._finish(stream_id, frame)

    def _finish(self, stream_id: int, frame: bytes) -> None:
        with self._lock:
            stream = self._streams.pop(stream_id, None)
            if stream is not None:
                stream._finished = True
                stream._cond.notify_all()
                if not self._conn.backlogged:
                    self._drained.notify_all()
            if self._calls.pop(stream_id, None) is None or self._closed:
                return  # already answered (deadline) or the connection is gone
            if stream is not None and stream._reset_by_peer:
                self._conn.forget_stream(stream_id)
            else:
                with contextlib.suppress(OSError):
                    self._sock.sendall(frame)
            idle = not self._calls
        if idle and self._server._shutting_down:
            self.close()

    def _send(self, frame: bytes) -> None:
        with self._lock:
            if not self._closed:
                self._sock.sendall(frame)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            calls = list(self._calls.values())
            self._calls.clear()
            for stream in self._streams.values():
                stream._finished = True
                stream._cond.notify_all()
            self._streams.clear()
            self._drained.notify_all()
        for ctx in calls:
            ctx.cancel()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the reader thread, which closes
        self._server._connection_closed(self)


class ServerStream:
    """One streaming call on a blocking server: what stream interceptors get.

    Handlers see it through the iterators they are given; interceptors may
    call :meth:`recv` and :meth:`send` themselves, or wrap it. ``ctx`` is the
    call's :class:`~ttrpc.Context` (``ctx.cancelled`` turns true when the call
    can no longer be answered), ``info`` its :class:`~ttrpc.interceptors.CallInfo`.
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
        self._cond = threading.Condition(connection._lock)
        self._finished = False
        self._reset_by_peer = False
        self._failure: RpcError | None = None

    def recv(self) -> Message | None:
        """The client's next message (blocks); None once it has closed its side."""
        first = self._first
        if first is not None:
            self._first = None
            return decode_message(first, self._method.request_type)
        connection = self._connection
        with self._cond:
            while not self._queue:
                if self._failure is not None:
                    raise self._failure
                if not self._input_open or self._finished:
                    if self._finished and not self._reset_by_peer:
                        raise RpcError(Code.CANCELLED, "ttrpc: the call has ended")
                    return None
                self._cond.wait()
            payload = self._queue.popleft()
            connection._consumed(self.stream_id, len(payload))
        return decode_message(payload, self._method.request_type)

    def __iter__(self) -> Iterator[Message]:
        while True:
            message = self.recv()
            if message is None:
                return
            yield message

    def send(self, message: Message) -> None:
        """Send one message to the client (server-streaming and bidi methods)."""
        connection = self._connection
        frame = connection._conn.encode_message(
            self.stream_id, serialize(message, self._method.response_type)
        )
        try:
            connection.send_message(self, frame)
        except OSError:
            raise RpcError(Code.UNAVAILABLE, "ttrpc: connection lost") from None

    # -- driven by the connection (its lock held) --

    def _push(self, payload: bytes) -> None:
        self._queue.append(payload)
        self._cond.notify()

    def _end_input(self) -> None:
        self._input_open = False
        self._cond.notify()

    def _reset(self) -> None:
        self._reset_by_peer = True
        self._finished = True
        self.ctx.cancel()
        self._cond.notify_all()

    def _fail(self, error: RpcError) -> None:
        """End the call with ``error``: the handler's next recv/send raises it."""
        self._failure = error
        self._finished = True
        self._queue.clear()
        self.ctx.cancel()
        self._cond.notify_all()


def _iterate(result: Any) -> Iterator[Any]:
    if not hasattr(result, "__iter__") or isinstance(result, Message):
        raise RpcError(
            Code.INTERNAL,
            f"ttrpc: streaming handler returned {type(result).__name__}, not an iterator",
        )
    return iter(result)


def _run_stream_handler(stream: ServerStream) -> Message | None:
    """Drive a streaming handler of any kind over its stream (the chain's innermost step)."""
    method = stream._method
    ctx = stream.ctx
    if method.client_streaming:
        requests = iter(stream)
        if not method.server_streaming:
            return cast(Message, method.handler(requests, ctx))
        output = method.handler(requests, ctx)
    else:
        request = stream.recv()
        if request is None:
            raise RpcError(Code.INVALID_ARGUMENT, "ttrpc: server-streaming call without a request")
        output = method.handler(request, ctx)
    for message in _iterate(output):
        stream.send(message)
    return None


class Server:
    """Serves registered services with threads; handlers are plain functions.

    ::

        server = Server()
        server.register(MyService())
        server.start("unix:///run/my.sock")   # or serve() to block here
        ...
        server.shutdown(timeout=5)

    ``max_workers`` bounds the handler threads shared by all connections
    (a streaming call holds one for as long as its handler runs).
    ``handshake``, ``interceptors``, ``stream_buffer_size`` and
    ``stream_stall_timeout`` are as for :class:`ttrpc.aio.Server`.
    """

    def __init__(
        self,
        *,
        handshake: Handshake | None = None,
        max_message_length: int = MAX_MESSAGE_LENGTH,
        max_workers: int = 64,
        on_connection_closed: Callable[[], object] | None = None,
        interceptors: Sequence[Interceptor] | None = None,
        stream_buffer_size: int = STREAM_BUFFER_SIZE,
        stream_stall_timeout: float = STREAM_STALL_TIMEOUT,
    ) -> None:
        self.handshake = handshake
        self.max_message_length = max_message_length
        self.stream_buffer_size = stream_buffer_size
        self.stream_stall_timeout = stream_stall_timeout
        self._on_connection_closed = on_connection_closed
        self._registry = ServiceRegistry(
            asynchronous=False, interceptors=check_interceptors(interceptors)
        )
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="ttrpc-handler")
        self._deadlines = _Deadlines()
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._listeners: list[tuple[socket.socket, str | None, threading.Thread]] = []
        self._connections: set[_Connection] = set()
        self._shutting_down = False
        self._stopped = threading.Event()

    def register(self, service: Service | ServiceProvider) -> None:
        """Add a service (a :class:`Service` or a generated service object)."""
        self._registry.register(service)

    def start(self, listener: str | socket.socket) -> None:
        """Accept connections on an address (created 0600) or a listening socket, in a thread."""
        if self._shutting_down:
            raise RuntimeError("server is shut down")
        owned = listener if isinstance(listener, str) else None
        sock = _address.listen(listener) if isinstance(listener, str) else listener
        sock.setblocking(True)
        if sock.family != socket.AF_UNIX:
            # shutdown() wakes a unix accept(), not a vsock one: poll for the stop instead.
            sock.settimeout(_ACCEPT_POLL)
        thread = threading.Thread(
            target=self._accept_loop, args=(sock,), name="ttrpc-accept", daemon=True
        )
        with self._lock:
            self._listeners.append((sock, owned, thread))
        thread.start()

    def serve(self, listener: str | socket.socket) -> None:
        """Like :meth:`start`, then block until the server is shut down or closed."""
        self.start(listener)
        self.wait()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server has stopped; False if ``timeout`` passed first."""
        return self._stopped.wait(timeout)

    def _accept_loop(self, sock: socket.socket) -> None:
        while not self._shutting_down:
            try:
                client, _ = sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._shutting_down:
                    return
                log.exception("ttrpc: accept failed")
                return
            try:
                peer = peer_credentials(client)
            except OSError:
                peer = None
            if self.handshake is not None and not self.handshake(peer):
                log_refusal(peer)
                client.close()
                continue
            conn = _Connection(self, client, peer)
            with self._lock:
                if self._shutting_down:
                    client.close()
                    return
                self._connections.add(conn)
            conn.thread.start()

    def _stop_listening(self) -> None:
        with self._lock:
            listeners = list(self._listeners)
            self._listeners.clear()
        for sock, owned, thread in listeners:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            if thread is not threading.current_thread():
                thread.join(5)
            sock.close()
            if owned is not None:
                _address.unlink_socket(owned)

    def shutdown(self, timeout: float | None = None) -> bool:
        """Stop accepting; let calls in flight finish; close connections as they go idle.

        After ``timeout`` seconds the rest is closed. Returns True if every call finished.
        """
        self._shutting_down = True
        self._stop_listening()
        with self._lock:
            conns = list(self._connections)
        for conn in conns:
            if conn.idle:
                conn.close()
        with self._lock:
            graceful = self._cond.wait_for(lambda: not self._connections, timeout)
        self.close()
        return graceful

    def close(self) -> None:
        """Close listeners and connections now; results of handlers still running are dropped."""
        self._shutting_down = True
        self._stop_listening()
        with self._lock:
            conns = list(self._connections)
        for conn in conns:
            conn.close()
        for conn in conns:
            if conn.thread is not threading.current_thread():
                conn.thread.join(5)
        self._deadlines.stop()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._stopped.set()

    def _connection_closed(self, conn: _Connection) -> None:
        with self._lock:
            if conn not in self._connections:
                return
            self._connections.discard(conn)
            self._cond.notify_all()
        if self._on_connection_closed is not None:
            try:
                self._on_connection_closed()
            except Exception:
                log.exception("ttrpc: on_connection_closed callback failed")

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
