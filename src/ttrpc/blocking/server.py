"""Blocking ttrpc server: a thread reads each connection, handlers run on a thread pool."""

from __future__ import annotations

import contextlib
import errno
import heapq
import logging
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

from google.protobuf.message import Message

from ttrpc import _limits
from ttrpc import address as _address
from ttrpc._calls import deadline_error, decode_message, serialize, stalled_error
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


def _expired(ctx: Context) -> bool:
    """The call's deadline has passed: whatever its handler returns now, the answer is
    DEADLINE_EXCEEDED (a handler that stops on ``ctx.cancelled`` returns just then)."""
    return ctx.deadline is not None and time.monotonic() >= ctx.deadline


#: Seconds a handler may leave its full receive buffer untouched before its stream fails.
STREAM_STALL_TIMEOUT = 1.0
#: Default seconds a peer may leave the server's writes blocked (reading nothing) before
#: its connection is closed.
WRITE_TIMEOUT = 30.0
#: Bytes a connection may have waiting to be written before it stops reading and
#: dispatching, defers handlers not yet started and makes its stream senders wait;
#: all of that resumes once the peer has read it down to OUTPUT_LOW_WATER.
OUTPUT_HIGH_WATER = 256 * 1024
OUTPUT_LOW_WATER = 64 * 1024
#: Deferred calls resumed when the output drains (then one more as each call finishes).
_RESUME_DEFERRED = 8
_ACCEPT_POLL = 0.2
_ACCEPT_BACKOFF_MIN = 0.005
_ACCEPT_BACKOFF_MAX = 1.0
_DONTWAIT = socket.MSG_DONTWAIT

_Call = tuple[int, Callable[[Any, Context], Any], Method, Message, Context]


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
    """One served connection: a reader thread; handlers on the server's pool.

    Writing: whichever thread has a frame to send when nobody else is sending
    takes the writer's job and also sends what others queue meanwhile, as far
    as the socket takes it without waiting; the rest, and the job, go to the
    server's poller thread. So a peer that stops reading holds no handler
    thread. Past :data:`OUTPUT_HIGH_WATER` bytes waiting, the reader stops,
    handlers not started yet are deferred (their pool thread is given back)
    and stream senders wait; below :data:`OUTPUT_LOW_WATER` all resume.
    """

    def __init__(self, server: Server, sock: socket.socket, peer: PeerCredentials | None) -> None:
        self._server = server
        self._sock = sock
        self._peer = peer
        self._conn = ServerConnection(server.max_message_length, server.stream_buffer_size)
        self._lock = threading.Lock()  # guards _calls, _streams, the core and the write side
        self._drained = threading.Condition(self._lock)
        # Notified when the output drains, a call finishes while the reader waits, a stream
        # ends or fails, and when the connection closes.
        self._flow = threading.Condition(self._lock)
        self._calls: dict[int, Context] = {}
        self._streams: dict[int, ServerStream] = {}
        self._progress = 0.0
        self._closed = False
        self._max_calls = server.max_calls_per_connection
        self._calls_resume = 0 if self._max_calls is None else _limits.resume_below(self._max_calls)
        self._reader_waits = False
        # The write side (all under _lock).
        self._out: list[bytes] = []  # frames queued behind the write in progress
        self._out_bytes = 0  # bytes accepted for writing and not sent yet
        self._writing = False  # some thread is the writer
        self._backlogged = False  # over the high-water mark (until below the low one)
        self._deferred: list[_Call] = []  # unary calls waiting for the backlog to clear
        self._close_when_flushed = False
        self.thread = threading.Thread(target=self._read_loop, name="ttrpc-conn", daemon=True)

    @property
    def idle(self) -> bool:
        with self._lock:
            return not self._calls

    def _read_loop(self) -> None:
        sock = self._sock
        conn = self._conn
        registry = self._server._registry
        limit = self._max_calls
        # Reading into one kept buffer spares a fresh allocation (and its page faults) per read.
        view = read_buffer()
        try:
            while True:
                if conn.backlogged:
                    self._wait_for_room()
                if self._backlogged:
                    self._wait_to_dispatch()
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
                    self._write(out)
                for event in requests:
                    if type(event) is not RequestReceived:
                        if conn.open_streams:
                            with self._lock:
                                self._stream_events([event])
                        continue
                    if self._backlogged or (
                        limit is not None and len(self._calls) - len(self._streams) >= limit
                    ):
                        self._wait_to_dispatch()
                        if self._closed:
                            break
                    stream_id = event.stream_id
                    try:
                        method, message, ctx = registry.prepare(event.request, self._peer)
                    except RpcError as exc:
                        self._write(conn.encode_error(stream_id, exc.to_status()))
                        continue
                    if ctx.deadline is not None and ctx.deadline <= time.monotonic():
                        self._write(conn.encode_error(stream_id, _DEADLINE_STATUS))
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
        except RuntimeError:  # the pool is shut down: the server is closing
            pass
        finally:
            self.close()
            with self._lock:
                while self._writing:  # a writer uses the fd: it stops at once, the socket is shut
                    self._flow.wait()
            self._sock.close()  # only this thread closes, so the fd cannot be reused under a user

    def _wait_to_dispatch(self) -> None:
        """The peer is not reading our answers, or it has max_calls_per_connection unary
        calls in flight: dispatch (and read) nothing more until that changes."""
        limit = self._max_calls
        resume = self._calls_resume
        with self._lock:
            self._reader_waits = True
            while not self._closed and (
                self._backlogged
                or (limit is not None and len(self._calls) - len(self._streams) >= resume)
            ):
                self._flow.wait()
            self._reader_waits = False

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
        if self._backlogged and self._defer((stream_id, handler, method, message, ctx)):
            return
        conn = self._conn
        try:
            result = handler(message, ctx)
            if _expired(ctx):
                # As if the deadline had been answered first: the late result is dropped.
                with self._lock:
                    frame = conn.encode_error(stream_id, _DEADLINE_STATUS)
            else:
                payload = encode_result(method, result)
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

    def _defer(self, call: _Call) -> bool:
        """Keep a unary call whose handler has not started while the peer reads nothing:
        its pool thread goes back to the pool; the writer resubmits it once output drains."""
        with self._lock:
            if self._closed:
                return True  # nobody to answer
            if not self._backlogged:
                return False
            self._deferred.append(call)
            return True

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
                if _expired(stream.ctx):
                    frame = conn.encode_error(stream_id, _DEADLINE_STATUS)
                elif method.server_streaming:
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
            while self._backlogged and not self._closed and not stream._finished:
                self._flow.wait()  # the peer is not reading: wait for it (or the call's end)
            if self._closed or stream._finished:
                raise stream._failure or RpcError(Code.CANCELLED, "ttrpc: the call has ended")
            mine = self._claim(frame)
        if mine:
            self._write_out(frame)

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
                self._flow.notify_all()
            frame = self._conn.encode_error(stream_id, _DEADLINE_STATUS) if ctx else b""
        if ctx is not None:
            # Answered before the handler hears of it: a handler that returns as soon as
            # it sees the cancellation must find the call answered, not answer it itself.
            self._finish(stream_id, frame)
            ctx.cancel()

    def _finish(self, stream_id: int, frame: bytes) -> None:
        with self._lock:
            stream = self._streams.pop(stream_id, None)
            if stream is not None:
                stream._finished = True
                stream._cond.notify_all()
                if not self._conn.backlogged:
                    self._drained.notify_all()
            if self._deferred and not self._backlogged:
                self._resume_deferred(1)
            if self._calls.pop(stream_id, None) is None or self._closed:
                return  # already answered (deadline) or the connection is gone
            if self._reader_waits:
                self._flow.notify_all()
            if stream is not None and stream._reset_by_peer:
                self._conn.forget_stream(stream_id)
                mine = False
            else:
                mine = self._claim(frame)
            idle = not self._calls
        if mine:
            self._write_out(frame)
        if idle and self._server._shutting_down:
            self.close_when_flushed()

    # -- writing -------------------------------------------------------------------------

    def _claim(self, frame: bytes) -> bool:
        """Lock held, connection open: queue ``frame`` behind the write in progress, or
        become the writer (True: call :meth:`_write_out` with it once the lock is released)."""
        self._out_bytes += len(frame)
        if self._out_bytes > OUTPUT_HIGH_WATER:
            self._backlogged = True
        if self._writing:
            self._out.append(frame)
            return False
        self._writing = True
        return True

    def _write(self, frame: bytes) -> None:
        with self._lock:
            if self._closed:
                return
            mine = self._claim(frame)
        if mine:
            self._write_out(frame)

    def _write_out(self, data: bytes) -> None:
        """The writer's job (lock not held): send ``data``, then whatever was queued meanwhile,
        as far as the socket takes it at once. What the peer is too slow to take goes to the
        server's poller thread with the job: no handler thread ever waits for a peer."""
        try:
            while True:
                sent = self._sock.send(data, _DONTWAIT)
                if sent < len(data):
                    self._hand_over(data, sent)
                    return
                more = self._next_batch(sent)
                if more is None:
                    return
                data = more
        except BlockingIOError:
            self._hand_over(data, 0)
        except OSError:
            self._write_failed()

    def _hand_over(self, data: bytes, sent: int) -> None:
        if sent:
            self._sent(sent)
        if not self._server._poller.flush(self, memoryview(data)[sent:]):
            self._write_failed()

    def _sent(self, nbytes: int) -> None:
        """Some bytes went out (the writer's job continues)."""
        with self._lock:
            self._count_sent(nbytes)

    def _count_sent(self, nbytes: int) -> None:
        """Lock held: ``nbytes`` left the output; unblock the reader once it drained."""
        self._out_bytes -= nbytes
        if self._backlogged and self._out_bytes <= OUTPUT_LOW_WATER:
            self._unblock()

    def _next_batch(self, nbytes: int) -> bytes | None:
        """The writer sent ``nbytes``, all it had: what was queued meanwhile, or None (the
        writer's job is over)."""
        close = False
        with self._lock:
            self._count_sent(nbytes)
            out = self._out
            if out and not self._closed:
                self._out = []
                return out[0] if len(out) == 1 else b"".join(out)
            self._writing = False
            if self._closed:
                self._flow.notify_all()  # the reader thread waits for this to close the fd
            close = self._close_when_flushed
        if close:
            self.close()
        return None

    def _write_failed(self) -> None:
        """The peer is gone (or read nothing for write_timeout): give up the writer's job."""
        with self._lock:
            self._writing = False
            self._out = []
            self._flow.notify_all()
        self.close()

    def _unblock(self) -> None:
        """Lock held: the output drained below the low-water mark."""
        self._backlogged = False
        self._flow.notify_all()
        if self._deferred:
            self._resume_deferred(_RESUME_DEFERRED)

    def _resume_deferred(self, count: int) -> None:
        """Lock held: hand up to ``count`` deferred calls back to the pool. A few at a time:
        all at once, every one of them could answer before the peer reads again."""
        deferred = self._deferred
        submit = self._server._pool.submit
        while count and deferred and not self._closed:
            call = deferred.pop(0)
            if call[0] not in self._calls:
                continue  # answered meanwhile (its deadline passed)
            try:
                submit(self._run, *call)
            except RuntimeError:  # the pool is shut down: the server is closing
                deferred.clear()
                return
            count -= 1

    # -- closing -------------------------------------------------------------------------

    def close_when_flushed(self) -> None:
        """Close once what is queued has been written (at once if nothing is)."""
        with self._lock:
            if self._writing:
                self._close_when_flushed = True
                return
        self.close()

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
            self._deferred.clear()
            self._out = []
            self._drained.notify_all()
            self._flow.notify_all()
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
        self._connection._flow.notify_all()

    def _fail(self, error: RpcError) -> None:
        """End the call with ``error``: the handler's next recv/send raises it."""
        self._failure = error
        self._finished = True
        self._queue.clear()
        self.ctx.cancel()
        self._cond.notify_all()
        self._connection._flow.notify_all()


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


class _Poller:
    """One thread, started on first use, for a server's chores that must never hold a
    handler thread: answering connections over the limit (each request gets
    RESOURCE_EXHAUSTED, then the connection is closed: once a request has been answered,
    or after :data:`~ttrpc._limits.REFUSAL_TIMEOUT` seconds), and finishing writes that
    a peer is slow to read (closing a connection whose peer reads nothing for
    ``write_timeout`` seconds)."""

    def __init__(self, write_timeout: float | None) -> None:
        self._write_timeout = write_timeout
        self._lock = threading.Lock()
        self._refuse: list[tuple[socket.socket, int]] = []
        self._flush: list[tuple[_Connection, memoryview]] = []
        self._wake: tuple[socket.socket, socket.socket] | None = None
        self._thread: threading.Thread | None = None
        self._stopped = False
        self.refusing = 0  # connections being refused (queued or open)

    def refuse(self, sock: socket.socket, limit: int) -> bool:
        """Take over ``sock``; False (the caller closes it) when too many are being refused."""
        with self._lock:
            if self.refusing >= _limits.MAX_REFUSING or not self._running():
                return False
            self.refusing += 1
            self._refuse.append((sock, limit))
            self._poke()
        return True

    def flush(self, conn: _Connection, rest: memoryview) -> bool:
        """Take over ``conn``'s writer job, ``rest`` still to send; False if it cannot."""
        with self._lock:
            if not self._running():
                return False
            self._flush.append((conn, rest))
            self._poke()
        return True

    def _running(self) -> bool:
        # Lock held.
        if self._stopped:
            return False
        if self._thread is not None:
            return True
        try:
            wake = socket.socketpair()
        except OSError:  # out of descriptors, say
            return False
        for end in wake:
            end.setblocking(False)
        thread = threading.Thread(target=self._run, args=(wake[0],), name="ttrpc-poller")
        thread.daemon = True
        try:
            thread.start()
        except RuntimeError:
            for end in wake:
                end.close()
            return False
        self._wake, self._thread = wake, thread
        return True

    def _poke(self) -> None:
        # Lock held. A full wake pipe already has a wake-up pending.
        if self._wake is not None:
            with contextlib.suppress(OSError):
                self._wake[1].send(b"x")

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._poke()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5)

    def _run(self, wake: socket.socket) -> None:
        selector = selectors.DefaultSelector()
        selector.register(wake, selectors.EVENT_READ)
        refusals: dict[socket.socket, tuple[RefusingConnection, float]] = {}
        # Per connection: what is left of its current chunk, and when it times out.
        flushes: dict[_Connection, tuple[memoryview, float]] = {}
        timeout = self._write_timeout
        forever = float("inf")

        def end_refusal(sock: socket.socket) -> None:
            selector.unregister(sock)
            del refusals[sock]
            sock.close()
            with self._lock:
                self.refusing -= 1

        def end_flush(conn: _Connection, failed: bool) -> None:
            selector.unregister(conn._sock)  # before the writer job goes back: then it may close
            del flushes[conn]
            if failed:
                conn._write_failed()

        def refused(sock: socket.socket) -> None:
            try:
                data = sock.recv(_limits.REFUSAL_READ_SIZE)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                end_refusal(sock)
                return
            conn = refusals[sock][0]
            out = conn.receive_data(data)
            if out:
                with contextlib.suppress(OSError):  # best effort: a few dozen bytes
                    sock.send(out)
            if conn.answered and not conn.mid_frame:
                end_refusal(sock)

        def flushed(conn: _Connection) -> None:
            view, deadline = flushes[conn]
            while True:
                try:
                    sent = conn._sock.send(view, _DONTWAIT)
                except BlockingIOError:
                    break
                except OSError:
                    end_flush(conn, failed=True)
                    return
                view = view[sent:]
                if timeout is not None:
                    deadline = time.monotonic() + timeout  # progress
                if view:
                    conn._sent(sent)
                    break
                # Off the selector before the job may go back: then the fd may be closed.
                end_flush(conn, failed=False)
                more = conn._next_batch(sent)
                if more is None:
                    return
                view = memoryview(more)
                selector.register(conn._sock, selectors.EVENT_WRITE, conn)
                flushes[conn] = (view, deadline)
            flushes[conn] = (view, deadline)

        try:
            while True:
                deadlines = [d for _, d in refusals.values()]
                deadlines += [d for _, d in flushes.values()]
                wait = None
                if deadlines and min(deadlines) < forever:
                    wait = max(0.0, min(deadlines) - time.monotonic())
                for key, _ in selector.select(wait):
                    sock = cast(socket.socket, key.fileobj)
                    if key.data is not None:
                        if key.data in flushes:
                            flushed(key.data)
                    elif sock is wake:
                        with contextlib.suppress(OSError):
                            wake.recv(4096)
                    elif sock in refusals:
                        refused(sock)
                now = time.monotonic()
                for sock in [s for s, (_, d) in refusals.items() if d <= now]:
                    end_refusal(sock)
                for conn in [c for c, (_, d) in flushes.items() if d <= now]:
                    log.warning(
                        "ttrpc: peer %s read nothing for %g s: closing its connection",
                        conn._peer,
                        timeout,
                    )
                    end_flush(conn, failed=True)
                with self._lock:
                    refuse, self._refuse = self._refuse, []
                    flush, self._flush = self._flush, []
                    stopped = self._stopped
                for sock, limit in refuse:
                    sock.setblocking(False)
                    message = _limits.refusal_message(limit)
                    refusals[sock] = (
                        RefusingConnection(Code.RESOURCE_EXHAUSTED, message),
                        now + _limits.REFUSAL_TIMEOUT,
                    )
                    selector.register(sock, selectors.EVENT_READ)
                for conn, rest in flush:
                    deadline = forever if timeout is None else now + timeout
                    flushes[conn] = (rest, deadline)
                    selector.register(conn._sock, selectors.EVENT_WRITE, conn)
                if stopped:
                    break
        finally:
            for sock in list(refusals):
                end_refusal(sock)
            for conn in list(flushes):
                end_flush(conn, failed=True)
            selector.close()
            with self._lock:
                refuse, self._refuse = self._refuse, []
                flush, self._flush = self._flush, []
                self.refusing -= len(refuse)
                if self._wake is not None:
                    for end in self._wake:
                        end.close()
                    self._wake = None
            for sock, _ in refuse:
                sock.close()
            for conn, _ in flush:
                conn._write_failed()


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
    ``handshake``, ``interceptors``, ``stream_buffer_size``,
    ``stream_stall_timeout``, ``max_connections`` (default 1024; a connection
    over it has each request answered RESOURCE_EXHAUSTED, then is closed) and
    ``max_calls_per_connection`` (default 1024 unary calls in flight; at the
    limit the connection is not read until a quarter of them have finished)
    are as for :class:`ttrpc.aio.Server`. Each connection has a reader thread.

    A peer that stops reading holds no handler thread: answers it is slow to
    take are queued, and one poller thread per server sends them as it reads.
    Once :data:`OUTPUT_HIGH_WATER` bytes wait, the connection is not read,
    its handlers not started yet are deferred (without a thread) and its
    stream senders wait (a streaming handler keeps its thread, as always);
    what stays buffered is the high-water mark plus the answers of handlers
    already running. If the peer reads nothing for ``write_timeout`` seconds
    (default 30; None: wait for ever) its connection is closed, which ends
    its waiting stream senders too. Other connections go on meanwhile.
    Running out of descriptors (EMFILE) on accept is logged and retried with
    a backoff (5 ms doubling up to 1 s), as Go's server does.
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
        max_connections: int | None = _limits.MAX_CONNECTIONS,
        max_calls_per_connection: int | None = _limits.MAX_CALLS_PER_CONNECTION,
        write_timeout: float | None = WRITE_TIMEOUT,
    ) -> None:
        self.handshake = handshake
        self.max_message_length = max_message_length
        self.stream_buffer_size = stream_buffer_size
        self.stream_stall_timeout = stream_stall_timeout
        self.max_connections = _limits.check_max_connections(max_connections)
        self.max_calls_per_connection = _limits.check_max_calls(max_calls_per_connection)
        if write_timeout is not None and not write_timeout > 0:
            raise ValueError("write_timeout must be None or positive")
        self.write_timeout = write_timeout
        self._on_connection_closed = on_connection_closed
        self._registry = ServiceRegistry(
            asynchronous=False, interceptors=check_interceptors(interceptors)
        )
        self._poller = _Poller(write_timeout)
        self._refusals = _limits.RateLimitedLog()
        self._accept_errors = _limits.RateLimitedLog()
        self._accept_stop = threading.Event()
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

    @property
    def connections(self) -> int:
        """Connections being served now (not counting those refused over the limit)."""
        with self._lock:
            return len(self._connections)

    def _accept_loop(self, sock: socket.socket) -> None:
        backoff = 0.0
        while not self._shutting_down:
            try:
                client, _ = sock.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self._shutting_down:
                    return
                if exc.errno in _limits.ACCEPT_CONNECTION_ERRORS:
                    continue  # that connection is gone; the listener is fine
                if exc.errno in (errno.EBADF, errno.EINVAL, errno.ENOTSOCK):
                    log.error("ttrpc: listener closed under the server: %s", exc)
                    return
                # Out of descriptors or memory (or unknown): the connection waits in the
                # backlog. Back off instead of spinning on it, and try again.
                backoff = min(max(backoff * 2, _ACCEPT_BACKOFF_MIN), _ACCEPT_BACKOFF_MAX)
                self._accept_errors.warning(
                    "ttrpc: accept failed (%s); retrying in %g s", exc, backoff
                )
                if self._accept_stop.wait(backoff):
                    return
                continue
            backoff = 0.0
            try:
                peer = peer_credentials(client)
            except OSError:
                peer = None
            if self.handshake is not None and not self.handshake(peer):
                log_refusal(peer)
                client.close()
                continue
            limit = self.max_connections
            with self._lock:
                if self._shutting_down:
                    client.close()
                    return
                over = limit is not None and len(self._connections) >= limit
                if not over:
                    conn = _Connection(self, client, peer)
                    self._connections.add(conn)
            if over:
                assert limit is not None
                self._refuse(client, limit)
                continue
            try:
                conn.thread.start()
            except RuntimeError as exc:  # can't start new thread
                self._accept_errors.warning("ttrpc: cannot serve a connection: %s", exc)
                with self._lock:
                    self._connections.discard(conn)
                    self._cond.notify_all()
                client.close()

    def _refuse(self, client: socket.socket, limit: int) -> None:
        if self._poller.refuse(client, limit):
            self._refusals.warning(
                "ttrpc: connection limit (%d) reached: answering a new connection "
                "RESOURCE_EXHAUSTED and closing it",
                limit,
            )
            return
        self._refusals.warning(
            "ttrpc: connection limit (%d) reached and %d refusals under way: "
            "closing a new connection without a reply",
            limit,
            self._poller.refusing,
        )
        client.close()

    def _stop_listening(self) -> None:
        self._accept_stop.set()
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
                conn.close_when_flushed()
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
        self._poller.stop()
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
