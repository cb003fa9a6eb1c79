"""Coverage-guided fuzzing of a live server: fuzzer bytes are a client on a real connection.

    python fuzz/fuzz_server.py -atheris_runs=1000000 [corpus_dir]      # the asyncio server
    FUZZ_SERVER=blocking python fuzz/fuzz_server.py ...                # the threaded one
    python fuzz/fuzz_server.py --write-seeds DIR                       # the seed corpus

One server lives for the whole run (small limits: 4 KiB messages, 512-byte
stream buffers, 4 calls per connection, so that the limit paths are reached).
Each input gets a fresh connection (a socket pair handed to the server as if
accepted): the input is cut into pieces whose sizes come from its first bytes
(as in ``fuzz_protocol.py``), written piece by piece, then the client closes
its side and reads everything until the server hangs up. An input whose last
byte is a multiple of 8 goes instead to a server at its connection limit.

A crash is any of:

- an exception escaping the server: a handler task that ended with one, an
  error the event loop reported, an ERROR record logged by ``ttrpc`` or
  ``asyncio``, a connection thread that died (blocking);
- the server not hanging up within 5 s of the client's end of input, or
  leaving a connection, task or thread behind;
- an answer that is not a well-formed frame (a Response that does not decode,
  an unknown type, a stream id the client never used, more than 4 KiB);
- a well-formed Echo call on a fresh connection afterwards not answered, or
  answered wrongly.

``test_one_input`` needs no atheris: ``tests/reliability/test_fuzz_server.py``
runs it over :func:`seeds` in CI.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import socket
import struct
import sys
import termios
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

try:
    import atheris
except ImportError:  # the one-input function runs without it (tests)
    atheris = None

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from inputs import split

if atheris is not None and __name__ == "__main__":
    with atheris.instrument_imports(include=["ttrpc"]):
        import ttrpc.aio.server
        import ttrpc.blocking.server
        import ttrpc.protocol
        import ttrpc.service
else:
    import ttrpc.aio.server
    import ttrpc.blocking.server
    import ttrpc.protocol
    import ttrpc.service

from ttrpc.context import Context
from ttrpc.protocol import (
    FLAG_REMOTE_CLOSED,
    FLAG_REMOTE_OPEN,
    FLAGS_CLOSE,
    HEADER_LENGTH,
    MESSAGE_TYPE_DATA,
    MESSAGE_TYPE_REQUEST,
    MESSAGE_TYPE_RESPONSE,
    Frame,
    FrameReader,
    encode_frame,
)
from ttrpc.service import Method, Service
from ttrpc.status import Code, RpcError
from ttrpc.ttrpc_pb2 import KeyValue, Request, Response

LIMIT = 4096  # max_message_length
STREAM_BUFFER = 512
MAX_CALLS = 4
DEADLINE = 5.0  # seconds the server has to hang up after the client's end of input
SERVICE = "fuzz.v1.Fuzz"
STREAMS = "fuzz.v1.Streams"
KIND = os.environ.get("FUZZ_SERVER", "aio")


# -- the services: quick handlers covering every kind of call and every outcome ---------


def _answer(req: KeyValue, ctx: Context) -> KeyValue:
    """Echo, with a twist per key: fail in several ways, answer oversize, show metadata."""
    if req.key == "rpc":
        raise RpcError(Code.FAILED_PRECONDITION, req.value)
    if req.key == "value":
        raise ValueError(req.value)
    if req.key == "boom":
        raise RuntimeError(req.value)
    if req.key == "big":
        return KeyValue(value="x" * min(len(req.value) * 256, 2 * LIMIT))
    if req.key == "md":
        return KeyValue(key=ctx.method, value=repr(ctx.metadata.pairs()))
    return KeyValue(key=req.key, value=req.value)


def _count(req: KeyValue) -> int:
    return min(len(req.key), 16)


async def _aio_unary(req: KeyValue, ctx: Context) -> KeyValue:
    return _answer(req, ctx)


async def _aio_down(req: KeyValue, ctx: Context) -> AsyncIterator[KeyValue]:
    for i in range(_count(req)):
        yield KeyValue(key=str(i), value=req.value)
    if req.value == "fail":
        raise RpcError(Code.ABORTED, "failed mid-stream")


async def _aio_up(reqs: AsyncIterator[KeyValue], ctx: Context) -> KeyValue:
    keys = [r.key async for r in reqs]
    if "fail" in keys:
        raise RpcError(Code.ABORTED, "asked to fail")
    return KeyValue(key=",".join(keys)[:64], value=str(len(keys)))


async def _aio_both(reqs: AsyncIterator[KeyValue], ctx: Context) -> AsyncIterator[KeyValue]:
    async for r in reqs:
        if r.key == "stop":
            return
        yield _answer(r, ctx)


def _sync_unary(req: KeyValue, ctx: Context) -> KeyValue:
    return _answer(req, ctx)


def _sync_down(req: KeyValue, ctx: Context) -> Iterator[KeyValue]:
    for i in range(_count(req)):
        yield KeyValue(key=str(i), value=req.value)
    if req.value == "fail":
        raise RpcError(Code.ABORTED, "failed mid-stream")


def _sync_up(reqs: Iterator[KeyValue], ctx: Context) -> KeyValue:
    keys = [r.key for r in reqs]
    if "fail" in keys:
        raise RpcError(Code.ABORTED, "asked to fail")
    return KeyValue(key=",".join(keys)[:64], value=str(len(keys)))


def _sync_both(reqs: Iterator[KeyValue], ctx: Context) -> Iterator[KeyValue]:
    for r in reqs:
        if r.key == "stop":
            return
        yield _answer(r, ctx)


def _services(asynchronous: bool) -> list[Service]:
    unary, down, up, both = (
        (_aio_unary, _aio_down, _aio_up, _aio_both)
        if asynchronous
        else (_sync_unary, _sync_down, _sync_up, _sync_both)
    )
    kv = KeyValue
    return [
        Service(SERVICE, {"Echo": Method("Echo", kv, kv, unary)}),
        Service(
            STREAMS,
            {
                "Down": Method("Down", kv, kv, down, server_streaming=True),
                "Up": Method("Up", kv, kv, up, client_streaming=True),
                "Both": Method("Both", kv, kv, both, client_streaming=True, server_streaming=True),
            },
        ),
    ]


SERVER_OPTIONS: dict[str, Any] = {
    "max_message_length": LIMIT,
    "stream_buffer_size": STREAM_BUFFER,
    "stream_stall_timeout": 0.05,
    "max_calls_per_connection": MAX_CALLS,
}


# -- inputs -----------------------------------------------------------------------------


def to_refuse(data: bytes) -> bool:
    return bool(data) and data[-1] % 8 == 0


def _request(stream_id: int, service: str, method: str, msg: KeyValue, flags: int = 0) -> bytes:
    body = Request(service=service, method=method, payload=msg.SerializeToString())
    return encode_frame(stream_id, MESSAGE_TYPE_REQUEST, body.SerializeToString(), flags)


def _data(stream_id: int, msg: KeyValue | None, flags: int = 0) -> bytes:
    if msg is None:
        return encode_frame(stream_id, MESSAGE_TYPE_DATA, b"", flags)
    return encode_frame(stream_id, MESSAGE_TYPE_DATA, msg.SerializeToString(), flags)


def seeds() -> list[bytes]:
    """A small corpus of inputs: every kind of call and the usual protocol mistakes.

    Each starts with a split prefix (one cut of 255 bytes: the frames are fed whole) and
    ends with a byte that is not a multiple of 8 (the served path), except the ones for
    the refusing server.
    """
    prefix = b"\x00\xff"
    kv = KeyValue
    with_md = Request(
        service=SERVICE,
        method="Echo",
        payload=kv(key="md").SerializeToString(),
        timeout_nano=10**9,
    )
    with_md.metadata.add(key="k", value="v")
    calls = [
        _request(1, SERVICE, "Echo", kv(key="a", value="b")),
        _request(1, SERVICE, "Echo", kv(key="rpc", value="no"))
        + _request(3, SERVICE, "Echo", kv(key="value"))
        + _request(5, SERVICE, "Echo", kv(key="boom"))
        + _request(7, SERVICE, "Echo", kv(key="big", value="x" * 32)),
        encode_frame(1, MESSAGE_TYPE_REQUEST, with_md.SerializeToString()),
        _request(1, STREAMS, "Down", kv(key="abcd"), FLAG_REMOTE_CLOSED),
        _request(1, STREAMS, "Down", kv(key="ab", value="fail"), FLAG_REMOTE_CLOSED),
        _request(1, STREAMS, "Up", kv(), FLAG_REMOTE_OPEN)
        + _data(1, kv(key="x"))
        + _data(1, kv(key="y"))
        + _data(1, None, FLAGS_CLOSE),
        _request(1, STREAMS, "Both", kv(), FLAG_REMOTE_OPEN)
        + b"".join(_data(1, kv(key=str(i))) for i in range(40))
        + _data(1, kv(key="stop"), FLAG_REMOTE_CLOSED),
        b"".join(_request(2 * i + 1, SERVICE, "Echo", kv(key=str(i))) for i in range(12)),
        # Protocol mistakes: even id, reused id, unknown method, garbage request, data
        # for an unknown stream, oversize frame, unknown type, truncated frame.
        _request(2, SERVICE, "Echo", kv()),
        _request(3, SERVICE, "Echo", kv()) + _request(1, SERVICE, "Echo", kv()),
        _request(1, SERVICE, "Nope", kv()) + _request(3, "no.Such", "Echo", kv()),
        encode_frame(1, MESSAGE_TYPE_REQUEST, b"\x0a\x7fabc"),
        _data(9, kv(key="stray")),
        struct.pack(">IIBB", LIMIT + 1, 1, MESSAGE_TYPE_REQUEST, 0) + b"\x00" * (LIMIT + 1),
        encode_frame(1, 0x7F, b"future"),
        _request(1, SERVICE, "Echo", kv(key="cut"))[:-3],
        b"",
    ]
    out = [prefix + call + b"\x01" for call in calls]
    out += [prefix + calls[0] + b"\x00", prefix + calls[1] + calls[7][:-1] + b"\x08"]
    return out


# -- checking what the server wrote -----------------------------------------------------


def _client_ids(data: bytes) -> set[int]:
    """The stream ids in the headers of the frames the client sent (the last frame may
    be cut short: a refusal answers a request from its header)."""
    stream = b"".join(split(data))
    ids = set()
    pos = 0
    while len(stream) - pos >= HEADER_LENGTH:
        length, stream_id = struct.unpack_from(">II", stream, pos)
        ids.add(stream_id)
        pos += HEADER_LENGTH + length
    return ids


def check_answers(data: bytes, answers: bytes, refused: bool) -> None:
    reader = FrameReader(ttrpc.protocol.PROTOCOL_MAX_MESSAGE_LENGTH)
    frames = reader.feed(answers)
    assert reader.buffered == 0, f"{reader.buffered} bytes of a cut frame at the end"
    ids = _client_ids(data)
    for frame in frames:
        assert isinstance(frame, Frame)
        assert len(frame.payload) <= LIMIT, f"a frame of {len(frame.payload)} bytes"
        assert frame.stream_id in ids, f"an answer on stream {frame.stream_id}, never used"
        if frame.type == MESSAGE_TYPE_RESPONSE:
            response = Response.FromString(frame.payload)
            if refused:
                assert response.status.code == Code.RESOURCE_EXHAUSTED, response
        else:
            assert frame.type == MESSAGE_TYPE_DATA and not refused, frame


FOLLOW_UP = _request(1, SERVICE, "Echo", KeyValue(key="follow", value="up"))


def check_follow_up(answer: bytes) -> None:
    frames = FrameReader(LIMIT).feed(answer)
    assert len(frames) == 1, f"follow-up: {frames!r}"
    frame = frames[0]
    assert isinstance(frame, Frame) and frame.type == MESSAGE_TYPE_RESPONSE, frame
    response = Response.FromString(frame.payload)
    assert response.status.code == Code.OK, response
    assert KeyValue.FromString(response.payload) == KeyValue(key="follow", value="up")


class _Errors(logging.Handler):
    """ERROR records from ttrpc and asyncio: a server never logs one for a client's bytes."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def check(self) -> None:
        if self.records:
            records, self.records = self.records, []
            raise AssertionError("logged: " + "; ".join(r.getMessage() for r in records))


# -- the asyncio server -----------------------------------------------------------------


class AioHarness:
    def __init__(self, errors: _Errors) -> None:
        self.errors = errors
        self.loop = asyncio.new_event_loop()
        self.loop_errors: list[dict[str, Any]] = []
        self.loop.set_exception_handler(lambda _, context: self.loop_errors.append(context))
        self.tasks: list[asyncio.Task[Any]] = []

        def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> asyncio.Task[Any]:
            task = asyncio.Task(coro, loop=loop, **kw)
            self.tasks.append(task)
            return task

        self.loop.set_task_factory(factory)  # type: ignore[arg-type]
        self.server = ttrpc.aio.server.Server(**SERVER_OPTIONS)
        self.full = ttrpc.aio.server.Server(max_connections=0)
        for service in _services(asynchronous=True):
            self.server.register(service)
            self.full.register(service)

    async def _exchange(
        self, server: ttrpc.aio.server.Server, pieces: list[bytes], wanted: int = 0
    ) -> bytes:
        """Write ``pieces`` on a fresh connection, wait for the server to have read them and
        answered every unary call (or to have sent ``wanted`` frames), close our side,
        read until the server hangs up."""
        loop = self.loop
        ours, theirs = socket.socketpair()
        try:
            ours.setblocking(False)
            _, conn = await loop.connect_accepted_socket(
                lambda: ttrpc.aio.server._Connection(server), theirs
            )
            answers = bytearray()

            async def read() -> None:
                while True:
                    try:
                        chunk = await loop.sock_recv(ours, 65536)
                    except ConnectionResetError:
                        return  # closed with our input unread (a refusal): answers came first
                    if not chunk:
                        return
                    answers.extend(chunk)

            reader = loop.create_task(read())
            try:
                for piece in pieces:
                    await loop.sock_sendall(ours, piece)
                    await asyncio.sleep(0)  # let the server take this piece alone
                if server is self.server:
                    deadline = loop.time() + DEADLINE
                    while unread(ours) or unary_calls(conn):
                        assert loop.time() < deadline, "unary calls left unanswered"
                        await asyncio.sleep(0)
                    while complete_frames(answers) < wanted:
                        assert loop.time() < deadline, "no answer"
                        await asyncio.sleep(0)
                ours.shutdown(socket.SHUT_WR)  # then the server hangs up (calls left are dropped)
            except OSError:
                pass  # the server may hang up first (a refusal)
            await asyncio.wait_for(reader, DEADLINE)
            return bytes(answers)
        finally:
            ours.close()

    async def _one(self, data: bytes) -> None:
        refused = to_refuse(data)
        server = self.full if refused else self.server
        answers = await self._exchange(server, split(data))
        check_answers(data, answers, refused)
        for _ in range(3):  # cancelled handlers finish on the next iterations
            await asyncio.sleep(0)
        check_follow_up(await self._exchange(self.server, [FOLLOW_UP], wanted=1))
        for _ in range(3):
            await asyncio.sleep(0)

    def run(self, data: bytes) -> None:
        self.loop.run_until_complete(self._one(data))
        for task in self.tasks:
            assert task.done(), f"a task left behind: {task!r}"
            if not task.cancelled() and task.exception() is not None:
                raise AssertionError(f"a task raised: {task!r}") from task.exception()
        self.tasks.clear()
        assert not self.loop_errors, self.loop_errors
        self.errors.check()
        assert not self.server._connections, "a connection left behind"
        assert not self.full._refusing, "a refusal left behind"

    def close(self) -> None:
        self.loop.run_until_complete(self.server.close())
        self.loop.run_until_complete(self.full.close())
        self.loop.close()


# -- the blocking server ----------------------------------------------------------------


class BlockingHarness:
    def __init__(self, errors: _Errors) -> None:
        self.errors = errors
        self.server = ttrpc.blocking.server.Server(max_workers=8, **SERVER_OPTIONS)
        self.full = ttrpc.blocking.server.Server(max_connections=0)
        for service in _services(asynchronous=False):
            self.server.register(service)
            self.full.register(service)
        self.thread_errors: list[BaseException] = []
        # Whatever escapes a job on the handler pool would end up unseen in its future.
        pool = self.server._pool
        submit = pool.submit

        def checked_submit(fn: Any, /, *args: Any, **kwargs: Any) -> Any:
            future = submit(fn, *args, **kwargs)
            future.add_done_callback(self._job_done)
            return future

        pool.submit = checked_submit  # type: ignore[method-assign]

    def _job_done(self, future: Any) -> None:
        if not future.cancelled() and future.exception() is not None:
            self.thread_errors.append(future.exception())

    def _read_loop(self, conn: Any) -> None:
        try:
            conn._read_loop()
        except BaseException as exc:
            self.thread_errors.append(exc)

    def _exchange(self, refused: bool, pieces: list[bytes], wanted: int = 0) -> bytes:
        """As for asyncio: write, let the server answer every unary call (or send
        ``wanted`` frames), close our side, read until the server hangs up."""
        ours, theirs = socket.socketpair()
        ours.settimeout(DEADLINE)
        conn = None
        answers = bytearray()
        try:
            if refused:
                assert self.full._poller.refuse(theirs, 0)
            else:
                conn = ttrpc.blocking.server._Connection(self.server, theirs, None)
                conn.thread = threading.Thread(target=self._read_loop, args=(conn,), daemon=True)
                with self.server._lock:
                    self.server._connections.add(conn)
                conn.thread.start()
            try:
                for piece in pieces:
                    ours.sendall(piece)
                if conn is not None:
                    deadline = time.monotonic() + DEADLINE
                    ours.setblocking(False)
                    quiet = 0  # checks in a row that found the server done (its reader
                    while True:  # may have read bytes it has not dispatched yet)
                        assert time.monotonic() < deadline, "unary calls left unanswered"
                        _drain(ours, answers)
                        if wanted:
                            if complete_frames(answers) >= wanted:
                                break
                        else:
                            busy = unread(ours) or unary_calls(conn)
                            quiet = 0 if busy else quiet + 1
                            if quiet == 2:
                                break
                        time.sleep(0.0001)  # the server's threads are at work
                    ours.settimeout(DEADLINE)
                ours.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the server may hang up first (a refusal)
            while True:
                try:
                    chunk = ours.recv(65536)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                answers.extend(chunk)
            if conn is not None:
                conn.thread.join(DEADLINE)
                assert not conn.thread.is_alive(), "the connection's thread did not end"
            return bytes(answers)
        finally:
            ours.close()

    def run(self, data: bytes) -> None:
        refused = to_refuse(data)
        check_answers(data, self._exchange(refused, split(data)), refused)
        check_follow_up(self._exchange(False, [FOLLOW_UP], wanted=1))
        if self.thread_errors:
            errors, self.thread_errors = self.thread_errors, []
            raise AssertionError(f"a server thread raised: {errors!r}") from errors[0]
        self.errors.check()
        with self.server._lock:
            assert not self.server._connections, "a connection left behind"
        for poller in (self.server._poller, self.full._poller):
            thread = poller._thread
            assert thread is None or thread.is_alive(), "the poller thread died"

    def close(self) -> None:
        self.server.close()
        self.full.close()


def unread(sock: socket.socket) -> int:
    """Bytes this socket sent that the server has not read yet (SIOCOUTQ)."""
    return int(struct.unpack("i", fcntl.ioctl(sock, termios.TIOCOUTQ, b"\0" * 4))[0])


def unary_calls(conn: Any) -> int:
    """Unary calls in flight on a server connection."""
    return len(conn._calls) - len(conn._streams)


def complete_frames(data: bytes | bytearray) -> int:
    """Whole frames at the start of ``data``."""
    count = pos = 0
    while len(data) - pos >= HEADER_LENGTH:
        (length,) = struct.unpack_from(">I", data, pos)
        pos += HEADER_LENGTH + length
        if pos > len(data):
            break
        count += 1
    return count


def _drain(sock: socket.socket, into: bytearray) -> None:
    """What a non-blocking socket has to read now."""
    while True:
        try:
            chunk = sock.recv(65536)
        except (BlockingIOError, ConnectionResetError):
            return
        if not chunk:
            return
        into.extend(chunk)


_harnesses: dict[str, AioHarness | BlockingHarness] = {}
_errors = _Errors()


def harness(kind: str = KIND) -> AioHarness | BlockingHarness:
    """The server of ``kind`` (``aio`` or ``blocking``) that inputs go to, made once."""
    if kind not in _harnesses:
        if not _harnesses:
            for name in ("ttrpc", "asyncio"):
                logging.getLogger(name).addHandler(_errors)
        _harnesses[kind] = AioHarness(_errors) if kind == "aio" else BlockingHarness(_errors)
    return _harnesses[kind]


def close() -> None:
    """Stop the servers and stop watching the logs (tests call this when done)."""
    for h in _harnesses.values():
        h.close()
    _harnesses.clear()
    for name in ("ttrpc", "asyncio"):
        logging.getLogger(name).removeHandler(_errors)
    _errors.records.clear()


def test_one_input(data: bytes, kind: str = KIND) -> None:
    """Feed one input to the live server of ``kind``; raise on any broken invariant."""
    harness(kind).run(data)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--write-seeds":
        os.makedirs(sys.argv[2], exist_ok=True)
        for i, seed in enumerate(seeds()):
            with open(os.path.join(sys.argv[2], f"seed-{i:02d}"), "wb") as f:
                f.write(seed)
        return
    if atheris is None:
        sys.exit("pip install atheris")
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
