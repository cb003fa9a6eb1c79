"""Floods of connections: a configurable limit, connections over it answered, EMFILE survived."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from ttrpc import Code, ConnectionClosed, RpcError, _limits
from ttrpc.protocol import HEADER_LENGTH, MESSAGE_TYPE_RESPONSE
from ttrpc.ttrpc_pb2 import KeyValue, Response

from ..unit.harness import RunningServer, SyncCaller, running_server
from .external import server_process, wait_until
from .test_faults import echo_frame


def raw(address: str) -> socket.socket:
    """A raw client socket; its connect waits while the server's backlog is full."""
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(address[len("unix://") :])
    sock.settimeout(10)
    return sock


KINDS = ["aio", "blocking"]


def served(running: RunningServer) -> int:
    return int(running.server.connections)


def refusing(running: RunningServer) -> int:
    if running.kind == "aio":
        return len(running.server._refusing)
    return int(running.server._poller.refusing)


def read_answer(sock: socket.socket) -> Response | None:
    """The next response frame on a raw socket, or None at EOF (or a reset)."""
    data = b""
    try:
        while len(data) < HEADER_LENGTH:
            chunk = sock.recv(HEADER_LENGTH - len(data))
            if not chunk:
                return None
            data += chunk
        length, _, mtype, _ = struct.unpack(">IIBB", data)
        assert mtype == MESSAGE_TYPE_RESPONSE
        body = b""
        while len(body) < length:
            chunk = sock.recv(length - len(body))
            assert chunk, "EOF inside a frame"
            body += chunk
    except ConnectionResetError:
        return None
    return Response.FromString(body)


def assert_refusal(response: Response | None, limit: int) -> None:
    assert response is not None, "closed without an answer"
    assert response.status.code == Code.RESOURCE_EXHAUSTED
    assert response.status.message == _limits.refusal_message(limit)


@pytest.fixture(params=KINDS)
def limited(request: pytest.FixtureRequest, address: str) -> Iterator[tuple[RunningServer, str]]:
    with running_server(request.param, address, max_connections=2) as running:
        yield running, address


def test_defaults_and_validation() -> None:
    import ttrpc.aio
    import ttrpc.blocking

    for cls in (ttrpc.aio.Server, ttrpc.blocking.Server):
        server = cls()
        assert server.max_connections == 1024
        assert server.max_calls_per_connection == 1024
        assert cls(max_connections=None).max_connections is None
        assert cls(max_connections=0).max_connections == 0
        with pytest.raises(ValueError):
            cls(max_connections=-1)
        with pytest.raises(ValueError):
            cls(max_calls_per_connection=0)
    assert ttrpc.blocking.Server().write_timeout == 30.0
    with pytest.raises(ValueError):
        ttrpc.blocking.Server(write_timeout=0)


@pytest.mark.parametrize("client_kind", KINDS)
def test_connection_over_the_limit_gets_a_status_then_eof(
    limited: tuple[RunningServer, str], client_kind: str
) -> None:
    running, address = limited
    first = SyncCaller("blocking", address)
    second = SyncCaller("aio", address)
    over = SyncCaller(client_kind, address)
    try:
        assert first.call("Echo", KeyValue(key="1")).key == "1"
        assert second.call("Echo", KeyValue(key="2")).key == "2"
        with pytest.raises(RpcError) as info:
            over.call("Echo", KeyValue(key="3"))
        assert info.value.code == Code.RESOURCE_EXHAUSTED
        assert "too many connections" in info.value.message
        assert "limit is 2" in info.value.message
        with pytest.raises(ConnectionClosed):  # then the server closed it
            over.call("Echo", KeyValue(key="3"))
        # The connections being served did not notice.
        assert first.call("Echo", KeyValue(key="1")).key == "1"
        assert second.call("Echo", KeyValue(key="2")).key == "2"
        wait_until(lambda: refusing(running) == 0, 5, "the refusal to end")
    finally:
        over.close()
        first.close()
    # A slot frees up: the next connection is served.
    wait_until(lambda: served(running) == 1, 5, "the server to see the close")
    again = SyncCaller(client_kind, address)
    try:
        assert again.call("Echo", KeyValue(key="4")).key == "4"
    finally:
        again.close()
        second.close()


def test_refusal_answers_every_request_of_its_first_batch(
    limited: tuple[RunningServer, str],
) -> None:
    _, address = limited
    held = [raw(address) for _ in range(2)]
    for i, sock in enumerate(held):  # served: answered normally
        sock.sendall(echo_frame(1, str(i)))
        response = read_answer(sock)
        assert response is not None and response.status.code == Code.OK
    sock = raw(address)
    try:
        # Three pipelined requests, one of them 100 KiB (its payload is skipped unread).
        big = echo_frame(5, "x" * 100_000)
        sock.sendall(echo_frame(1) + echo_frame(3) + big)
        for _ in range(3):
            assert_refusal(read_answer(sock), 2)
        assert read_answer(sock) is None  # then EOF
    finally:
        sock.close()
        for s in held:
            s.close()


@pytest.mark.parametrize("kind", KINDS)
def test_zero_refuses_everyone_and_silent_peers_are_dropped(kind: str, address: str) -> None:
    closed: list[None] = []
    options = {"max_connections": 0, "on_connection_closed": lambda: closed.append(None)}
    with running_server(kind, address, **options) as running:
        client = SyncCaller("blocking", address)
        try:
            with pytest.raises(RpcError) as info:
                client.call("Echo", KeyValue())
            assert info.value.code == Code.RESOURCE_EXHAUSTED
        finally:
            client.close()
        silent = raw(address)  # sends nothing: closed after REFUSAL_TIMEOUT
        silent.settimeout(_limits.REFUSAL_TIMEOUT + 5)
        try:
            start = time.monotonic()
            assert read_answer(silent) is None
            elapsed = time.monotonic() - start
            assert _limits.REFUSAL_TIMEOUT - 0.5 < elapsed < _limits.REFUSAL_TIMEOUT + 2
        finally:
            silent.close()
        wait_until(lambda: refusing(running) == 0, 5, "refusals to end")
        assert not closed, "on_connection_closed is for connections that were served"


@pytest.mark.parametrize("kind", KINDS)
def test_refusals_under_way_are_capped(
    kind: str, address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_limits, "MAX_REFUSING", 3)
    with running_server(kind, address, max_connections=0) as running:
        silent = [raw(address) for _ in range(3)]  # occupy every refusal slot
        try:
            wait_until(lambda: refusing(running) == 3, 5, "three refusals")
            extra = raw(address)
            try:
                start = time.monotonic()
                assert read_answer(extra) is None  # closed at once, without a reply
                assert time.monotonic() - start < 1.5
            finally:
                extra.close()
        finally:
            for sock in silent:
                sock.close()
        wait_until(lambda: refusing(running) == 0, 5, "refusals to end")


@pytest.mark.parametrize("kind", KINDS)
def test_flood_of_connections(kind: str, address: str) -> None:
    """500 connections in a burst against a limit of 16: the 16 are served, the others are
    answered (or, past the refusals under way, closed); calls on an existing connection go on
    meanwhile; nothing is left over afterwards."""
    limit = 16
    with running_server(kind, address, max_connections=limit) as running:
        steady = SyncCaller("blocking", address)
        stop = threading.Event()
        steady_errors: list[BaseException] = []
        steady_calls = [0]
        worst = [0.0]

        def keep_calling() -> None:
            try:
                while not stop.is_set():
                    start = time.monotonic()
                    assert steady.call("Echo", KeyValue(key="s")).key == "s"
                    worst[0] = max(worst[0], time.monotonic() - start)
                    steady_calls[0] += 1
            except BaseException as exc:
                steady_errors.append(exc)

        caller = threading.Thread(target=keep_calling)
        caller.start()
        socks: list[socket.socket] = []
        outcomes = {"served": 0, "refused": 0, "dropped": 0}
        try:
            for i in range(500):
                sock = raw(address)
                socks.append(sock)
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    sock.sendall(echo_frame(1, str(i)))  # if closed at once, read_answer sees it
            for sock in socks:
                response = read_answer(sock)
                if response is None:
                    outcomes["dropped"] += 1
                elif response.status.code == Code.OK:
                    outcomes["served"] += 1
                else:
                    assert_refusal(response, limit)
                    outcomes["refused"] += 1
        finally:
            stop.set()
            caller.join(30)
            for sock in socks:
                sock.close()
        assert not steady_errors, steady_errors
        assert steady_calls[0] > 0
        assert worst[0] < 2.0, f"a call on the existing connection took {worst[0]:.2f} s"
        # The steady client holds one slot; the first 15 raw connections got the others;
        # fewer than MAX_REFUSING are refused, so every other one is answered.
        assert outcomes == {"served": limit - 1, "refused": 500 - limit + 1, "dropped": 0}
        wait_until(lambda: served(running) == 1, 10, "the flood's connections to go")
        wait_until(lambda: refusing(running) == 0, 10, "refusals to end")
        assert steady.call("Echo", KeyValue(key="after")).key == "after"
        steady.close()


@pytest.mark.parametrize("kind", KINDS)
def test_out_of_descriptors_on_accept(kind: str, address: str) -> None:
    """A server whose descriptors run out (EMFILE) logs, backs off without spinning, keeps
    serving the connections it has, and accepts again once descriptors are free."""
    with server_process(kind, address, nofile=64, max_connections=None) as server:
        steady = SyncCaller("blocking", address)
        flood: list[socket.socket] = []
        try:
            assert steady.call("Echo", KeyValue(key="before")).key == "before"
            for _ in range(100):  # more than the server has descriptors for
                flood.append(raw(address))
            wait_until(lambda: "Too many open files" in server.log(), 10, "an EMFILE report")
            wait_until(lambda: server.fds() >= 60, 10, "the server to run out of descriptors")
            cpu = server.cpu_seconds()
            window = threading.Event()
            window.wait(1.0)  # a measurement window: how busy is the server meanwhile?
            busy = server.cpu_seconds() - cpu
            assert busy < 0.3, f"accept loop spinning: {busy:.2f} CPU s in 1 s"
            assert server.alive()
            assert steady.call("Echo", KeyValue(key="during")).key == "during"
        finally:
            for sock in flood:
                sock.close()
        # Descriptors free again: new connections are accepted and served.
        late = SyncCaller("blocking", address, timeout=10)
        try:
            assert late.call("Echo", KeyValue(key="after")).key == "after"
        finally:
            late.close()
        assert steady.call("Echo", KeyValue(key="still")).key == "still"
        steady.close()
        assert server.alive()
