"""Faults a server must shrug off: peers that vanish or crawl, floods of calls, bad handlers."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator

import pytest

import ttrpc.aio
from ttrpc.protocol import MESSAGE_TYPE_REQUEST, encode_frame
from ttrpc.ttrpc_pb2 import KeyValue, Request

from ..unit.harness import SERVICE, STREAMS, RunningServer, SyncCaller, running_server

KINDS = ["aio", "blocking"]


@pytest.fixture(params=KINDS)
def server(request: pytest.FixtureRequest, address: str) -> Iterator[tuple[RunningServer, str]]:
    with running_server(request.param, address) as running:
        yield running, address


def raw(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(5)
    sock.connect(address[len("unix://") :])
    return sock


def echo_frame(stream_id: int, text: str = "x") -> bytes:
    body = Request(
        service=SERVICE, method="Echo", payload=KeyValue(key=text).SerializeToString()
    ).SerializeToString()
    return encode_frame(stream_id, MESSAGE_TYPE_REQUEST, body)


@pytest.mark.parametrize("cut", [3, 10, 14], ids=["mid-header", "after-header", "mid-body"])
def test_peer_vanishing_mid_frame_harms_nobody(server: tuple[RunningServer, str], cut: int) -> None:
    _, address = server
    client = SyncCaller("blocking", address)
    try:
        for _ in range(20):
            sock = raw(address)
            sock.sendall(echo_frame(1)[:cut])
            sock.close()
        assert client.call("Echo", KeyValue(key="still here")).key == "still here"
    finally:
        client.close()


def test_peer_vanishing_with_calls_in_flight(server: tuple[RunningServer, str]) -> None:
    _, address = server
    for _ in range(10):
        sock = raw(address)
        body = Request(
            service=SERVICE, method="Sleep", payload=KeyValue(value="0.2").SerializeToString()
        ).SerializeToString()
        sock.sendall(encode_frame(1, MESSAGE_TYPE_REQUEST, body) + echo_frame(3))
        sock.close()  # the answers have nowhere to go; the server must not mind
    client = SyncCaller("aio", address)
    try:
        assert client.call("Echo", KeyValue(key="fine")).key == "fine"
    finally:
        client.close()


def test_slow_loris_does_not_hold_up_others(server: tuple[RunningServer, str]) -> None:
    _, address = server
    loris = raw(address)
    frame = echo_frame(1, "slow")
    stop = threading.Event()

    def crawl() -> None:
        for byte in frame[:-1]:  # never completes the frame
            if stop.wait(0.02):  # one byte every 20 ms: the attacker's pace, not synchronisation
                return
            loris.sendall(bytes([byte]))

    t = threading.Thread(target=crawl, daemon=True)
    t.start()
    client = SyncCaller("blocking", address)
    try:
        start = time.monotonic()
        for i in range(200):
            assert client.call("Echo", KeyValue(key=str(i))).key == str(i)
        assert time.monotonic() - start < 10
    finally:
        stop.set()
        t.join(5)
        client.close()
        loris.close()


def test_ten_thousand_concurrent_calls_on_one_connection(address: str) -> None:
    with running_server("aio", address):

        async def main() -> list[str]:
            conn = await ttrpc.aio.connect(address)
            try:
                calls = [
                    conn.call(SERVICE, "Echo", KeyValue(key=str(i)), KeyValue)
                    for i in range(10_000)
                ]
                replies = await asyncio.wait_for(asyncio.gather(*calls), 60)
                return [r.key for r in replies]
            finally:
                await conn.close()

        assert asyncio.run(main()) == [str(i) for i in range(10_000)]


def test_ten_thousand_concurrent_streams_on_one_connection(address: str) -> None:
    """10,000 bidirectional streams open at once on one connection, with unary calls
    among them: every stream gets its own answer, none is mixed up or lost."""
    count = 10_000
    with running_server("aio", address):

        async def main() -> tuple[list[list[str]], list[str]]:
            conn = await ttrpc.aio.connect(address)
            opened = asyncio.Event()
            waiting = 0

            async def one(i: int) -> list[str]:
                nonlocal waiting

                async def messages() -> AsyncIterator[KeyValue]:
                    nonlocal waiting
                    yield KeyValue(key=f"s{i}")
                    # Hold every stream open until all of them are: truly concurrent.
                    waiting += 1
                    if waiting == count:
                        opened.set()
                    await opened.wait()
                    yield KeyValue(key=f"t{i}")

                stream = conn.bidi_stream(STREAMS, "Both", messages(), KeyValue)
                return [m.key async for m in stream]

            try:
                streams = asyncio.gather(*(one(i) for i in range(count)))
                echo = KeyValue
                calls = asyncio.gather(
                    *(conn.call(SERVICE, "Echo", echo(key=str(i)), echo) for i in range(500))
                )
                replies, echoes = await asyncio.wait_for(asyncio.gather(streams, calls), 45)
                return list(replies), [r.key for r in echoes]
            finally:
                await conn.close()

        replies, echoes = asyncio.run(main())
        assert replies == [[f"S{i}", f"T{i}"] for i in range(count)]
        assert echoes == [str(i) for i in range(500)]


def test_many_threads_share_one_blocking_connection(server: tuple[RunningServer, str]) -> None:
    _, address = server
    client = SyncCaller("blocking", address)
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(100):
                key = f"{n}-{i}"
                assert client.call("Echo", KeyValue(key=key)).key == key
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    client.close()
    assert not errors, errors[:3]
    assert not any(t.is_alive() for t in threads)
