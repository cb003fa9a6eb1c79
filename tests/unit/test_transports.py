"""Transports and connection policy: vsock addresses, handshakes, limits, reconnecting clients."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import time
from typing import Any

import pytest

import ttrpc.aio
import ttrpc.blocking
from ttrpc import Code, ConnectionClosed, Context, RpcError, require_root, require_same_user
from ttrpc._backoff import Backoff
from ttrpc.address import parse_vsock_address, resolve
from ttrpc.protocol import PROTOCOL_MAX_MESSAGE_LENGTH
from ttrpc.ttrpc_pb2 import KeyValue

from .harness import SERVICE, STREAMS, LoopThread, SyncCaller, running_server

# -- vsock ------------------------------------------------------------------------------


def test_vsock_addresses_parse() -> None:
    assert parse_vsock_address("vsock://3:1024") == (3, 1024)
    assert parse_vsock_address("vsock://-1:1024") == (0xFFFFFFFF, 1024)  # VMADDR_CID_ANY
    assert parse_vsock_address("vsock://any:5") == (0xFFFFFFFF, 5)
    assert parse_vsock_address("vsock://host:5") == (2, 5)
    assert parse_vsock_address("vsock://local:5") == (1, 5)
    for bad in (
        "vsock://3",
        "vsock://:1",
        "vsock://x:1",
        "vsock://3:p",
        "vsock://3:-1",
        "unix:///x",
    ):
        with pytest.raises(ValueError):
            parse_vsock_address(bad)
    if hasattr(socket, "AF_VSOCK"):
        assert resolve("vsock://7:99") == (socket.AF_VSOCK, (7, 99))
    assert resolve("fd://3") == (None, 3)
    assert resolve("unix://@x") == (socket.AF_UNIX, "\0x")
    with pytest.raises(ValueError, match="vsock://CID:PORT"):
        resolve("tcp://127.0.0.1:1")


def _vsock_listener_or_skip() -> tuple[socket.socket, int]:
    """A free vsock port to listen on (this kernel can bind vsock sockets)."""
    if not hasattr(socket, "AF_VSOCK"):
        pytest.skip("no AF_VSOCK in this Python")
    for port in range(40000 + os.getpid() % 10000, 60000, 7):
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        try:
            sock.bind((0xFFFFFFFF, port))
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                continue
            pytest.skip(f"vsock sockets cannot be bound here: {exc}")
        sock.close()
        return sock, port
    pytest.skip("no free vsock port")


@pytest.mark.parametrize("kind", ["aio", "blocking"])
def test_vsock_servers_bind_and_listen(kind: str) -> None:
    # This machine's kernel has no vsock loopback transport: a server can bind and listen
    # on vsock://-1:PORT (what kata-style agents do), but nothing here can connect to it,
    # so serving calls over vsock is not tested here; addresses and binding are.
    _, port = _vsock_listener_or_skip()
    address = f"vsock://-1:{port}"
    with running_server(kind, address) as server:
        if kind == "aio":
            listeners = [s.sockets[0] for s in server.server._servers]
        else:
            listeners = [sock for sock, _, _ in server.server._listeners]
        (listener,) = listeners
        assert listener.family == socket.AF_VSOCK
        assert listener.getsockname() == (0xFFFFFFFF, port)
    # Closed: the port is free again (and there is no socket file to remove).
    again = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    again.bind((0xFFFFFFFF, port))
    again.close()


def test_vsock_clients_dial_vsock() -> None:
    # No loopback transport: a dial to the local CID cannot succeed here. What is checked
    # is that both clients make a vsock connect to (CID, PORT) and report its failure.
    if not hasattr(socket, "AF_VSOCK"):
        pytest.skip("no AF_VSOCK in this Python")
    with pytest.raises(OSError):
        ttrpc.blocking.connect("vsock://1:9", timeout=0.2)

    async def aio_dial() -> None:
        await ttrpc.aio.connect("vsock://1:9", timeout=0.2)

    with pytest.raises((OSError, asyncio.TimeoutError)):
        asyncio.run(aio_dial())


# -- handshakes and peer credentials ------------------------------------------------------


@pytest.mark.parametrize("kind", ["aio", "blocking"])
def test_custom_handshake_hook_and_refusal_log(
    kind: str, address: str, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[Any] = []

    def hook(peer: Any) -> bool:
        seen.append(peer)
        return len(seen) > 1  # refuse the first connection only

    with running_server(kind, address, handshake=hook):
        refused = SyncCaller("blocking", address)
        with pytest.raises(ConnectionClosed):
            refused.call("Echo", KeyValue())
        refused.close()
        accepted = SyncCaller("blocking", address)
        try:
            assert accepted.call("Echo", KeyValue(key="ok")).key == "ok"
        finally:
            accepted.close()
    assert seen[0].pid == os.getpid() and seen[0].uid == os.geteuid()
    assert any("refusing connection after handshake" in r.message for r in caplog.records)


def test_handshake_helpers() -> None:
    me = ttrpc.PeerCredentials(pid=1, uid=os.geteuid(), gid=os.getegid())
    other = ttrpc.PeerCredentials(pid=1, uid=os.geteuid() + 1, gid=os.getegid())
    assert require_same_user()(me) and not require_same_user()(other)
    assert not require_same_user()(None)  # no credentials (vsock): refused
    assert require_root()(ttrpc.PeerCredentials(1, 0, 0))
    assert not require_root()(ttrpc.PeerCredentials(1, 0, 5))
    assert ttrpc.require_uid_gid(gid=ttrpc.ANY, uid=7)(ttrpc.PeerCredentials(1, 7, 99))


@pytest.mark.parametrize("kind", ["aio", "blocking"])
def test_handlers_see_peer_credentials(kind: str, address: str) -> None:
    seen: list[Any] = []

    class Spy(ttrpc.interceptors.Interceptor):
        async def server_unary(self, request: Any, ctx: Context, info: Any, nxt: Any) -> Any:
            seen.append(ctx.peer)
            return await nxt(request, ctx)

        def blocking_server_unary(self, request: Any, ctx: Context, info: Any, nxt: Any) -> Any:
            seen.append(ctx.peer)
            return nxt(request, ctx)

    with running_server(kind, address, interceptors=[Spy()]):
        client = SyncCaller(kind, address)
        try:
            client.call("Echo", KeyValue())
        finally:
            client.close()
    assert (seen[0].pid, seen[0].uid, seen[0].gid) == (os.getpid(), os.geteuid(), os.getegid())


# -- message limits --------------------------------------------------------------------------


@pytest.mark.parametrize(("server_kind", "client_kind"), [("aio", "blocking"), ("blocking", "aio")])
def test_message_limits_per_client_and_server(
    server_kind: str, client_kind: str, address: str
) -> None:
    with running_server(server_kind, address, max_message_length=1024):
        client = SyncCaller(client_kind, address, max_message_length=2048)
        try:
            with pytest.raises(RpcError) as err:  # refused by the server
                client.call("Echo", KeyValue(key="x" * 1500))
            assert err.value.code == Code.RESOURCE_EXHAUSTED
            with pytest.raises(RpcError) as err:  # refused before sending
                client.call("Echo", KeyValue(key="x" * 3000))
            assert err.value.code == Code.RESOURCE_EXHAUSTED
            with pytest.raises(RpcError) as err:  # the server's answer would be too big
                client.call("Big", KeyValue(value="1500"))
            assert err.value.code == Code.RESOURCE_EXHAUSTED
            assert client.call("Echo", KeyValue(key="x" * 500)).key == "x" * 500
        finally:
            client.close()
    for bad in (0, PROTOCOL_MAX_MESSAGE_LENGTH + 1):
        with pytest.raises(ValueError):
            ttrpc.blocking.Server(max_message_length=bad).register(ttrpc.Service("x"))
            ttrpc.protocol.ServerConnection(bad)


# -- reconnecting clients -------------------------------------------------------------------


def test_backoff_policy() -> None:
    backoff = Backoff(initial=0.1, maximum=0.4, multiplier=2, jitter=0)
    backoff.check("a")  # nothing failed yet
    delays = []
    for _ in range(4):
        start = time.monotonic()
        backoff.failed(OSError("down"))
        delays.append(round(backoff.next_attempt - start, 1))
    assert delays == [0.1, 0.2, 0.4, 0.4]
    with pytest.raises(RpcError) as err:
        backoff.check("unix:///x")
    assert err.value.code == Code.UNAVAILABLE and "next attempt in" in err.value.message
    backoff.succeeded()
    backoff.check("a")
    with pytest.raises(ValueError):
        Backoff(initial=0)


def _wait_past(backoff: Backoff) -> None:
    time.sleep(max(0.0, backoff.next_attempt - time.monotonic()) + 0.01)


def test_blocking_reconnecting_client(address: str) -> None:
    backoff = Backoff(initial=0.05, maximum=0.2, jitter=0)
    client = ttrpc.blocking.ReconnectingClient(address, backoff=backoff)
    with pytest.raises(RpcError) as err:
        client.call(SERVICE, "Echo", KeyValue(), KeyValue)
    assert err.value.code == Code.UNAVAILABLE and backoff.failures == 1
    with pytest.raises(RpcError) as err:  # fails fast: no new dial inside the window
        client.call(SERVICE, "Echo", KeyValue(), KeyValue)
    assert "next attempt in" in err.value.message and backoff.failures == 1
    with running_server("blocking", address):
        _wait_past(backoff)
        assert client.call(SERVICE, "Echo", KeyValue(key="up"), KeyValue).key == "up"
        assert [
            m.key for m in client.server_stream(STREAMS, "Down", KeyValue(key="2"), KeyValue)
        ] == [
            "0",
            "1",
        ]
        assert client.connects == 1 and client.connected
    # The server went away: the next call learns it, later ones fail fast, then it comes back.
    with pytest.raises((ConnectionClosed, RpcError)):
        client.call(SERVICE, "Echo", KeyValue(), KeyValue)
    with pytest.raises(RpcError) as err:
        client.call(SERVICE, "Echo", KeyValue(), KeyValue)
    assert err.value.code == Code.UNAVAILABLE
    with running_server("aio", address):
        _wait_past(backoff)
        assert client.call(SERVICE, "Echo", KeyValue(key="again"), KeyValue).key == "again"
        assert client.connects == 2
        client.close()
    with pytest.raises(RpcError):
        client.call(SERVICE, "Echo", KeyValue(), KeyValue)


def test_aio_reconnecting_client(address: str) -> None:
    backoff = Backoff(initial=0.05, maximum=0.2, jitter=0)
    loop = LoopThread()

    async def make() -> ttrpc.aio.ReconnectingClient:
        return ttrpc.aio.ReconnectingClient(address, backoff=backoff)

    client = loop.run(make())

    async def echo(key: str) -> str:
        reply = await client.call(SERVICE, "Echo", KeyValue(key=key), KeyValue)
        return reply.key

    async def down() -> list[str]:
        await client.connect()
        stream = client.server_stream(STREAMS, "Down", KeyValue(key="2"), KeyValue)
        return [m.key async for m in stream]

    try:
        with pytest.raises(RpcError) as err:
            loop.run(echo("x"))
        assert err.value.code == Code.UNAVAILABLE
        with pytest.raises(RpcError) as err:
            loop.run(echo("x"))
        assert "next attempt in" in err.value.message
        with running_server("aio", address):
            _wait_past(backoff)

            # Many calls at once while disconnected: one dial serves them all.
            async def many() -> list[str]:
                return list(await asyncio.gather(*(echo(str(i)) for i in range(20))))

            assert loop.run(many()) == [str(i) for i in range(20)]
            assert loop.run(down()) == ["0", "1"]
            assert client.connects == 1
        with pytest.raises(RpcError):
            loop.run(echo("gone"))
        with running_server("blocking", address):
            _wait_past(backoff)
            assert loop.run(echo("back")) == "back"
            assert client.connects == 2
    finally:
        loop.run(client.close())
        loop.stop()


def test_reconnecting_client_behind_generated_code(address: str, caplog: Any) -> None:
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "interop"))
    try:
        from interop_pb2 import EchoRequest
        from interop_ttrpc import InteropBlockingClient

        from tests.interop.server import BlockingInterop
    finally:
        sys.path.pop(0)
    with ttrpc.blocking.Server() as server:
        server.register(BlockingInterop())
        server.start(address)
        with ttrpc.blocking.ReconnectingClient(address) as client:
            stub = InteropBlockingClient(client)
            assert stub.Echo(EchoRequest(text="generated")).text == "generated"
    logging.getLogger("ttrpc").debug("done")
