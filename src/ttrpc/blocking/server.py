"""Blocking ttrpc server: a thread reads each connection, handlers run on a thread pool."""

from __future__ import annotations

import contextlib
import heapq
import logging
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from google.protobuf.message import Message

from ttrpc import address as _address
from ttrpc.context import Context
from ttrpc.handshake import Handshake, PeerCredentials, peer_credentials
from ttrpc.protocol import MAX_MESSAGE_LENGTH, READ_SIZE, ServerConnection
from ttrpc.service import Method, Service, ServiceProvider, ServiceRegistry, encode_result
from ttrpc.status import Code, RpcError, status_from_exception
from ttrpc.ttrpc_pb2 import Status

__all__ = ["Server"]

log = logging.getLogger("ttrpc")

_DEADLINE_STATUS = Status(code=Code.DEADLINE_EXCEEDED, message="context deadline exceeded")


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
        self._conn = ServerConnection(server.max_message_length)
        self._lock = threading.Lock()  # guards _calls and the socket's write side
        self._calls: dict[int, Context] = {}
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
        view = memoryview(bytearray(READ_SIZE))
        try:
            while True:
                n = sock.recv_into(view)
                if not n:
                    break
                events = conn.receive_data(view[:n])
                out = conn.data_to_send()
                if out:
                    self._send(out)
                for event in events:
                    stream_id = event.stream_id
                    try:
                        method, message, ctx = registry.prepare(event.request, self._peer)
                    except RpcError as exc:
                        self._send(conn.encode_error(stream_id, exc.to_status()))
                        continue
                    if ctx.deadline is not None and ctx.deadline <= time.monotonic():
                        self._send(conn.encode_error(stream_id, _DEADLINE_STATUS))
                        continue
                    with self._lock:
                        self._calls[stream_id] = ctx
                    if ctx.deadline is not None:
                        self._server._deadlines.add(ctx.deadline, self, stream_id)
                    self._server._pool.submit(self._run, stream_id, method, message, ctx)
        except OSError:
            pass
        finally:
            self.close()
            self._sock.close()  # only this thread reads, so the fd cannot be reused under it

    def _run(self, stream_id: int, method: Method, message: Message, ctx: Context) -> None:
        conn = self._conn
        try:
            frame = conn.encode_response(
                stream_id, encode_result(method, method.handler(message, ctx))
            )
        except Exception as exc:
            if not isinstance(exc, RpcError):
                log.debug("ttrpc: handler %s raised", ctx.method, exc_info=True)
            frame = conn.encode_error(stream_id, status_from_exception(exc))
        self._finish(stream_id, frame)

    def expire(self, stream_id: int) -> None:
        """The call's deadline passed: answer now; the handler's late result is dropped."""
        with self._lock:
            ctx = self._calls.get(stream_id)
        if ctx is not None:
            ctx.cancel()
            self._finish(stream_id, self._conn.encode_error(stream_id, _DEADLINE_STATUS))

    def _finish(self, stream_id: int, frame: bytes) -> None:
        with self._lock:
            if self._calls.pop(stream_id, None) is None or self._closed:
                return  # already answered (deadline) or the connection is gone
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
        for ctx in calls:
            ctx.cancel()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the reader thread, which closes
        self._server._connection_closed(self)


class Server:
    """Serves registered services with threads; handlers are plain functions.

    ::

        server = Server()
        server.register(MyService())
        server.start("unix:///run/my.sock")   # or serve() to block here
        ...
        server.shutdown(timeout=5)

    ``max_workers`` bounds the handler threads shared by all connections.
    """

    def __init__(
        self,
        *,
        handshake: Handshake | None = None,
        max_message_length: int = MAX_MESSAGE_LENGTH,
        max_workers: int = 64,
        on_connection_closed: Callable[[], object] | None = None,
    ) -> None:
        self.handshake = handshake
        self.max_message_length = max_message_length
        self._on_connection_closed = on_connection_closed
        self._registry = ServiceRegistry(asynchronous=False)
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
