"""Streaming calls of every kind, between both servers and both clients (four pairings)."""

from __future__ import annotations

import ast
import gc
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from ttrpc import Code, ConnectionClosed, Context, RpcError
from ttrpc.ttrpc_pb2 import KeyValue

from .harness import SERVICE, STREAMS, RunningServer, SyncCaller, running_server

KINDS = [("aio", "aio"), ("aio", "blocking"), ("blocking", "aio"), ("blocking", "blocking")]
IDS = [f"{s}-server-{c}-client" for s, c in KINDS]


class Stream:
    """A client stream of either kind, driven synchronously."""

    def __init__(self, caller: SyncCaller, stream: Any) -> None:
        self.caller = caller
        self.stream = stream

    def _run(self, name: str, *args: Any) -> Any:
        if self.caller.loop is None:
            return getattr(self.stream, name)(*args)

        async def call() -> Any:
            return await getattr(self.stream, name)(*args)

        return self.caller.loop.run(call())

    def send(self, message: KeyValue) -> None:
        self._run("send", message)

    def recv(self) -> KeyValue | None:
        result: KeyValue | None = self._run("recv")
        return result

    def close_send(self) -> None:
        self._run("close_send")

    def result(self) -> KeyValue:
        result: KeyValue = self._run("result")
        return result

    def cancel(self) -> None:
        if self.caller.loop is None:
            self.stream.cancel()
        else:
            self.caller.loop.loop.call_soon_threadsafe(self.stream.cancel)

    def drain(self) -> list[KeyValue]:
        out = []
        while (message := self.recv()) is not None:
            out.append(message)
        return out

    def __iter__(self) -> Iterator[KeyValue]:
        while (message := self.recv()) is not None:
            yield message


def open_stream(
    caller: SyncCaller,
    method: str,
    *,
    request: KeyValue | None = None,
    ctx: Context | None = None,
    client_streaming: bool,
    server_streaming: bool,
) -> Stream:
    def make() -> Any:
        return caller.client.open_stream(
            STREAMS,
            method,
            KeyValue,
            ctx,
            request=request,
            client_streaming=client_streaming,
            server_streaming=server_streaming,
        )

    if caller.loop is None:
        return Stream(caller, make())

    async def amake() -> Any:
        return make()

    return Stream(caller, caller.loop.run(amake()))


def down(caller: SyncCaller, count: int, mode: str = "", ctx: Context | None = None) -> Stream:
    return open_stream(
        caller,
        "Down",
        request=KeyValue(key=str(count), value=mode),
        ctx=ctx,
        client_streaming=False,
        server_streaming=True,
    )


def up(caller: SyncCaller, ctx: Context | None = None) -> Stream:
    return open_stream(caller, "Up", ctx=ctx, client_streaming=True, server_streaming=False)


def both(caller: SyncCaller, method: str = "Both", ctx: Context | None = None) -> Stream:
    return open_stream(caller, method, ctx=ctx, client_streaming=True, server_streaming=True)


@pytest.fixture(params=KINDS, ids=IDS)
def pair(
    request: pytest.FixtureRequest, address: str
) -> Iterator[tuple[RunningServer, SyncCaller]]:
    server_kind, client_kind = request.param
    with running_server(server_kind, address) as server:
        client = SyncCaller(client_kind, address)
        try:
            yield server, client
        finally:
            client.close()


# -- every kind ---------------------------------------------------------------------


def test_server_streaming(pair: tuple[RunningServer, SyncCaller]) -> None:
    _, client = pair
    assert [m.key for m in down(client, 5)] == ["0", "1", "2", "3", "4"]
    assert down(client, 0).drain() == []


def test_client_streaming(pair: tuple[RunningServer, SyncCaller]) -> None:
    _, client = pair
    stream = up(client)
    for key in ("a", "b", "c"):
        stream.send(KeyValue(key=key))
    reply = stream.result()
    assert (reply.key, reply.value) == ("a,b,c", "3")
    assert up(client).result().value == "0"  # no message at all


def test_bidi_interleaved(pair: tuple[RunningServer, SyncCaller]) -> None:
    _, client = pair
    stream = both(client)
    for key in ("x", "y", "z"):
        stream.send(KeyValue(key=key))
        reply = stream.recv()
        assert reply is not None and reply.key == key.upper()
    stream.close_send()
    assert stream.recv() is None


def test_generic_helpers(pair: tuple[RunningServer, SyncCaller]) -> None:
    _, client = pair
    keys = [KeyValue(key=k) for k in "abc"]
    if client.loop is None:
        c = client.client
        assert [m.key for m in c.server_stream(STREAMS, "Down", KeyValue(key="2"), KeyValue)] == [
            "0",
            "1",
        ]
        assert c.client_stream(STREAMS, "Up", iter(keys), KeyValue).key == "a,b,c"
        assert [m.key for m in c.bidi_stream(STREAMS, "Both", keys, KeyValue)] == ["A", "B", "C"]
        return

    async def scenario() -> None:
        c = client.client
        got = [m.key async for m in c.server_stream(STREAMS, "Down", KeyValue(key="2"), KeyValue)]
        assert got == ["0", "1"]

        async def agen() -> Any:
            for k in keys:
                yield k

        assert (await c.client_stream(STREAMS, "Up", agen(), KeyValue)).key == "a,b,c"
        got = [m.key async for m in c.bidi_stream(STREAMS, "Both", agen(), KeyValue)]
        assert got == ["A", "B", "C"]

    client.loop.run(scenario())


# -- empty messages -----------------------------------------------------------------


def test_empty_messages_are_delivered(pair: tuple[RunningServer, SyncCaller]) -> None:
    _, client = pair
    # Empty messages are zero-length Data frames without NO_DATA: each one counts.
    assert down(client, 4, "empty").drain() == [KeyValue()] * 4
    stream = up(client)
    for _ in range(3):
        stream.send(KeyValue())
    assert stream.result().value == "3"
    stream = both(client)
    stream.send(KeyValue())
    assert stream.recv() == KeyValue()
    stream.close_send()
    assert stream.recv() is None


# -- early close ------------------------------------------------------------------------


def test_client_cancels_server_stream(pair: tuple[RunningServer, SyncCaller]) -> None:
    _, client = pair
    stream = down(client, 100, "slow")
    assert stream.recv() == KeyValue(key="0")
    stream.cancel()
    with pytest.raises(RpcError) as err:
        while stream.recv() is not None:
            pass
    assert err.value.code == Code.CANCELLED
    # The connection carries on; the server's late messages are dropped.
    assert client.call("Echo", KeyValue(key="after")).key == "after"
    assert [m.key for m in down(client, 2)] == ["0", "1"]


def test_dropped_stream_is_abandoned(pair: tuple[RunningServer, SyncCaller]) -> None:
    _, client = pair
    stream = down(client, 200, "slow")
    assert stream.recv() is not None
    del stream  # e.g. a break out of a for loop
    gc.collect()
    deadline = time.monotonic() + 5
    conn = client.client._conn
    while conn.open_streams:
        # The finalizer queues the abandon; the next call on the connection carries it out.
        assert client.call("Echo", KeyValue(key="x")).key == "x"
        assert time.monotonic() < deadline, "dropped stream never abandoned"
        time.sleep(0.01)


def test_server_ends_bidi_before_client(pair: tuple[RunningServer, SyncCaller]) -> None:
    _, client = pair
    stream = both(client)
    stream.send(KeyValue(key="a"))
    assert stream.recv() == KeyValue(key="A")
    stream.send(KeyValue(key="stop"))
    assert stream.recv() is None  # the server finished OK; our side is still open
    with pytest.raises(RpcError) as err:
        stream.send(KeyValue(key="late"))
    assert err.value.code == Code.FAILED_PRECONDITION
    stream.close_send()  # harmless
    assert client.call("Echo", KeyValue(key="alive")).key == "alive"


def test_client_closes_without_sending(pair: tuple[RunningServer, SyncCaller]) -> None:
    _, client = pair
    stream = both(client)
    stream.close_send()
    assert stream.recv() is None


# -- errors mid-stream ------------------------------------------------------------------


def test_server_stream_error_after_messages(pair: tuple[RunningServer, SyncCaller]) -> None:
    _, client = pair
    stream = down(client, 3, "fail")
    got = [stream.recv() for _ in range(3)]
    assert [m.key for m in got if m is not None] == ["0", "1", "2"]
    with pytest.raises(RpcError) as err:
        stream.recv()
    assert (err.value.code, err.value.message) == (Code.ABORTED, "failed mid-stream")


def test_client_stream_error(pair: tuple[RunningServer, SyncCaller]) -> None:
    _, client = pair
    stream = up(client)
    for key in ("a", "fail", "b"):
        stream.send(KeyValue(key=key))
    with pytest.raises(RpcError) as err:
        stream.result()
    assert (err.value.code, err.value.message) == (Code.FAILED_PRECONDITION, "failed after 1")


def test_bidi_error_mid_stream(pair: tuple[RunningServer, SyncCaller]) -> None:
    _, client = pair
    stream = both(client)
    stream.send(KeyValue(key="a"))
    stream.send(KeyValue(key="fail"))
    assert stream.recv() == KeyValue(key="A")
    with pytest.raises(RpcError) as err:
        stream.recv()
    assert err.value.code == Code.ABORTED
    with pytest.raises(RpcError) as err:
        stream.send(KeyValue(key="more"))
    assert err.value.code == Code.ABORTED


def test_unknown_stream_method(pair: tuple[RunningServer, SyncCaller]) -> None:
    _, client = pair
    stream = open_stream(client, "Nope", client_streaming=True, server_streaming=True)
    with pytest.raises(RpcError) as err:
        stream.recv()
    assert (err.value.code, err.value.message) == (Code.UNIMPLEMENTED, "method Nope")


# -- metadata and deadlines -----------------------------------------------------------------


def test_streams_carry_metadata_and_deadline(pair: tuple[RunningServer, SyncCaller]) -> None:
    _, client = pair
    ctx = Context(timeout=5, metadata={"k": ["1", "2"]})
    (first,) = down(client, 1, "md", ctx).drain()
    assert first.key == f"/{STREAMS}/Down"
    pairs, remaining = ast.literal_eval(first.value)
    assert pairs == [("k", "1"), ("k", "2")]
    assert 0 < remaining <= 5
    (first,) = down(client, 1, "md").drain()
    assert ast.literal_eval(first.value) == ([], None)


def test_server_enforces_stream_deadline(pair: tuple[RunningServer, SyncCaller]) -> None:
    _, client = pair
    start = time.monotonic()
    stream = down(client, 1, "hold", Context(timeout=0.3))
    assert stream.recv() == KeyValue(key="0")
    with pytest.raises(RpcError) as err:
        stream.recv()
    assert err.value.code == Code.DEADLINE_EXCEEDED
    assert time.monotonic() - start < 5
    stream = both(client, "Hold", Context(timeout=0.3))
    with pytest.raises(RpcError) as err:
        stream.recv()
    assert err.value.code == Code.DEADLINE_EXCEEDED
    assert client.call("Echo", KeyValue(key="after")).key == "after"


# -- many streams on one connection ---------------------------------------------------------


def test_many_concurrent_streams(pair: tuple[RunningServer, SyncCaller]) -> None:
    _, client = pair
    streams = [down(client, 20) for _ in range(10)]
    bidis = [both(client) for _ in range(10)]
    for i, b in enumerate(bidis):
        b.send(KeyValue(key=f"s{i}"))
    errors: list[BaseException] = []

    def read_down(s: Stream) -> None:
        try:
            assert [m.key for m in s] == [str(i) for i in range(20)]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=read_down, args=(s,)) for s in streams]
    for t in threads:
        t.start()
    # Unary calls interleave with the streams.
    for i in range(20):
        assert client.call("Echo", KeyValue(key=str(i))).key == str(i)
    for i, b in enumerate(bidis):
        assert b.recv() == KeyValue(key=f"S{i}")
        b.close_send()
        assert b.recv() is None
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert client.client._conn.open_streams == 0


# -- bounded receive buffers ----------------------------------------------------------------


def _unread(fd: int) -> int:
    """Bytes received on a socket and not read yet (FIONREAD)."""
    import fcntl
    import struct
    import termios

    return int(struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0])


@pytest.mark.parametrize("server_kind", ["aio", "blocking"])
@pytest.mark.parametrize("client_kind", ["aio", "blocking"])
def test_stalled_client_consumer_fails_its_stream(
    server_kind: str, client_kind: str, address: str
) -> None:
    with running_server(server_kind, address):
        client = SyncCaller(client_kind, address, stream_buffer_size=4096, stream_stall_timeout=0.3)
        try:
            stream = down(client, 200, "big")  # 200 x 64 KiB: far more than 4 KiB of buffer

            # Wait until far more has arrived than the stream may buffer: the aio client's
            # reader runs on its own and stops at the full buffer; the blocking client
            # reads only for a caller (the Echo below), so it waits in the socket.
            def arrived() -> bool:
                if client_kind == "aio":
                    return bool(client.client._conn.backlogged)
                return _unread(client.client._sock.fileno()) > 4 * 4096

            end = time.monotonic() + 10
            while not arrived():
                assert time.monotonic() < end, "the stream's messages never arrived"
                time.sleep(0.001)
            # Meanwhile other calls go on: the reader waits only up to the stall timeout.
            assert client.call("Echo", KeyValue(key="x")).key == "x"
            got = 0
            with pytest.raises(RpcError) as err:
                while stream.recv() is not None:
                    got += 1
            assert err.value.code == Code.RESOURCE_EXHAUSTED
            assert "took no message" in err.value.message
            assert got < 200
            assert client.call("Echo", KeyValue(key="alive")).key == "alive"
        finally:
            client.close()


@pytest.mark.parametrize("server_kind", ["aio", "blocking"])
def test_stalled_handler_fails_its_stream(server_kind: str, address: str) -> None:
    options = {"stream_buffer_size": 4096, "stream_stall_timeout": 0.3}
    with running_server(server_kind, address, **options):
        client = SyncCaller("blocking", address)
        try:
            stream = both(client, "Hold")  # a handler that reads nothing
            with pytest.raises(RpcError) as err:
                for _ in range(5000):
                    stream.send(KeyValue(key="x" * 100))
                stream.recv()
            assert err.value.code == Code.RESOURCE_EXHAUSTED
            assert client.call("Echo", KeyValue(key="alive")).key == "alive"
        finally:
            client.close()


def test_slow_consumer_gets_everything(pair: tuple[RunningServer, SyncCaller]) -> None:
    """A consumer that keeps taking messages, however slowly, is never failed."""
    _, client = pair
    stream = down(client, 3000)
    got = 0
    for _ in stream:
        got += 1
        if got % 500 == 0:
            time.sleep(0.05)
    assert got == 3000


# -- connection loss --------------------------------------------------------------------------


def test_connection_loss_fails_open_streams(pair: tuple[RunningServer, SyncCaller]) -> None:
    server, client = pair
    stream = down(client, 1, "hold")
    assert stream.recv() == KeyValue(key="0")
    server.close()
    with pytest.raises(ConnectionClosed):
        stream.recv()


def test_unary_still_works_alongside(pair: tuple[RunningServer, SyncCaller]) -> None:
    _, client = pair
    stream = both(client)
    stream.send(KeyValue(key="q"))
    assert client.call("Echo", KeyValue(key="u"), service=SERVICE).key == "u"
    assert stream.recv() == KeyValue(key="Q")
    stream.close_send()
    assert stream.recv() is None


# -- the runnable example ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", [[], ["--blocking"]], ids=["aio", "blocking"])
def test_streams_example_runs(mode: list[str]) -> None:
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": os.path.join(root, "src")}
    proc = subprocess.run(
        [sys.executable, os.path.join(root, "examples", "streams.py"), *mode],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[:3] == ["HELLO", "['t', 't', 'r', 'p', 'c']", "streams are here"]
    assert "ttrpc server /example.v1.Words/Spell OK" in proc.stderr
