"""Both servers with both clients: the semantics of point 4 of the core issue."""

from __future__ import annotations

import ast
import os
import socket
import stat
import threading
import time
from collections.abc import Iterator

import pytest

from ttrpc import Code, ConnectionClosed, Context, RpcError, require_uid_gid
from ttrpc.protocol import MESSAGE_TYPE_REQUEST, MESSAGE_TYPE_RESPONSE, FrameReader, encode_frame
from ttrpc.ttrpc_pb2 import KeyValue, Request, Response

from .harness import SERVICE, RunningServer, SyncCaller, running_server

KINDS = [("aio", "aio"), ("aio", "blocking"), ("blocking", "aio"), ("blocking", "blocking")]


@pytest.fixture(params=KINDS, ids=[f"{s}-server-{c}-client" for s, c in KINDS])
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


def test_echo_with_metadata_and_deadline(pair: tuple[RunningServer, SyncCaller]) -> None:
    _, client = pair
    ctx = Context(timeout=5, metadata={"K": ["1", "2"], "other": "x"})
    reply = client.call("Echo", KeyValue(key="hello"), ctx)
    assert reply.key == "hello"
    pairs, remaining, method = ast.literal_eval(reply.value)
    assert pairs == [("k", "1"), ("k", "2"), ("other", "x")]
    assert 0 < remaining <= 5
    assert method == f"/{SERVICE}/Echo"
    pairs, remaining, _ = ast.literal_eval(client.call("Echo", KeyValue()).value)
    assert pairs == [] and remaining is None


def test_concurrent_calls_are_multiplexed(pair: tuple[RunningServer, SyncCaller]) -> None:
    _, client = pair
    slow = client.submit("Sleep", KeyValue(value="0.5"))
    futures = [client.submit("Echo", KeyValue(key=str(i))) for i in range(40)]
    assert [f.result(10).key for f in futures] == [str(i) for i in range(40)]
    assert not slow.done()  # the quick calls did not wait behind the slow one
    assert slow.result(10).key == "slept"


def test_status_errors_and_exception_mapping(pair: tuple[RunningServer, SyncCaller]) -> None:
    _, client = pair
    with pytest.raises(RpcError) as err:
        client.call("Fail", KeyValue(key="rpc", value="not ready"))
    assert (err.value.code, err.value.message) == (Code.FAILED_PRECONDITION, "not ready")
    with pytest.raises(RpcError) as err:
        client.call("Fail", KeyValue(key="notfound", value="gone"))
    assert (err.value.code, err.value.message) == (Code.NOT_FOUND, "gone")
    with pytest.raises(RpcError) as err:
        client.call("Fail", KeyValue(value="boom"))
    assert err.value.code == Code.UNKNOWN
    with pytest.raises(RpcError) as err:
        client.call("Wrong", KeyValue())
    assert err.value.code == Code.INTERNAL
    with pytest.raises(RpcError) as err:
        client.call("Nope", KeyValue())
    assert (err.value.code, err.value.message) == (Code.UNIMPLEMENTED, "method Nope")
    with pytest.raises(RpcError) as err:
        client.call("Echo", KeyValue(), service="no.Such")
    assert (err.value.code, err.value.message) == (Code.UNIMPLEMENTED, "service no.Such")
    assert client.call("Echo", KeyValue(key="still fine")).key == "still fine"


def test_server_enforces_deadline(pair: tuple[RunningServer, SyncCaller]) -> None:
    _, client = pair
    start = time.monotonic()
    with pytest.raises(RpcError) as err:
        client.call("Sleep", KeyValue(value="10"), Context(timeout=0.3))
    assert err.value.code == Code.DEADLINE_EXCEEDED
    assert time.monotonic() - start < 5
    assert client.call("Echo", KeyValue(key="after")).key == "after"


def test_expired_deadline_fails_before_sending(pair: tuple[RunningServer, SyncCaller]) -> None:
    _, client = pair
    with pytest.raises(RpcError) as err:
        client.call("Echo", KeyValue(), Context(deadline=time.monotonic() - 1))
    assert err.value.code == Code.DEADLINE_EXCEEDED


def test_oversize_request_refused_and_oversize_response_answered(
    pair: tuple[RunningServer, SyncCaller],
) -> None:
    _, client = pair
    with pytest.raises(RpcError) as err:
        client.call("Echo", KeyValue(key="x" * (4 << 20)))
    assert err.value.code == Code.RESOURCE_EXHAUSTED
    with pytest.raises(RpcError) as err:
        client.call("Big", KeyValue(value=str(5 << 20)))
    assert err.value.code == Code.RESOURCE_EXHAUSTED
    assert len(client.call("Big", KeyValue(value=str((4 << 20) - 64))).value) == (4 << 20) - 64
    assert client.call("Echo", KeyValue(key="alive")).key == "alive"


def test_graceful_shutdown_lets_calls_finish(pair: tuple[RunningServer, SyncCaller]) -> None:
    server, client = pair
    call = client.submit("Sleep", KeyValue(value="0.3"))
    # Wait until the server has the call in hand before shutting down.
    _wait_for(lambda: _in_flight(server) == 1)
    assert server.shutdown(timeout=10) is True
    assert call.result(5).key == "slept"


def test_shutdown_deadline_closes_stuck_calls(pair: tuple[RunningServer, SyncCaller]) -> None:
    server, client = pair
    call = client.submit("Sleep", KeyValue(value="30"))
    _wait_for(lambda: _in_flight(server) == 1)
    assert server.shutdown(timeout=0.2) is False
    with pytest.raises(ConnectionClosed) as err:
        call.result(5)
    assert err.value.code == Code.UNAVAILABLE
    with pytest.raises(ConnectionClosed):
        client.call("Echo", KeyValue())


def _in_flight(server: RunningServer) -> int:
    conns = list(server.server._connections)
    return sum(len(c._calls) for c in conns)


def _wait_for(condition: object, timeout: float = 5) -> None:
    end = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.005)


# -- a raw peer, for what well-behaved servers never do -------------------------


class RawServer:
    """Accepts one connection, records requests, answers only when told."""

    def __init__(self, path: str) -> None:
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(path)
        self.listener.listen(1)
        self.conn: socket.socket | None = None
        self.accepted = threading.Event()
        self.requests: list[tuple[int, Request]] = []
        self.got_request = threading.Condition()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        self.conn, _ = self.listener.accept()
        self.accepted.set()
        reader = FrameReader()
        while True:
            try:
                data = self.conn.recv(65536)
            except OSError:
                return
            if not data:
                return
            for frame in reader.feed(data):
                assert frame.type == MESSAGE_TYPE_REQUEST
                with self.got_request:
                    self.requests.append((frame.stream_id, Request.FromString(frame.payload)))  # type: ignore[union-attr]
                    self.got_request.notify_all()

    def wait_requests(self, n: int) -> None:
        with self.got_request:
            assert self.got_request.wait_for(lambda: len(self.requests) >= n, 10)

    def answer(self, stream_id: int, reply: KeyValue) -> None:
        assert self.conn is not None
        body = Response(payload=reply.SerializeToString()).SerializeToString()
        self.conn.sendall(encode_frame(stream_id, MESSAGE_TYPE_RESPONSE, body))

    def close(self) -> None:
        if self.conn is not None and self.conn.fileno() != -1:
            self.conn.shutdown(socket.SHUT_RDWR)
            self.conn.close()
        self.listener.close()


@pytest.fixture(params=["aio", "blocking"])
def raw_and_client(
    request: pytest.FixtureRequest, sock_dir: str
) -> Iterator[tuple[RawServer, SyncCaller]]:
    path = os.path.join(sock_dir, "raw.sock")
    raw = RawServer(path)
    client = SyncCaller(request.param, "unix://" + path)
    try:
        yield raw, client
    finally:
        client.close()
        raw.close()


def test_client_gives_up_at_deadline_and_drops_late_answer(
    raw_and_client: tuple[RawServer, SyncCaller],
) -> None:
    raw, client = raw_and_client
    start = time.monotonic()
    with pytest.raises(RpcError) as err:
        client.call("Echo", KeyValue(key="slow"), Context(timeout=0.3))
    elapsed = time.monotonic() - start
    assert err.value.code == Code.DEADLINE_EXCEEDED
    assert 0.25 < elapsed < 3
    raw.wait_requests(1)
    first_id, first = raw.requests[0]
    assert 0 < first.timeout_nano <= 300_000_000
    assert first_id == 1
    # The late answer arrives before the next call's; the client must not mix them up.
    raw.answer(first_id, KeyValue(key="late"))
    pending = client.submit("Echo", KeyValue(key="next"))
    raw.wait_requests(2)
    second_id, _ = raw.requests[1]
    assert second_id == 3
    raw.answer(second_id, KeyValue(key="on time"))
    assert pending.result(5).key == "on time"


def test_dead_connection_fails_every_pending_call(
    raw_and_client: tuple[RawServer, SyncCaller],
) -> None:
    raw, client = raw_and_client
    calls = [client.submit("Echo", KeyValue(key=str(i))) for i in range(5)]
    raw.wait_requests(5)
    raw.close()
    for call in calls:
        with pytest.raises(ConnectionClosed) as err:
            call.result(5)
        assert err.value.code == Code.UNAVAILABLE
        assert "connection closed" in err.value.message
    with pytest.raises(ConnectionClosed):
        client.call("Echo", KeyValue())


def test_aio_cancellation_abandons_the_call(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "raw.sock")
    raw = RawServer(path)
    client = SyncCaller("aio", "unix://" + path)
    try:
        call = client.submit("Echo", KeyValue(key="cancel me"))
        raw.wait_requests(1)
        call.cancel()
        _wait_for(call.done)
        assert client.loop is not None
        raw.answer(1, KeyValue(key="late"))
        pending = client.submit("Echo", KeyValue(key="next"))
        raw.wait_requests(2)
        raw.answer(3, KeyValue(key="ok"))
        assert pending.result(5).key == "ok"
        assert client.client._conn.pending == 0
    finally:
        client.close()
        raw.close()


# -- listeners, addresses, handshakes, callbacks --------------------------------


@pytest.mark.parametrize("kind", ["aio", "blocking"])
def test_socket_file_is_private(kind: str, sock_dir: str) -> None:
    path = os.path.join(sock_dir, "p.sock")
    old = os.umask(0)
    try:
        with running_server(kind, "unix://" + path):
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    finally:
        os.umask(old)
    assert not os.path.exists(path)  # removed when the server closes


@pytest.mark.parametrize(("server_kind", "client_kind"), KINDS)
def test_abstract_address(server_kind: str, client_kind: str) -> None:
    address = f"unix://@ttrpc-test-{os.getpid()}-{server_kind}-{client_kind}"
    with running_server(server_kind, address):
        client = SyncCaller(client_kind, address)
        try:
            assert client.call("Echo", KeyValue(key="abstract")).key == "abstract"
        finally:
            client.close()


@pytest.mark.parametrize("kind", ["aio", "blocking"])
def test_serves_an_inherited_listening_socket(kind: str) -> None:
    listener, peer = socket.socketpair(socket.AF_UNIX)
    peer.close()
    listener.close()
    sock = socket.socket(socket.AF_UNIX)
    sock.bind("\0ttrpc-inherited-" + str(os.getpid()) + kind)
    sock.listen(4)
    inherited = socket.socket(fileno=os.dup(sock.fileno()))  # as a child finds fd 3
    sock.close()
    with running_server(kind, inherited):
        client = SyncCaller(kind, "unix://@ttrpc-inherited-" + str(os.getpid()) + kind)
        try:
            assert client.call("Echo", KeyValue(key="fd")).key == "fd"
        finally:
            client.close()


@pytest.mark.parametrize(("server_kind", "client_kind"), KINDS)
def test_handshake_refuses_other_users(server_kind: str, client_kind: str, address: str) -> None:
    wrong_uid = os.geteuid() + 1
    with running_server(server_kind, address, handshake=require_uid_gid(uid=wrong_uid)):
        client = SyncCaller(client_kind, address)
        try:
            with pytest.raises(ConnectionClosed):
                client.call("Echo", KeyValue())
        finally:
            client.close()
    with running_server(server_kind, address, handshake=require_uid_gid(uid=os.geteuid())):
        client = SyncCaller(client_kind, address)
        try:
            assert client.call("Echo", KeyValue(key="me")).key == "me"
        finally:
            client.close()


@pytest.mark.parametrize(("server_kind", "client_kind"), KINDS)
def test_on_close_callbacks(server_kind: str, client_kind: str, address: str) -> None:
    server_closed = threading.Event()
    client_closed = threading.Event()
    with running_server(server_kind, address, on_connection_closed=server_closed.set):
        client = SyncCaller(client_kind, address, on_close=client_closed.set)
        assert client.call("Echo", KeyValue(key="x")).key == "x"
        client.close()
        assert client_closed.wait(5)
        assert server_closed.wait(5)


def test_blocking_server_answers_an_expired_call_with_its_deadline_only(sock_dir: str) -> None:
    """A handler that returns the moment its call is cancelled must not beat the server's
    DEADLINE_EXCEEDED: the peer, here one with no deadline of its own, gets that alone."""
    import ttrpc.blocking
    from ttrpc import Method, Service

    def wait_for_cancel(req: KeyValue, ctx: Context) -> KeyValue:
        while not ctx.cancelled:
            time.sleep(0.0005)
        return KeyValue(key="too late")

    service = Service(SERVICE, {"Wait": Method("Wait", KeyValue, KeyValue, wait_for_cancel)})
    server = ttrpc.blocking.Server()
    server.register(service)
    path = os.path.join(sock_dir, "expire.sock")
    server.start(ttrpc.address.listen("unix://" + path))
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.connect(path)
        sock.settimeout(10)
        reader = FrameReader()
        for i in range(30):
            stream_id = 2 * i + 1
            req = Request(
                service=SERVICE, method="Wait", payload=KeyValue().SerializeToString(),
                timeout_nano=20_000_000,
            )  # fmt: skip
            sock.sendall(encode_frame(stream_id, MESSAGE_TYPE_REQUEST, req.SerializeToString()))
            frames: list = []
            while not frames:
                frames = list(reader.feed(sock.recv(65536)))
            [frame] = frames
            assert frame.stream_id == stream_id
            response = Response.FromString(frame.payload)  # type: ignore[arg-type]
            assert response.status.code == Code.DEADLINE_EXCEEDED, (i, response)
        # Nothing else follows: the handlers' late answers were dropped.
        sock.settimeout(0.2)
        with pytest.raises(TimeoutError):
            sock.recv(65536)
    finally:
        sock.close()
        server.close()
