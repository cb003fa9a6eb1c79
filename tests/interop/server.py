"""Serve the Interop and Streaming services with ttrpc's servers, for conformance peers.

    python tests/interop/server.py ADDRESS [--require-same-user] [--blocking]

Serves with ``ttrpc.aio.Server``, or ``ttrpc.blocking.Server`` with
``--blocking``. Prints ``READY`` once listening; exits 0 on SIGTERM or SIGINT.
Streaming (streaming.proto) is ours only: Go ttrpc 1.1.1 has no streams.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import interop_pb2 as pb
import streaming_pb2 as spb
from google.protobuf.any_pb2 import Any
from interop_ttrpc import InteropBlockingService, InteropService
from streaming_ttrpc import StreamingBlockingService, StreamingService

import ttrpc
import ttrpc.aio
import ttrpc.blocking

FAIL_DETAIL_URL = "type.googleapis.com/ttrpc.interop.v1.FailDetail"


def echo(request: pb.EchoRequest) -> pb.EchoResponse:
    return pb.EchoResponse(data=request.data, text=request.text, number=request.number)


def fail(request: pb.FailRequest) -> ttrpc.RpcError:
    if request.code == 0:
        return ttrpc.RpcError(ttrpc.Code.INVALID_ARGUMENT, "Fail needs a non-zero code")
    details = [
        Any(type_url=FAIL_DETAIL_URL, value=pb.FailDetail(detail=d).SerializeToString())
        for d in request.details
    ]
    return ttrpc.RpcError(request.code, request.message, details)


def metadata(ctx: ttrpc.Context | None) -> pb.MetadataResponse:
    assert ctx is not None
    pairs = sorted(ctx.metadata.pairs(), key=lambda kv: kv[0].encode())
    remaining = ctx.time_remaining()
    return pb.MetadataResponse(
        pairs=[pb.KeyValue(key=k, value=v) for k, v in pairs],
        has_deadline=remaining is not None,
        deadline_remaining_ns=0 if remaining is None else max(0, int(remaining * 1e9)),
    )


def pattern(length: int) -> bytes:
    """data[i] = i % 251."""
    block = bytes(range(251))
    return (block * (length // 251 + 1))[:length]


# Our servers always enforce deadlines (they cancel the handler and answer
# DEADLINE_EXCEEDED), so Sleep's ignore_deadline cannot switch that off here.


class Interop(InteropService):
    """The semantics written next to each method in interop.proto, for the asyncio server."""

    async def Echo(
        self, request: pb.EchoRequest, ctx: ttrpc.Context | None = None
    ) -> pb.EchoResponse:
        return echo(request)

    async def Fail(
        self, request: pb.FailRequest, ctx: ttrpc.Context | None = None
    ) -> pb.FailResponse:
        raise fail(request)

    async def Sleep(
        self, request: pb.SleepRequest, ctx: ttrpc.Context | None = None
    ) -> pb.SleepResponse:
        # The server cancels this at the deadline.
        start = time.monotonic()
        await asyncio.sleep(request.duration_ms / 1000)
        return pb.SleepResponse(slept_ms=int((time.monotonic() - start) * 1000))

    async def Metadata(
        self, request: pb.MetadataRequest, ctx: ttrpc.Context | None = None
    ) -> pb.MetadataResponse:
        return metadata(ctx)

    async def Big(self, request: pb.BigRequest, ctx: ttrpc.Context | None = None) -> pb.BigResponse:
        return pb.BigResponse(data=pattern(request.length))


class BlockingInterop(InteropBlockingService):
    """The same, for the blocking server."""

    def Echo(self, request: pb.EchoRequest, ctx: ttrpc.Context | None = None) -> pb.EchoResponse:
        return echo(request)

    def Fail(self, request: pb.FailRequest, ctx: ttrpc.Context | None = None) -> pb.FailResponse:
        raise fail(request)

    def Sleep(self, request: pb.SleepRequest, ctx: ttrpc.Context | None = None) -> pb.SleepResponse:
        assert ctx is not None
        start = time.monotonic()
        end = start + request.duration_ms / 1000
        # A blocking handler cannot be interrupted: it works in slices and stops once cancelled.
        while not ctx.cancelled and (left := end - time.monotonic()) > 0:
            time.sleep(min(left, 0.01))
        return pb.SleepResponse(slept_ms=int((time.monotonic() - start) * 1000))

    def Metadata(
        self, request: pb.MetadataRequest, ctx: ttrpc.Context | None = None
    ) -> pb.MetadataResponse:
        return metadata(ctx)

    def Big(self, request: pb.BigRequest, ctx: ttrpc.Context | None = None) -> pb.BigResponse:
        return pb.BigResponse(data=pattern(request.length))


def item(seq: int, size: int) -> spb.Item:
    return spb.Item(seq=seq, data=pattern(size))


def count_failure(request: spb.CountRequest) -> ttrpc.RpcError:
    return ttrpc.RpcError(request.fail_code, f"failed after {request.count}")


class Streaming(StreamingService):
    """streaming.proto's semantics, for the asyncio server."""

    async def Count(
        self, request: spb.CountRequest, ctx: ttrpc.Context | None = None
    ) -> AsyncIterator[spb.Item]:
        for seq in range(request.count):
            yield item(seq, request.size)
        if request.fail_code:
            raise count_failure(request)

    async def Sum(
        self, requests: AsyncIterator[spb.Item], ctx: ttrpc.Context | None = None
    ) -> spb.SumResponse:
        count = size = 0
        async for received in requests:
            count += 1
            size += len(received.data)
        return spb.SumResponse(count=count, bytes=size)

    async def Echo(
        self, requests: AsyncIterator[spb.Item], ctx: ttrpc.Context | None = None
    ) -> AsyncIterator[spb.Item]:
        async for received in requests:
            yield received


class BlockingStreaming(StreamingBlockingService):
    """The same, for the blocking server."""

    def Count(
        self, request: spb.CountRequest, ctx: ttrpc.Context | None = None
    ) -> Iterator[spb.Item]:
        for seq in range(request.count):
            yield item(seq, request.size)
        if request.fail_code:
            raise count_failure(request)

    def Sum(
        self, requests: Iterator[spb.Item], ctx: ttrpc.Context | None = None
    ) -> spb.SumResponse:
        count = size = 0
        for received in requests:
            count += 1
            size += len(received.data)
        return spb.SumResponse(count=count, bytes=size)

    def Echo(
        self, requests: Iterator[spb.Item], ctx: ttrpc.Context | None = None
    ) -> Iterator[spb.Item]:
        yield from requests


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("address")
    parser.add_argument("--require-same-user", action="store_true")
    parser.add_argument("--blocking", action="store_true", help="use the blocking server")
    parser.add_argument("--max-connections", type=int, default=1024, help="connection limit")
    args = parser.parse_args()
    handshake = ttrpc.require_same_user() if args.require_same_user else None
    if args.blocking:
        serve_blocking(args.address, handshake, args.max_connections)
        return 0
    server = ttrpc.aio.Server(handshake=handshake, max_connections=args.max_connections)
    server.register(Interop())
    server.register(Streaming())
    await server.start(args.address)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("READY", flush=True)
    await stop.wait()
    await server.shutdown(timeout=2)
    return 0


def serve_blocking(
    address: str, handshake: ttrpc.handshake.Handshake | None, max_connections: int
) -> None:
    server = ttrpc.blocking.Server(handshake=handshake, max_connections=max_connections)
    server.register(BlockingInterop())
    server.register(BlockingStreaming())
    server.start(address)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print("READY", flush=True)
    while not stop.wait(3600):
        pass
    server.shutdown(timeout=2)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
