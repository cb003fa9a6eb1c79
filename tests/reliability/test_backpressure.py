"""Peers that stop reading: the server's memory stays bounded and everyone else goes on.

The server runs in a child process (``serve.py``) so that its resident memory
(``/proc/PID/smaps_rollup``), descriptors and threads are its own.
"""

from __future__ import annotations

import fcntl
import select
import socket
import struct
import termios
import threading
import time
from collections.abc import Iterator

import pytest

from ttrpc import Code, Context
from ttrpc.protocol import (
    FLAG_REMOTE_CLOSED,
    FLAGS_CLOSE,
    HEADER_LENGTH,
    MESSAGE_TYPE_DATA,
    MESSAGE_TYPE_REQUEST,
    MESSAGE_TYPE_RESPONSE,
    encode_frame,
)
from ttrpc.ttrpc_pb2 import KeyValue, Request, Response

from ..unit.harness import SERVICE, STREAMS, SyncCaller
from .external import ServerProcess, server_process, wait_until

KINDS = ["aio", "blocking"]
MiB = 1 << 20
SIZE = 128 * 1024  # bytes of each Big answer
CALLS = 2000  # Big calls a stalled peer sends: 256 MiB of answers if all were buffered
BOUND = 64 * MiB  # what the server's memory may grow by meanwhile
# Descriptors a server opens for good on its first slow peer: the blocking server's poller
# thread keeps an epoll and a wake-up socket pair.
POLLER_FDS = {"aio": 0, "blocking": 3}


def big_request(stream_id: int, size: int = SIZE) -> bytes:
    body = Request(
        service=SERVICE, method="Big", payload=KeyValue(value=str(size)).SerializeToString()
    ).SerializeToString()
    return encode_frame(stream_id, MESSAGE_TYPE_REQUEST, body)


def connect(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(address[len("unix://") :])
    sock.settimeout(30)
    return sock


def unread_by_server(sock: socket.socket) -> int:
    """Bytes this socket sent that the peer has not read yet (SIOCOUTQ)."""
    return int(struct.unpack("i", fcntl.ioctl(sock, termios.TIOCOUTQ, b"\0" * 4))[0])


def waiting_for_us(sock: socket.socket) -> int:
    """Bytes the peer sent that this socket has not read yet (FIONREAD)."""
    return int(struct.unpack("i", fcntl.ioctl(sock, termios.FIONREAD, b"\0" * 4))[0])


def read_frames(sock: socket.socket, count: int) -> Iterator[tuple[int, int, int, bytes]]:
    """``count`` frames as (stream id, type, flags, payload)."""
    buf = bytearray()
    chunk = bytearray(1 << 20)
    for _ in range(count):
        while True:
            if len(buf) >= HEADER_LENGTH:
                length, stream_id, mtype, flags = struct.unpack_from(">IIBB", buf)
                end = HEADER_LENGTH + length
                if len(buf) >= end:
                    payload = bytes(buf[HEADER_LENGTH:end])
                    del buf[:end]
                    yield stream_id, mtype, flags, payload
                    break
            n = sock.recv_into(chunk)
            assert n, "EOF before every answer came"
            buf += chunk[:n]
    assert not buf


def watch_memory(server: ServerProcess, seconds: float) -> int:
    """The server's peak resident memory over ``seconds`` (sampled every 20 ms)."""
    peak = server.rss()
    tick = threading.Event()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        tick.wait(0.02)  # the sampling period of a measurement
        peak = max(peak, server.rss())
    return peak


def prompt_calls(client: SyncCaller, count: int = 50) -> float:
    """Make ``count`` Echo calls (each with a 5 s deadline); the slowest one's seconds."""
    worst = 0.0
    for i in range(count):
        start = time.monotonic()
        assert client.call("Echo", KeyValue(key=str(i)), Context(timeout=5)).key == str(i)
        worst = max(worst, time.monotonic() - start)
    return worst


def warm_up(client: SyncCaller) -> None:
    for _ in range(10):
        assert len(client.call("Big", KeyValue(value=str(SIZE))).value) == SIZE
    prompt_calls(client)


@pytest.mark.parametrize("kind", KINDS)
def test_peer_that_stops_reading_unary_answers(kind: str, address: str) -> None:
    with server_process(kind, address) as server:
        other = SyncCaller("blocking", address)
        try:
            warm_up(other)
            base_rss, base_fds = server.rss(), server.fds()
            stalled = connect(address)
            stalled.sendall(b"".join(big_request(2 * i + 1) for i in range(CALLS)))
            peak = watch_memory(server, 2.0)
            worst = prompt_calls(other)  # another connection is answered meanwhile
            peak = max(peak, server.rss())
            assert peak - base_rss < BOUND, f"server grew {(peak - base_rss) / MiB:.1f} MiB"
            assert worst < 1.0, f"a call on another connection took {worst:.2f} s"
            assert unread_by_server(stalled) > 0, "the server should have stopped reading"

            # The stalled peer reads at last: every call is answered, in full.
            seen = set()
            for stream_id, mtype, _, payload in read_frames(stalled, CALLS):
                assert mtype == MESSAGE_TYPE_RESPONSE
                response = Response.FromString(payload)
                assert response.status.code == Code.OK
                assert len(KeyValue.FromString(response.payload).value) == SIZE
                seen.add(stream_id)
            assert seen == {2 * i + 1 for i in range(CALLS)}
            stalled.close()
            wait_until(
                lambda: server.fds() <= base_fds + POLLER_FDS[kind], 10, "the connection to go"
            )
            assert prompt_calls(other) < 1.0
        finally:
            other.close()


@pytest.mark.parametrize("kind", KINDS)
def test_peer_that_stops_reading_a_stream(kind: str, address: str) -> None:
    count = 5000  # 64 KiB messages: 320 MiB if all were buffered
    with server_process(kind, address) as server:
        other = SyncCaller("blocking", address)
        try:
            warm_up(other)
            base_rss, base_fds = server.rss(), server.fds()
            stalled = connect(address)
            body = Request(
                service=STREAMS,
                method="Down",
                payload=KeyValue(key=str(count), value="big").SerializeToString(),
            ).SerializeToString()
            stalled.sendall(encode_frame(1, MESSAGE_TYPE_REQUEST, body, FLAG_REMOTE_CLOSED))
            peak = watch_memory(server, 2.0)
            worst = prompt_calls(other)
            peak = max(peak, server.rss())
            assert peak - base_rss < BOUND, f"server grew {(peak - base_rss) / MiB:.1f} MiB"
            assert worst < 1.0, f"a call on another connection took {worst:.2f} s"

            frames = list(read_frames(stalled, count + 1))
            for i, (stream_id, mtype, flags, payload) in enumerate(frames[:-1]):
                assert (stream_id, mtype, flags) == (1, MESSAGE_TYPE_DATA, 0)
                message = KeyValue.FromString(payload)
                assert message.key == str(i) and len(message.value) == 65536
            assert frames[-1] == (1, MESSAGE_TYPE_DATA, FLAGS_CLOSE, b"")
            stalled.close()
            wait_until(
                lambda: server.fds() <= base_fds + POLLER_FDS[kind], 10, "the connection to go"
            )
        finally:
            other.close()


def test_blocking_server_closes_a_peer_that_reads_nothing(address: str) -> None:
    timeout = 1.0
    with server_process("blocking", address, write_timeout=timeout) as server:
        other = SyncCaller("blocking", address)
        try:
            warm_up(other)
            base_fds = server.fds()
            stalled = connect(address)
            start = time.monotonic()
            stalled.sendall(b"".join(big_request(2 * i + 1) for i in range(CALLS)))
            assert prompt_calls(other) < 1.0
            # Without reading a byte, wait for the server to hang up (POLLHUP).
            poller = select.poll()
            poller.register(stalled, select.POLLHUP)
            assert any(ev & select.POLLHUP for _, ev in poller.poll(10_000)), "still open"
            assert time.monotonic() - start >= timeout
            stalled.close()
            # The connection's reader thread closes its descriptor as it ends.
            wait_until(lambda: server.fds() <= base_fds + POLLER_FDS["blocking"], 10, "the close")
            assert "read nothing for 1 s: closing its connection" in server.log()
            assert prompt_calls(other) < 1.0
        finally:
            other.close()


def test_blocking_server_stalled_peers_hold_no_handler_thread(address: str) -> None:
    """More stalled peers than handler threads: the others are still served at once."""
    workers = 4
    with server_process("blocking", address, max_workers=workers) as server:
        other = SyncCaller("blocking", address)
        stalled: list[socket.socket] = []
        try:
            warm_up(other)
            for _ in range(workers + 2):
                sock = connect(address)
                sock.sendall(b"".join(big_request(2 * i + 1, 1 << 20) for i in range(64)))
                stalled.append(sock)
            # Each stalled peer's socket is full of answers it does not read.
            wait_until(
                lambda: all(waiting_for_us(s) > 100_000 for s in stalled), 10, "full sockets"
            )
            worst = prompt_calls(other)
            assert worst < 1.0, f"a call on another connection took {worst:.2f} s"
            assert server.alive()
        finally:
            for sock in stalled:
                sock.close()
            other.close()
