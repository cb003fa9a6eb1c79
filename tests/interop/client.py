"""Conformance client: checks ttrpc's clients (blocking and asyncio) against an Interop server.

    python tests/interop/client.py ADDRESS [--run TEXT] [--streams]

One ``PASS name`` or ``FAIL name: why`` line per check, then ``N passed, M failed``;
exits 0 only if every check passed. Meant to run against the Go reference
server (``go-server``), but any correct Interop server must pass.

``--streams`` adds the Streaming checks (streaming.proto): every kind with both
clients, and raw frames built byte by byte from the ttrpc 1.2 rules (golden
bytes). Go ttrpc 1.1.1 has no streams, so they run against our own servers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import interop_pb2 as pb
import streaming_pb2 as spb
from interop_ttrpc import InteropBlockingClient, InteropClient
from streaming_ttrpc import StreamingBlockingClient, StreamingClient

import ttrpc.aio
import ttrpc.blocking
from ttrpc import Code, ConnectionClosed, Context, RpcError
from ttrpc.protocol import (
    MESSAGE_TYPE_REQUEST,
    MESSAGE_TYPE_RESPONSE,
    Frame,
    FrameReader,
    encode_frame,
)
from ttrpc.ttrpc_pb2 import KeyValue, Request, Response

SERVICE = "ttrpc.interop.v1.Interop"
CHECK_TIMEOUT = 20.0
LIMIT = 4 << 20


class CheckFailed(Exception):
    pass


def expect(condition: bool, why: str) -> None:
    if not condition:
        raise CheckFailed(why)


def expect_code(fn: Callable[[], object], code: Code) -> RpcError:
    try:
        fn()
    except RpcError as exc:
        expect(exc.code == code, f"want {code.name}, got {exc!r}")
        return exc
    raise CheckFailed(f"want {code.name}, got success")


def wait_pending(conn: ttrpc.blocking.Client) -> None:
    """Until the connection has a call in flight (bounded)."""
    end = time.monotonic() + 5
    while conn._conn.pending == 0:
        expect(time.monotonic() < end, "call never went out")
        time.sleep(0.001)


def pattern(length: int) -> bytes:
    block = bytes(range(251))
    return (block * (length // 251 + 1))[:length]


# -- checks with the blocking client ---------------------------------------------


def blocking_checks(address: str) -> dict[str, Callable[[], None]]:
    def client() -> tuple[ttrpc.blocking.Client, InteropBlockingClient]:
        conn = ttrpc.blocking.connect(address, timeout=5)
        return conn, InteropBlockingClient(conn)

    def echo() -> None:
        conn, c = client()
        with conn:
            for data, text, number in [
                (b"", "", 0),
                (bytes(range(256)), "héllo ✓ 世界", -(2**63)),
                (b"\0" * 1000, "x", 2**63 - 1),
            ]:
                r = c.Echo(pb.EchoRequest(data=data, text=text, number=number))
                expect((r.data, r.text, r.number) == (data, text, number), f"echo mismatch {r}")

    def concurrent() -> None:
        conn, c = client()
        with conn, ThreadPoolExecutor(32) as pool:
            slow = pool.submit(c.Sleep, pb.SleepRequest(duration_ms=300))
            futures = [
                pool.submit(c.Echo, pb.EchoRequest(number=i), Context(timeout=10))
                for i in range(200)
            ]
            numbers = [f.result(15).number for f in futures]
            expect(numbers == list(range(200)), "answers mixed up")
            expect(slow.result(15).slept_ms >= 300, "sleep too short")

    def fail_codes() -> None:
        conn, c = client()
        with conn:
            for code in range(1, 17):
                err = expect_code(
                    lambda code=code: c.Fail(
                        pb.FailRequest(code=code, message=f"m{code}", details=["a", "b"])
                    ),
                    Code(code),
                )
                expect(err.message == f"m{code}", f"message {err.message!r}")
                got = []
                for any_ in err.details:
                    expect(any_.type_url.endswith("ttrpc.interop.v1.FailDetail"), any_.type_url)
                    got.append(pb.FailDetail.FromString(any_.value).detail)
                expect(got == ["a", "b"], f"details {got}")

    def metadata() -> None:
        conn, c = client()
        with conn:
            md = {"Alpha": ["1", "2"], "beta": "3", "containerd-namespace-ttrpc": "default"}
            r = c.Metadata(pb.MetadataRequest(), Context(metadata=md))
            pairs = [(kv.key, kv.value) for kv in r.pairs]
            want = [
                ("alpha", "1"),
                ("alpha", "2"),
                ("beta", "3"),
                ("containerd-namespace-ttrpc", "default"),
            ]
            expect(pairs == want, f"pairs {pairs}")
            expect(not r.has_deadline, "deadline without one sent")
            r = c.Metadata(pb.MetadataRequest(), Context(timeout=5))
            expect(r.has_deadline, "no deadline seen")
            expect(
                0 < r.deadline_remaining_ns <= 5_000_000_000, f"remaining {r.deadline_remaining_ns}"
            )

    def server_deadline() -> None:
        conn, c = client()
        with conn:
            start = time.monotonic()
            expect_code(
                lambda: c.Sleep(pb.SleepRequest(duration_ms=3000), Context(timeout=0.2)),
                Code.DEADLINE_EXCEEDED,
            )
            elapsed = time.monotonic() - start
            expect(0.15 < elapsed < 1.5, f"took {elapsed:.3f}s")

    def client_deadline() -> None:
        conn, c = client()
        with conn:
            start = time.monotonic()
            expect_code(
                lambda: c.Sleep(
                    pb.SleepRequest(duration_ms=800, ignore_deadline=True), Context(timeout=0.3)
                ),
                Code.DEADLINE_EXCEEDED,
            )
            elapsed = time.monotonic() - start
            expect(0.25 < elapsed < 0.75, f"gave up after {elapsed:.3f}s")
            # The late answer arrives while this call is waiting; it must be dropped.
            r = c.Sleep(pb.SleepRequest(duration_ms=900))
            expect(r.slept_ms >= 900, "a late answer was taken for this call")
            expect(c.Echo(pb.EchoRequest(text="after")).text == "after", "connection unusable")

    def unimplemented() -> None:
        conn, _ = client()
        with conn:
            err = expect_code(
                lambda: conn.call(SERVICE, "NoSuchMethod", pb.EchoRequest(), pb.EchoResponse),
                Code.UNIMPLEMENTED,
            )
            expect("NoSuchMethod" in err.message, err.message)
            expect_code(
                lambda: conn.call("no.such.Service", "Echo", pb.EchoRequest(), pb.EchoResponse),
                Code.UNIMPLEMENTED,
            )

    def big() -> None:
        conn, c = client()
        with conn:
            size = LIMIT - 64
            r = c.Big(pb.BigRequest(length=size))
            expect(r.data == pattern(size), "big payload corrupted")

    def oversize_response() -> None:
        conn, c = client()
        with conn:
            expect_code(lambda: c.Big(pb.BigRequest(length=LIMIT + 1000)), Code.RESOURCE_EXHAUSTED)
            expect(c.Echo(pb.EchoRequest(text="alive")).text == "alive", "connection lost")

    def oversize_request() -> None:
        conn, c = client()
        with conn:
            expect_code(lambda: c.Echo(pb.EchoRequest(data=b"x" * LIMIT)), Code.RESOURCE_EXHAUSTED)
            expect(c.Echo(pb.EchoRequest(text="alive")).text == "alive", "connection lost")

    def closed_connection() -> None:
        conn, c = client()
        pending: list[BaseException] = []

        def call() -> None:
            try:
                c.Sleep(pb.SleepRequest(duration_ms=5000))
            except BaseException as exc:
                pending.append(exc)

        t = threading.Thread(target=call)
        t.start()
        wait_pending(conn)
        conn.close()
        t.join(5)
        expect(not t.is_alive(), "pending call not failed on close")
        expect(isinstance(pending[0], ConnectionClosed), f"got {pending!r}")
        expect_code(lambda: c.Echo(pb.EchoRequest()), Code.UNAVAILABLE)

    return {
        "blocking/echo": echo,
        "blocking/concurrent-200": concurrent,
        "blocking/fail-codes-and-details": fail_codes,
        "blocking/metadata": metadata,
        "blocking/server-deadline": server_deadline,
        "blocking/client-deadline-drops-late-answer": client_deadline,
        "blocking/unimplemented": unimplemented,
        "blocking/big-under-limit": big,
        "blocking/oversize-response": oversize_response,
        "blocking/oversize-request-refused": oversize_request,
        "blocking/close-fails-pending": closed_connection,
    }


# -- checks with the asyncio client ----------------------------------------------


def aio_checks(address: str) -> dict[str, Callable[[], None]]:
    def run(body: Callable[[InteropClient, ttrpc.aio.Client], object]) -> Callable[[], None]:
        async def main() -> None:
            conn = await ttrpc.aio.connect(address, timeout=5)
            try:
                await body(InteropClient(conn), conn)  # type: ignore[misc]
            finally:
                await conn.close()

        return lambda: asyncio.run(asyncio.wait_for(main(), CHECK_TIMEOUT))

    async def echo(c: InteropClient, conn: ttrpc.aio.Client) -> None:
        r = await c.Echo(pb.EchoRequest(data=b"\x00\xff", text="✓", number=-1))
        expect((r.data, r.text, r.number) == (b"\x00\xff", "✓", -1), f"echo mismatch {r}")

    async def concurrent(c: InteropClient, conn: ttrpc.aio.Client) -> None:
        slow = asyncio.ensure_future(c.Sleep(pb.SleepRequest(duration_ms=300)))
        results = await asyncio.gather(*(c.Echo(pb.EchoRequest(number=i)) for i in range(500)))
        expect([r.number for r in results] == list(range(500)), "answers mixed up")
        expect(not slow.done(), "quick calls waited behind the slow one")
        expect((await slow).slept_ms >= 300, "sleep too short")

    async def fail(c: InteropClient, conn: ttrpc.aio.Client) -> None:
        try:
            await c.Fail(pb.FailRequest(code=7, message="no", details=["x"]))
        except RpcError as exc:
            expect(exc.code == Code.PERMISSION_DENIED and exc.message == "no", repr(exc))
            expect(pb.FailDetail.FromString(exc.details[0].value).detail == "x", "detail")
        else:
            raise CheckFailed("no error")

    async def deadlines(c: InteropClient, conn: ttrpc.aio.Client) -> None:
        start = time.monotonic()
        try:
            await c.Sleep(pb.SleepRequest(duration_ms=3000), Context(timeout=0.2))
        except RpcError as exc:
            expect(exc.code == Code.DEADLINE_EXCEEDED, repr(exc))
        expect(time.monotonic() - start < 1.5, "deadline not honoured")
        start = time.monotonic()
        try:
            await c.Sleep(
                pb.SleepRequest(duration_ms=800, ignore_deadline=True), Context(timeout=0.3)
            )
        except RpcError as exc:
            expect(exc.code == Code.DEADLINE_EXCEEDED, repr(exc))
        elapsed = time.monotonic() - start
        expect(0.25 < elapsed < 0.75, f"gave up after {elapsed:.3f}s")
        r = await c.Sleep(pb.SleepRequest(duration_ms=900))
        expect(r.slept_ms >= 900, "late answer taken for a new call")

    async def cancel(c: InteropClient, conn: ttrpc.aio.Client) -> None:
        task = asyncio.ensure_future(c.Sleep(pb.SleepRequest(duration_ms=400)))
        while conn._conn.pending == 0:
            await asyncio.sleep(0.001)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        else:
            raise CheckFailed("not cancelled")
        r = await c.Sleep(pb.SleepRequest(duration_ms=600))
        expect(r.slept_ms >= 600, "the cancelled call's answer was taken for a new call")

    async def metadata(c: InteropClient, conn: ttrpc.aio.Client) -> None:
        r = await c.Metadata(pb.MetadataRequest(), Context(metadata=[("k", "1"), ("k", "2")]))
        expect([(p.key, p.value) for p in r.pairs] == [("k", "1"), ("k", "2")], f"{r.pairs}")

    async def oversize(c: InteropClient, conn: ttrpc.aio.Client) -> None:
        try:
            await c.Big(pb.BigRequest(length=LIMIT + 10))
        except RpcError as exc:
            expect(exc.code == Code.RESOURCE_EXHAUSTED, repr(exc))
        else:
            raise CheckFailed("no error")
        expect((await c.Echo(pb.EchoRequest(text="ok"))).text == "ok", "connection lost")

    return {
        "aio/echo": run(echo),
        "aio/concurrent-500": run(concurrent),
        "aio/fail": run(fail),
        "aio/deadlines": run(deadlines),
        "aio/cancel-drops-late-answer": run(cancel),
        "aio/metadata": run(metadata),
        "aio/oversize-response": run(oversize),
    }


# -- raw frames built with our protocol core ---------------------------------------


def raw_checks(address: str) -> dict[str, Callable[[], None]]:
    def session(frames: bytes, want: int, *, split: int = 0) -> dict[int, Response]:
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(5)
        sock.connect(ttrpc.address.parse_unix_address(address))
        try:
            if split:
                for i in range(0, len(frames), split):
                    sock.sendall(frames[i : i + split])
            else:
                sock.sendall(frames)
            reader = FrameReader()
            got: dict[int, Response] = {}
            while len(got) < want:
                data = sock.recv(65536)
                expect(bool(data), f"connection closed after {len(got)} of {want} answers")
                for frame in reader.feed(data):
                    expect(isinstance(frame, Frame), "oversize answer")
                    assert isinstance(frame, Frame)
                    expect(frame.type == MESSAGE_TYPE_RESPONSE, f"type {frame.type}")
                    got[frame.stream_id] = Response.FromString(frame.payload)
            return got
        finally:
            sock.close()

    def req(stream_id: int, text: str, method: str = "Echo") -> bytes:
        body = Request(
            service=SERVICE, method=method, payload=pb.EchoRequest(text=text).SerializeToString()
        ).SerializeToString()
        return encode_frame(stream_id, MESSAGE_TYPE_REQUEST, body)

    def text_of(r: Response) -> str:
        expect(r.status.code == 0, f"status {r.status}")
        return pb.EchoResponse.FromString(r.payload).text

    def pipelined() -> None:
        got = session(req(1, "a") + req(3, "b") + req(5, "c"), 3)
        expect({k: text_of(v) for k, v in got.items()} == {1: "a", 3: "b", 5: "c"}, f"{got}")

    def one_byte_writes() -> None:
        got = session(req(1, "slow"), 1, split=1)
        expect(text_of(got[1]) == "slow", "bad answer")

    def unknown_type() -> None:
        got = session(encode_frame(1, 0x7F, b"future stuff") + req(3, "after"), 1)
        expect(list(got) == [3] and text_of(got[3]) == "after", f"{got}")

    def even_id() -> None:
        got = session(req(2, "even") + req(3, "odd"), 2)
        expect(got[2].status.code == Code.INVALID_ARGUMENT, f"{got[2]}")
        expect(text_of(got[3]) == "odd", "next request")

    def garbage_request() -> None:
        got = session(encode_frame(1, MESSAGE_TYPE_REQUEST, b"\xff\xff\xff\xff") + req(3, "x"), 2)
        expect(got[1].status.code == Code.INVALID_ARGUMENT, f"{got[1]}")

    def garbage_payload() -> None:
        body = Request(service=SERVICE, method="Echo", payload=b"\xff\xff").SerializeToString()
        got = session(encode_frame(1, MESSAGE_TYPE_REQUEST, body), 1)
        expect(got[1].status.code == Code.INTERNAL, f"{got[1]}")

    def oversize_frame() -> None:
        big = b"\0" * (LIMIT + 1)
        got = session(encode_frame(1, MESSAGE_TYPE_REQUEST, big) + req(3, "after"), 2)
        expect(got[1].status.code == Code.RESOURCE_EXHAUSTED, f"{got[1].status}")
        expect(text_of(got[3]) == "after", "connection did not survive")

    def metadata_on_wire() -> None:
        body = Request(
            service=SERVICE,
            method="Metadata",
            metadata=[KeyValue(key="Mixed-Case", value="v")],
            timeout_nano=2_000_000_000,
        ).SerializeToString()
        got = session(encode_frame(1, MESSAGE_TYPE_REQUEST, body), 1)
        r = pb.MetadataResponse.FromString(got[1].payload)
        expect([(p.key, p.value) for p in r.pairs] == [("Mixed-Case", "v")], f"{r.pairs}")
        expect(r.has_deadline and 0 < r.deadline_remaining_ns <= 2_000_000_000, f"{r}")

    return {
        "raw/pipelined-requests-one-write": pipelined,
        "raw/one-byte-writes": one_byte_writes,
        "raw/unknown-frame-type-ignored": unknown_type,
        "raw/even-stream-id": even_id,
        "raw/undecodable-request": garbage_request,
        "raw/undecodable-payload": garbage_payload,
        "raw/oversize-request-frame": oversize_frame,
        "raw/metadata-and-timeout-on-wire": metadata_on_wire,
    }


# -- streams (ttrpc 1.2; our servers only) ----------------------------------------------

STREAMING = "ttrpc.interop.v1.Streaming"


def items(n: int, size: int = 16) -> list[spb.Item]:
    return [spb.Item(seq=i, data=pattern(size)) for i in range(n)]


def stream_checks(address: str) -> dict[str, Callable[[], None]]:
    def blocking_kinds() -> None:
        with ttrpc.blocking.connect(address, timeout=5) as conn:
            c = StreamingBlockingClient(conn)
            got = list(c.Count(spb.CountRequest(count=1000, size=16)))
            expect([i.seq for i in got] == list(range(1000)), "Count items out of order")
            expect(all(i.data == pattern(16) for i in got), "Count data corrupted")
            r = c.Sum(iter(items(500)))
            expect((r.count, r.bytes) == (500, 500 * 16), f"Sum {r}")
            echoed = [i.seq for i in c.Echo(items(300))]
            expect(echoed == list(range(300)), "Echo out of order")
            stream = c.Echo()
            for seq in range(5):
                stream.send(spb.Item(seq=seq))
                back = stream.recv()
                expect(back is not None and back.seq == seq, f"interactive echo {back}")
            stream.close_send()
            expect(stream.recv() is None, "Echo did not end after close")

    def blocking_empty_and_errors() -> None:
        with ttrpc.blocking.connect(address, timeout=5) as conn:
            c = StreamingBlockingClient(conn)
            got = list(c.Count(spb.CountRequest(count=3, size=0)))
            expect(got == [spb.Item(seq=0), spb.Item(seq=1), spb.Item(seq=2)], f"{got}")
            expect(list(c.Count(spb.CountRequest(count=0))) == [], "Count 0")
            expect(c.Sum([spb.Item()] * 4).count == 4, "empty items not all delivered")
            stream = c.Count(spb.CountRequest(count=2, fail_code=Code.DATA_LOSS))
            seqs = []
            try:
                for i in stream:
                    seqs.append(i.seq)
                raise CheckFailed("no error")
            except RpcError as exc:
                expect(exc.code == Code.DATA_LOSS and exc.message == "failed after 2", repr(exc))
            expect(seqs == [0, 1], f"items before the error: {seqs}")

    def blocking_concurrent() -> None:
        with ttrpc.blocking.connect(address, timeout=5) as conn, ThreadPoolExecutor(16) as pool:
            c = StreamingBlockingClient(conn)

            def one(n: int) -> int:
                return sum(1 for _ in c.Count(spb.CountRequest(count=n, size=8)))

            def echo(n: int) -> list[int]:
                return [i.seq for i in c.Echo(items(n, 4))]

            counts = [pool.submit(one, 50 + i) for i in range(16)]
            echoes = [pool.submit(echo, 20 + i) for i in range(16)]
            expect([f.result(30) for f in counts] == [50 + i for i in range(16)], "counts")
            expect(
                [f.result(30) for f in echoes] == [list(range(20 + i)) for i in range(16)], "echo"
            )
            expect(InteropBlockingClient(conn).Echo(pb.EchoRequest(text="u")).text == "u", "unary")

    def aio_kinds() -> None:
        async def main() -> None:
            async with await ttrpc.aio.connect(address, timeout=5) as conn:
                c = StreamingClient(conn)
                got = [i.seq async for i in c.Count(spb.CountRequest(count=1000, size=16))]
                expect(got == list(range(1000)), "Count items out of order")

                async def agen() -> Any:
                    for it in items(500):
                        yield it

                r = await c.Sum(agen())
                expect((r.count, r.bytes) == (500, 500 * 16), f"Sum {r}")
                echoed = [i.seq async for i in c.Echo(items(300))]
                expect(echoed == list(range(300)), "Echo out of order")
                streams = [c.Count(spb.CountRequest(count=100 + n, size=4)) for n in range(20)]
                totals = await asyncio.gather(*(_acount(s) for s in streams))
                expect(totals == [100 + n for n in range(20)], f"concurrent counts {totals}")
                stream = c.Count(spb.CountRequest(count=2, fail_code=Code.ABORTED))
                try:
                    async for _ in stream:
                        pass
                    raise CheckFailed("no error")
                except RpcError as exc:
                    expect(exc.code == Code.ABORTED, repr(exc))
                early = c.Count(spb.CountRequest(count=100_000, size=16))
                first = await early.recv()
                expect(first is not None and first.seq == 0, "first item")
                early.cancel()
                unary = InteropClient(conn)
                expect((await unary.Echo(pb.EchoRequest(text="x"))).text == "x", "unary after")

        asyncio.run(asyncio.wait_for(main(), CHECK_TIMEOUT))

    return {
        "stream/blocking-every-kind": blocking_kinds,
        "stream/blocking-empty-messages-and-errors": blocking_empty_and_errors,
        "stream/blocking-concurrent-streams": blocking_concurrent,
        "stream/aio-every-kind-concurrent-early-close": aio_kinds,
        **raw_stream_checks(address),
    }


async def _acount(stream: Any) -> int:
    return len([i async for i in stream])


def raw_stream_checks(address: str) -> dict[str, Callable[[], None]]:
    """Hand-built frames, byte by byte from the ttrpc 1.2 rules, and the exact frames back."""

    def header(length: int, stream_id: int, mtype: int, flags: int) -> bytes:
        return length.to_bytes(4, "big") + stream_id.to_bytes(4, "big") + bytes([mtype, flags])

    def request(method: str, payload: bytes | None) -> bytes:
        r = Request(service=STREAMING, method=method)
        if payload is not None:
            r.payload = payload
        return r.SerializeToString()

    def exchange(data: bytes, until: Callable[[list[Frame]], bool]) -> list[Frame]:
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(5)
        sock.connect(ttrpc.address.parse_unix_address(address))
        try:
            sock.sendall(data)
            reader = FrameReader()
            frames: list[Frame] = []
            while not until(frames):
                chunk = sock.recv(65536)
                expect(bool(chunk), f"connection closed after {len(frames)} frames")
                for frame in reader.feed(chunk):
                    assert isinstance(frame, Frame)
                    frames.append(frame)
            return frames
        finally:
            sock.close()

    def last_is_end(frames: list[Frame]) -> bool:
        return bool(frames) and frames[-1].type in (2, 3) and frames[-1].flags & 0x01 != 0

    item0 = spb.Item(seq=0).SerializeToString()  # empty: seq 0, no data
    item7 = spb.Item(seq=7, data=b"ab").SerializeToString()

    def server_streaming() -> None:
        body = request("Count", spb.CountRequest(count=2).SerializeToString())
        frames = exchange(header(len(body), 1, 1, 0x01) + body, last_is_end)
        # Two Data frames: item 0 (an empty message: length 0, flags 0), item 1; then the end.
        want = [
            (1, 3, 0x00, item0),
            (1, 3, 0x00, spb.Item(seq=1).SerializeToString()),
            (1, 3, 0x05, b""),
        ]
        got = [(f.stream_id, f.type, f.flags, f.payload) for f in frames]
        expect(got == want, f"frames {got}")

    def client_streaming() -> None:
        body = request("Sum", None)
        data = (
            header(len(body), 1, 1, 0x02) + body
            + header(len(item7), 1, 3, 0) + item7
            + header(0, 1, 3, 0)  # an empty message
            + header(0, 1, 3, 0x05)  # the client's close: its own empty frame
        )  # fmt: skip
        frames = exchange(data, lambda fs: bool(fs))
        expect([(f.stream_id, f.type, f.flags) for f in frames] == [(1, 2, 0)], f"{frames}")
        r = Response.FromString(frames[0].payload)
        expect(r.status.code == 0, f"status {r.status}")
        expect(spb.SumResponse.FromString(r.payload) == spb.SumResponse(count=2, bytes=2), f"{r}")

    def bidi() -> None:
        body = request("Echo", None)
        data = (
            header(len(body), 3, 1, 0x02) + body
            + header(len(item7), 3, 3, 0) + item7
            + header(0, 3, 3, 0x05)
        )  # fmt: skip
        frames = exchange(data, last_is_end)
        got = [(f.stream_id, f.type, f.flags, f.payload) for f in frames]
        expect(got == [(3, 3, 0, item7), (3, 3, 0x05, b"")], f"frames {got}")

    def server_streaming_error() -> None:
        body = request("Count", spb.CountRequest(count=1, fail_code=10).SerializeToString())
        frames = exchange(header(len(body), 1, 1, 0x01) + body, lambda fs: len(fs) == 2)
        expect([(f.type, f.flags) for f in frames] == [(3, 0), (2, 0)], f"{frames}")
        status = Response.FromString(frames[1].payload).status
        expect((status.code, status.message) == (10, "failed after 1"), f"{status}")

    def unknown_stream() -> None:
        frames = exchange(header(len(item7), 9, 3, 0) + item7, lambda fs: bool(fs))
        expect([(f.stream_id, f.type) for f in frames] == [(9, 2)], f"{frames}")
        status = Response.FromString(frames[0].payload).status
        expect(status.code == Code.INVALID_ARGUMENT, f"{status}")

    return {
        "stream-raw/server-streaming": server_streaming,
        "stream-raw/client-streaming": client_streaming,
        "stream-raw/bidi": bidi,
        "stream-raw/server-streaming-error": server_streaming_error,
        "stream-raw/data-for-unknown-stream": unknown_stream,
    }


def run_check(fn: Callable[[], None]) -> str | None:
    """None on success, else why it failed; every check is bounded by CHECK_TIMEOUT."""
    outcome: list[str | None] = []

    def target() -> None:
        try:
            fn()
            outcome.append(None)
        except CheckFailed as exc:
            outcome.append(str(exc))
        except BaseException as exc:
            outcome.append(f"unexpected {type(exc).__name__}: {exc}")

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(CHECK_TIMEOUT)
    return outcome[0] if outcome else f"timed out after {CHECK_TIMEOUT}s"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("address")
    parser.add_argument("-run", "--run", default="", help="only checks whose name contains this")
    parser.add_argument("--streams", action="store_true", help="add the Streaming checks")
    args = parser.parse_args()
    checks = {
        **blocking_checks(args.address),
        **aio_checks(args.address),
        **raw_checks(args.address),
    }
    if args.streams:
        checks.update(stream_checks(args.address))
    passed = failed = 0
    for name, fn in checks.items():
        if args.run and args.run not in name:
            continue
        why = run_check(fn)
        if why is None:
            passed += 1
            print(f"PASS {name}", flush=True)
        else:
            failed += 1
            print(f"FAIL {name}: {why}", flush=True)
    print(f"{passed} passed, {failed} failed", flush=True)
    return 0 if failed == 0 and passed > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
