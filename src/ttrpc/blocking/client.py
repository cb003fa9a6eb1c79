"""Blocking ttrpc client: thread-safe, one connection shared by any number of threads.

There is no background thread and no hidden event loop. Whichever calling
thread finds nobody reading becomes the reader: it reads frames, hands
other threads their responses (and stream messages), and passes the reader
role on once what it waits for has arrived (a leader/followers scheme). A
lone caller therefore sends and reads on its own thread, with no hand-off.

A stream's receive buffer is bounded: when one is full the reader stops
reading until that stream's consumer takes a message, and fails the stream
(RESOURCE_EXHAUSTED) if it takes none for ``stream_stall_timeout`` seconds.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from typing import Any, Generic, TypeVar, cast

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
    CallFailed,
    ClientConnection,
    ResponseReceived,
    StreamEnded,
    StreamMessage,
    read_buffer,
)
from ttrpc.status import Code, ConnectionClosed, RpcError
from ttrpc.ttrpc_pb2 import Response

__all__ = ["Client", "ClientStream", "connect"]

log = logging.getLogger("ttrpc")

T = TypeVar("T", bound=Message)
ResponseT = TypeVar("ResponseT", bound=Message)

STREAM_STALL_TIMEOUT = 1.0


class _Waiter:
    """One call's slot. ``wake`` is held exactly while ``signalled`` is false.

    ``done`` means "something for the waiting thread": the response of a
    unary call, or for a stream a message or its end.
    """

    __slots__ = ("done", "error", "response", "signalled", "wake")

    def __init__(self) -> None:
        self.wake = threading.Lock()
        self.wake.acquire()
        self.signalled = False
        self.done = False
        self.response: Response | None = None
        self.error: RpcError | None = None


class Client:
    """A ttrpc connection for threaded code; see :func:`connect`.

    ``interceptors`` wrap every call (see :mod:`ttrpc.interceptors`);
    ``stream_buffer_size`` (bytes) and ``stream_stall_timeout`` (seconds)
    bound what a stream whose consumer does not keep up may hold.
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        max_message_length: int = MAX_MESSAGE_LENGTH,
        on_close: Callable[[], object] | None = None,
        interceptors: Sequence[Interceptor] | None = None,
        stream_buffer_size: int = STREAM_BUFFER_SIZE,
        stream_stall_timeout: float = STREAM_STALL_TIMEOUT,
    ) -> None:
        sock.setblocking(True)
        self._sock = sock
        self._poll = select.poll()
        self._poll.register(sock.fileno(), select.POLLIN)
        self._conn = ClientConnection(max_message_length, stream_buffer_size)
        # Reading into one kept buffer spares a fresh allocation (and its page faults) per read.
        self._view = read_buffer()
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._drained = threading.Condition(self._lock)
        self._waiters: dict[int, _Waiter] = {}
        # Weak: a stream object dropped unfinished is abandoned by its finalizer.
        self._streams: dict[int, weakref.ref[ClientStream[Any]]] = {}
        self._orphans: list[int] = []  # streams to abandon (finalized, or failed)
        self._interceptors = check_interceptors(interceptors)
        self._chains: dict[tuple[str, str, type[Message]], Callable[..., Any]] = {}
        self._stall_timeout = stream_stall_timeout
        self._progress = 0.0
        self._reading = False
        self._error: RpcError | None = None
        self._socket_closed = False
        self._on_close = on_close

    # -- unary calls -------------------------------------------------------

    def call(
        self,
        service: str,
        method: str,
        request: Message,
        response_type: type[T],
        ctx: Context | None = None,
    ) -> T:
        """One unary call; raises :class:`RpcError` for a non-OK status. Safe from any thread."""
        if self._interceptors:
            key = (service, method, response_type)
            invoke = self._chains.get(key)
            if invoke is None:  # built once per method
                invoke = self._chains[key] = chain_unary(
                    self._interceptors,
                    "blocking_client_unary",
                    CallInfo(service, method),
                    partial(self._call, service, method, response_type=response_type),
                )
            return cast(T, invoke(request, Context() if ctx is None else ctx.copy()))
        return self._call(service, method, request, ctx, response_type=response_type)

    def _call(
        self,
        service: str,
        method: str,
        request: Message,
        ctx: Context | None,
        *,
        response_type: type[T],
    ) -> T:
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
        """Start a streaming call and return its :class:`ClientStream`.

        A server-streaming call takes its one ``request`` here; client-streaming
        and bidi calls send theirs with :meth:`ClientStream.send`.
        """
        info = CallInfo(
            service, method, client_streaming=client_streaming, server_streaming=server_streaming
        )
        if not client_streaming and request is None:
            raise TypeError("a server-streaming call needs its request")
        terminal: Callable[..., Any] = partial(self._open_stream, info, response_type)
        if self._interceptors:
            ctx = Context() if ctx is None else ctx.copy()
            for interceptor in reversed(self._interceptors):
                terminal = partial(_stream_step, interceptor.blocking_client_stream, info, terminal)
        return cast(ClientStream[ResponseT], terminal(request, ctx))

    def _open_stream(
        self,
        info: CallInfo,
        response_type: type[ResponseT],
        request: Message | None,
        ctx: Context | None,
    ) -> ClientStream[ResponseT]:
        wire, deadline = build_request(
            info.service, info.method, None if info.client_streaming else request, ctx
        )
        if self._orphans:
            self._reap_orphans()
        try:
            with self._send_lock:
                with self._lock:
                    if self._error is not None:
                        raise self._error
                    stream_id, frame = self._conn.open_stream(
                        wire, client_streaming=info.client_streaming
                    )
                    stream = ClientStream(self, stream_id, info, response_type, deadline)
                    self._streams[stream_id] = weakref.ref(stream)
                self._sock.sendall(frame)
        except OSError as exc:
            self._fail(exc)
        return stream

    def server_stream(
        self,
        service: str,
        method: str,
        request: Message,
        response_type: type[ResponseT],
        ctx: Context | None = None,
    ) -> ClientStream[ResponseT]:
        """A server-streaming call: ``for reply in client.server_stream(...)``."""
        return self.open_stream(
            service,
            method,
            response_type,
            ctx,
            request=request,
            client_streaming=False,
            server_streaming=True,
        )

    def client_stream(
        self,
        service: str,
        method: str,
        requests: Iterable[Message],
        response_type: type[ResponseT],
        ctx: Context | None = None,
    ) -> ResponseT:
        """A client-streaming call: sends every request (on this thread), returns the reply."""
        stream = self.open_stream(
            service, method, response_type, ctx, client_streaming=True, server_streaming=False
        )
        try:
            _send_all(stream, requests)
            return stream.result()
        finally:
            stream.cancel()

    def bidi_stream(
        self,
        service: str,
        method: str,
        requests: Iterable[Message] | None,
        response_type: type[ResponseT],
        ctx: Context | None = None,
    ) -> ClientStream[ResponseT]:
        """A bidi call. With ``requests``, a thread sends them and then closes the sending
        side; with None, use :meth:`ClientStream.send` and ``close_send``."""
        stream = self.open_stream(
            service, method, response_type, ctx, client_streaming=True, server_streaming=True
        )
        if requests is not None:
            threading.Thread(
                target=_pump, args=(stream, requests), name="ttrpc-send", daemon=True
            ).start()
        return stream

    def _send_frame(self, frame: bytes) -> None:
        try:
            with self._send_lock:
                self._sock.sendall(frame)
        except OSError as exc:
            self._fail(exc)

    def _abandon_locked(self, stream_id: int) -> bytes:
        """Caller holds the lock; returns the frame to send (outside it)."""
        self._streams.pop(stream_id, None)
        frame = self._conn.abandon_stream(stream_id)
        if not self._conn.backlogged:
            self._drained.notify_all()
        return frame if self._error is None else b""

    def _reap_orphans(self) -> None:
        """Abandon the streams queued for it (dropped unfinished, or failed)."""
        frames = []
        with self._lock:
            orphans, self._orphans = self._orphans, []
            for stream_id in orphans:
                frames.append(self._abandon_locked(stream_id))
        for frame in frames:
            if frame:
                self._send_frame(frame)

    # -- reading -------------------------------------------------------------

    def _read(self, waiter: _Waiter, deadline: float | None) -> None:
        """Read as the leader until our own call is done or its deadline passes."""
        sock = self._sock
        view = self._view  # only the reader uses it, and there is one reader at a time
        try:
            while not waiter.done:
                if self._orphans:
                    self._reap_orphans()
                if self._conn.backlogged and not self._wait_for_room(waiter, deadline):
                    return
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
                            self._stream_event(event, waiter)
                            continue
                        if isinstance(event, CallFailed):
                            w.error = event.error
                        else:
                            w.response = event.response  # type: ignore[union-attr]
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
                else:
                    for ref in self._streams.values():
                        stream = ref()
                        if stream is not None and stream is not waiter and not stream.done:
                            self._signal(stream)
                            break
                close_now = self._error is not None
            if close_now:
                self._close_socket()
            elif self._orphans:
                self._reap_orphans()

    def _stream_event(self, event: object, leader: _Waiter) -> None:
        # Caller holds the lock.
        stream_id = event.stream_id  # type: ignore[attr-defined]
        ref = self._streams.get(stream_id)
        stream = ref() if ref is not None else None
        if stream is None:
            if type(event) is StreamMessage:  # dropped, not yet abandoned: not buffered
                self._conn.message_consumed(stream_id, len(event.payload))
            return
        if stream._event(event) and stream is not leader:
            self._signal(stream)

    def _wait_for_room(self, waiter: _Waiter, deadline: float | None) -> bool:
        """A stream's buffer is full: wait for its consumer, failing it if it stalls.

        False when our own deadline passed first (the caller gives up leading).
        """
        with self._lock:
            self._progress = time.monotonic()
            while self._conn.backlogged and not waiter.done and self._error is None:
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    return False
                stall_at = self._progress + self._stall_timeout
                if now >= stall_at:
                    for stream_id in self._conn.full_streams():
                        ref = self._streams.get(stream_id)
                        stream = ref() if ref is not None else None
                        if stream is not None:
                            stream._end(stalled_error(stream_id, self._stall_timeout), drop=True)
                            self._signal(stream)
                        self._orphans.append(stream_id)
                    break
                wait = stall_at - now
                if deadline is not None:
                    wait = min(wait, deadline - now)
                self._drained.wait(wait)
        if self._orphans:
            self._reap_orphans()
        return True

    def _consumed(self, stream_id: int, nbytes: int) -> None:
        # Caller holds the lock.
        conn = self._conn
        conn.message_consumed(stream_id, nbytes)
        self._progress = time.monotonic()
        if not conn.backlogged:
            self._drained.notify_all()

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
            for ref in list(self._streams.values()):
                stream = ref()
                if stream is not None:
                    stream._end(error)
                    self._signal(stream)
            self._streams.clear()
            self._drained.notify_all()
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


def _stream_step(hook: Any, info: CallInfo, call_next: Any, request: Any, ctx: Context) -> Any:
    return hook(request, ctx, info, call_next)


class ClientStream(_Waiter, Generic[ResponseT]):
    """One streaming call, client side (blocking; one thread may send while another reads).

    ``for reply in stream`` (or :meth:`recv`) reads the server's messages;
    :meth:`send` and :meth:`close_send` write ours; :meth:`result` is the one
    reply of a client-streaming call. A non-OK end raises :class:`RpcError`
    from whichever of these is waiting. :meth:`cancel` (or leaving ``with``)
    gives up on the call: later messages are dropped and our sending side is
    closed, which is all the protocol can tell the server. A stream object
    dropped unfinished (a ``break`` out of a ``for``) is cancelled the same way.
    """

    __slots__ = (
        "__weakref__",
        "_callbacks",
        "_client",
        "_deadline",
        "_finished",
        "_queue",
        "_reply",
        "_response_type",
        "info",
        "stream_id",
    )

    def __init__(
        self,
        client: Client,
        stream_id: int,
        info: CallInfo,
        response_type: type[ResponseT],
        deadline: float | None,
    ) -> None:
        super().__init__()
        self._client = client
        self.stream_id = stream_id
        self.info = info
        self._response_type = response_type
        self._deadline = deadline
        self._queue: deque[bytes] = deque()
        self._finished = False
        self._reply: bytes | None = None
        self._callbacks: list[Callable[[RpcError | None], object]] = []

    # -- receiving --

    def recv(self) -> ResponseT | None:
        """The next message from the server; None once the stream ended OK."""
        payload = self._next_payload()
        if payload is None:
            return None
        try:
            return decode_message(payload, self._response_type)
        except RpcError as exc:
            self._abandon(exc)
            raise

    def _next_payload(self) -> bytes | None:
        client = self._client
        while True:
            with client._lock:
                if self.signalled:
                    self.signalled = False
                    self.wake.acquire(False)
                queue = self._queue
                if queue:
                    payload = queue.popleft()
                    if not queue and not self._finished:
                        self.done = False
                    client._consumed(self.stream_id, len(payload))
                    return payload
                if self._finished:
                    if self.error is not None:
                        raise self.error
                    return None
                self.done = False
                deadline = self._deadline
                remaining = None if deadline is None else deadline - time.monotonic()
                expired = remaining is not None and remaining <= 0
                lead = False
                if expired:
                    self._end(deadline_error(), drop=True)
                    client._orphans.append(self.stream_id)
                else:
                    lead = not client._reading
                    if lead:
                        client._reading = True
            if expired:
                client._reap_orphans()
            elif lead:
                client._read(self, deadline)
            else:
                self.wake.acquire(True, -1 if remaining is None else remaining)

    def __iter__(self) -> Iterator[ResponseT]:
        return self

    def __next__(self) -> ResponseT:
        message = self.recv()
        if message is None:
            raise StopIteration
        return message

    def result(self) -> ResponseT:
        """A client-streaming call's reply: closes our side, waits for the server's answer."""
        self.close_send()
        while self._next_payload() is not None:
            pass  # a client-streaming call has no messages; drop any
        if self._reply is None:
            raise RpcError(Code.INTERNAL, "ttrpc: stream ended without a response")
        return decode_message(self._reply, self._response_type)

    # -- sending --

    def send(self, message: Message) -> None:
        """Send one message (client-streaming and bidi calls)."""
        client = self._client
        payload = serialize(message, Message)
        deadline = self._deadline
        if deadline is not None and time.monotonic() >= deadline:
            self._abandon(deadline_error())
        try:
            with client._send_lock:
                with client._lock:
                    if self._finished:
                        raise self.error or finished_error()
                    frame = client._conn.send_message(self.stream_id, payload)
                client._sock.sendall(frame)
        except OSError as exc:
            client._fail(exc)
            raise client._error or ConnectionClosed() from None

    def close_send(self) -> None:
        """Tell the server we are done sending (idempotent)."""
        client = self._client
        try:
            with client._send_lock:
                with client._lock:
                    frame = b"" if self._finished else client._conn.close_send(self.stream_id)
                if frame:
                    client._sock.sendall(frame)
        except OSError as exc:
            client._fail(exc)

    # -- outcome --

    @property
    def finished(self) -> bool:
        """True once the call has ended (messages may still be waiting in :meth:`recv`)."""
        return self._finished

    def add_done_callback(self, fn: Callable[[RpcError | None], object]) -> None:
        """Call ``fn(error)`` when the call ends (``error`` None when OK); now if it has.

        It runs on whichever thread sees the end, possibly holding the client's lock:
        it must not call the client.
        """
        with self._client._lock:
            if not self._finished:
                self._callbacks.append(fn)
                return
        fn(self.error)

    def cancel(self) -> None:
        """Give up on the call: its remaining messages are dropped (CANCELLED)."""
        self._abandon(RpcError(Code.CANCELLED, "ttrpc: stream cancelled"))
        self._queue.clear()

    def __enter__(self) -> ClientStream[ResponseT]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cancel()

    def __del__(self) -> None:
        # Dropped unfinished: the next reader abandons it. No lock here: a finalizer
        # may run on a thread that holds it.
        if not getattr(self, "_finished", True):
            with contextlib.suppress(Exception):
                self._client._orphans.append(self.stream_id)

    # -- driven by the client (its lock held) --

    def _event(self, event: object) -> bool:
        """Take an event; True when there is now something for the consumer."""
        if self._finished:
            return False
        if type(event) is StreamMessage:
            self._queue.append(event.payload)
            self.done = True
            return True
        if type(event) is StreamEnded:
            self._end(None)
        elif type(event) is ResponseReceived:
            error = status_of_response(event.response)
            if error is None:
                self._reply = event.response.payload
            self._end(error)
        elif type(event) is CallFailed:
            self._end(event.error)
            self._client._orphans.append(self.stream_id)  # the core still knows it
        return True

    def _end(self, error: RpcError | None, *, drop: bool = False) -> None:
        """The call is over; ``drop``: we end it, so messages not yet read are dropped
        (a server's error comes after the messages it sent before it)."""
        if self._finished:
            return
        self._finished = True
        self.error = error
        self.done = True
        if drop:
            self._queue.clear()
        self._client._streams.pop(self.stream_id, None)
        callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            try:
                fn(error)
            except Exception:
                log.exception("ttrpc: stream done callback failed")

    def _abandon(self, error: RpcError) -> None:
        """End the call here with ``error`` and tell the core and the server."""
        client = self._client
        with client._lock:
            if self._finished:
                return
            self._end(error, drop=True)
            client._orphans.append(self.stream_id)
        client._reap_orphans()


def _send_all(stream: ClientStream[Any], requests: Iterable[Message]) -> None:
    """Send every request, then close our side; stops quietly if the call ends first."""
    try:
        for message in requests:
            if stream.finished:
                return
            stream.send(message)
        stream.close_send()
    except RpcError:
        if not stream.finished:
            raise


def _pump(stream: ClientStream[Any], requests: Iterable[Message]) -> None:
    try:
        _send_all(stream, requests)
    except Exception as exc:
        if stream.finished:
            return
        failure = RpcError(Code.CANCELLED, f"ttrpc: request iterator failed: {exc!r}")
        failure.__cause__ = exc
        stream._abandon(failure)


def connect(
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
    sock = (
        address if isinstance(address, socket.socket) else _address.connect_socket(address, timeout)
    )
    return Client(
        sock,
        max_message_length=max_message_length,
        on_close=on_close,
        interceptors=interceptors,
        stream_buffer_size=stream_buffer_size,
        stream_stall_timeout=stream_stall_timeout,
    )
