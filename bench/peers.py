"""Benchmark peers for bench/run.py: one server, one Echo load generator or one stream
benchmark per process.

::

    python bench/peers.py server KIND SOCKET_PATH --gen GENDIR [--interceptors]
    python bench/peers.py client KIND SOCKET_PATH --gen GENDIR [--size N ...] [--interceptors]
    python bench/peers.py stream KIND SOCKET_PATH --gen GENDIR --stream-kind server|client|bidi
                                 [--count N] [--size N] [--repeats N]

KIND is ``aio``, ``uvloop``, ``blocking`` (ttrpc) or ``grpc-aio``, ``grpc-sync``.
GENDIR holds the code generated from tests/interop/interop.proto and
streaming.proto (run.py makes it). A server (Interop and Streaming) prints READY
once it listens and exits on SIGTERM/SIGINT. A client prints one JSON object (the
schema of bench/go/go-bench): one-call-in-flight latency, then calls/s per
in-flight level (median of --repeats runs), every phase bounded in calls and time.
``stream`` moves --count messages of --size bytes through one stream of the
given kind (Streaming.Count, Sum or Echo) --repeats times on one connection and
prints ``{"messages_per_s": median, "runs": [...]}``. ``--interceptors`` puts two
interceptors on a ttrpc server or client (a pass-through one and the logging one
with its records filtered out), to measure what the chain costs.

Each kind imports only its own libraries (asyncio too: with ssl it costs a
blocking server ~8 MiB), so a server's memory is its own.
``--cprofile FILE`` dumps a cProfile of the process (server: until it stops).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

KINDS = ("aio", "uvloop", "blocking", "grpc-aio", "grpc-sync")
ASYNC_KINDS = ("aio", "uvloop", "grpc-aio")


# -- servers -------------------------------------------------------------------


def _interceptors(enabled: bool) -> list[Any]:
    if not enabled:
        return []
    import logging

    from ttrpc.interceptors import Interceptor, LoggingInterceptor

    quiet = logging.getLogger("ttrpc.bench.calls")
    quiet.setLevel(logging.WARNING)  # the hook runs, its INFO records are filtered out
    return [Interceptor(), LoggingInterceptor(quiet)]


def _pattern(size: int) -> bytes:
    return (bytes(range(251)) * (size // 251 + 1))[:size]


def _ttrpc_streaming(asynchronous: bool) -> object:
    import streaming_pb2
    import streaming_ttrpc

    Item, SumResponse = streaming_pb2.Item, streaming_pb2.SumResponse

    class AsyncStreaming(streaming_ttrpc.StreamingService):  # type: ignore[misc]
        async def Count(self, request: Any, ctx: Any = None) -> Any:
            data = _pattern(request.size)
            for seq in range(request.count):
                yield Item(seq=seq, data=data)

        async def Sum(self, requests: Any, ctx: Any = None) -> Any:
            count = size = 0
            async for item in requests:
                count += 1
                size += len(item.data)
            return SumResponse(count=count, bytes=size)

        async def Echo(self, requests: Any, ctx: Any = None) -> Any:
            async for item in requests:
                yield item

    class BlockingStreaming(streaming_ttrpc.StreamingBlockingService):  # type: ignore[misc]
        def Count(self, request: Any, ctx: Any = None) -> Any:
            data = _pattern(request.size)
            for seq in range(request.count):
                yield Item(seq=seq, data=data)

        def Sum(self, requests: Any, ctx: Any = None) -> Any:
            count = size = 0
            for item in requests:
                count += 1
                size += len(item.data)
            return SumResponse(count=count, bytes=size)

        def Echo(self, requests: Any, ctx: Any = None) -> Any:
            yield from requests

    return AsyncStreaming() if asynchronous else BlockingStreaming()


def _grpc_streaming(asynchronous: bool) -> object:
    import streaming_pb2
    import streaming_pb2_grpc

    Item, SumResponse = streaming_pb2.Item, streaming_pb2.SumResponse

    class AsyncStreaming(streaming_pb2_grpc.StreamingServicer):  # type: ignore[misc]
        async def Count(self, request: Any, context: Any) -> Any:
            data = _pattern(request.size)
            for seq in range(request.count):
                yield Item(seq=seq, data=data)

        async def Sum(self, request_iterator: Any, context: Any) -> Any:
            count = size = 0
            async for item in request_iterator:
                count += 1
                size += len(item.data)
            return SumResponse(count=count, bytes=size)

        async def Echo(self, request_iterator: Any, context: Any) -> Any:
            async for item in request_iterator:
                yield item

    class SyncStreaming(streaming_pb2_grpc.StreamingServicer):  # type: ignore[misc]
        def Count(self, request: Any, context: Any) -> Any:
            data = _pattern(request.size)
            for seq in range(request.count):
                yield Item(seq=seq, data=data)

        def Sum(self, request_iterator: Any, context: Any) -> Any:
            count = size = 0
            for item in request_iterator:
                count += 1
                size += len(item.data)
            return SumResponse(count=count, bytes=size)

        def Echo(self, request_iterator: Any, context: Any) -> Any:
            yield from request_iterator

    return AsyncStreaming() if asynchronous else SyncStreaming()


def _ttrpc_service(asynchronous: bool) -> object:
    import interop_pb2
    import interop_ttrpc

    from ttrpc import Context

    response = interop_pb2.EchoResponse

    class AsyncEcho(interop_ttrpc.InteropService):  # type: ignore[misc]
        async def Echo(self, request: Any, ctx: Context | None = None) -> Any:
            return response(data=request.data, text=request.text, number=request.number)

    class BlockingEcho(interop_ttrpc.InteropBlockingService):  # type: ignore[misc]
        def Echo(self, request: Any, ctx: Context | None = None) -> Any:
            return response(data=request.data, text=request.text, number=request.number)

    return AsyncEcho() if asynchronous else BlockingEcho()


def _grpc_servicer(asynchronous: bool) -> object:
    import interop_pb2
    import interop_pb2_grpc

    response = interop_pb2.EchoResponse

    class AsyncEcho(interop_pb2_grpc.InteropServicer):  # type: ignore[misc]
        async def Echo(self, request: Any, context: Any) -> Any:
            return response(data=request.data, text=request.text, number=request.number)

    class SyncEcho(interop_pb2_grpc.InteropServicer):  # type: ignore[misc]
        def Echo(self, request: Any, context: Any) -> Any:
            return response(data=request.data, text=request.text, number=request.number)

    return AsyncEcho() if asynchronous else SyncEcho()


def _ready() -> None:
    sys.stdout.write("READY\n")
    sys.stdout.flush()


async def _serve_async(kind: str, path: str) -> None:
    import asyncio

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if kind == "grpc-aio":
        import grpc
        import interop_pb2_grpc
        import streaming_pb2_grpc

        gserver = grpc.aio.server()
        interop_pb2_grpc.add_InteropServicer_to_server(_grpc_servicer(True), gserver)
        streaming_pb2_grpc.add_StreamingServicer_to_server(_grpc_streaming(True), gserver)
        gserver.add_insecure_port(f"unix:{path}")
        await gserver.start()
        _ready()
        await stop.wait()
        await gserver.stop(1)
        return
    import ttrpc.aio

    server = ttrpc.aio.Server(interceptors=_interceptors(INTERCEPTORS))
    server.register(_ttrpc_service(True))  # type: ignore[arg-type]
    server.register(_ttrpc_streaming(True))  # type: ignore[arg-type]
    await server.start(f"unix://{path}")
    _ready()
    await stop.wait()
    await server.shutdown(timeout=1)


def _serve_threaded(kind: str, path: str) -> None:
    # Handler threads inherit the mask: only this thread takes the stop signal, in sigwait.
    signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    if kind == "grpc-sync":
        from concurrent.futures import ThreadPoolExecutor

        import grpc
        import interop_pb2_grpc
        import streaming_pb2_grpc

        gserver = grpc.server(ThreadPoolExecutor(max_workers=64))
        interop_pb2_grpc.add_InteropServicer_to_server(_grpc_servicer(False), gserver)
        streaming_pb2_grpc.add_StreamingServicer_to_server(_grpc_streaming(False), gserver)
        gserver.add_insecure_port(f"unix:{path}")
        gserver.start()
        _ready()
        signal.sigwait(signals)
        gserver.stop(1).wait(5)
        return
    import ttrpc.blocking

    server = ttrpc.blocking.Server(max_workers=64, interceptors=_interceptors(INTERCEPTORS))
    server.register(_ttrpc_service(False))  # type: ignore[arg-type]
    server.register(_ttrpc_streaming(False))  # type: ignore[arg-type]
    server.start(f"unix://{path}")
    _ready()
    signal.sigwait(signals)
    server.shutdown(timeout=1)


def serve(kind: str, path: str) -> None:
    if kind == "uvloop":
        import uvloop

        uvloop.run(_serve_async(kind, path))
    elif kind in ASYNC_KINDS:
        import asyncio

        asyncio.run(_serve_async(kind, path))
    else:
        _serve_threaded(kind, path)


# -- clients -------------------------------------------------------------------


class Plan:
    """What a client measures; every phase stops at its call count or its time bound."""

    def __init__(self, ns: argparse.Namespace) -> None:
        self.size: int = ns.size
        self.warmup: int = ns.warmup
        self.lat_calls: int = ns.lat_calls
        self.lat_seconds: float = ns.lat_seconds
        self.inflight: list[int] = [int(x) for x in ns.inflight.split(",") if x]
        self.duration: float = ns.duration
        self.repeats: int = max(1, ns.repeats)
        self.max_calls: int = ns.max_calls


def _latency(samples: list[int]) -> dict[str, float]:
    samples.sort()
    n = len(samples)
    return {
        "calls": n,
        "p50_us": samples[int(0.50 * (n - 1))] / 1e3,
        "p99_us": samples[int(0.99 * (n - 1))] / 1e3,
        "mean_us": sum(samples) / n / 1e3,
    }


def _level(inflight: int, calls: int, seconds: float) -> dict[str, Any]:
    return {
        "inflight": inflight,
        "calls": calls,
        "seconds": seconds,
        "calls_per_s": calls / seconds if seconds > 0 else 0.0,
    }


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median rate, plus every run's rate."""
    ordered = sorted(runs, key=lambda r: r["calls_per_s"])
    return {**ordered[(len(ordered) - 1) // 2], "runs": [r["calls_per_s"] for r in runs]}


async def _measure_async(call: Callable[[], Awaitable[None]], plan: Plan) -> dict[str, Any]:
    import asyncio

    result: dict[str, Any] = {"throughput": []}
    clock = time.perf_counter_ns
    if plan.lat_calls > 0:
        for _ in range(plan.warmup):
            await call()
        samples: list[int] = []
        stop = time.monotonic() + plan.lat_seconds
        for _ in range(plan.lat_calls):
            t0 = clock()
            await call()
            samples.append(clock() - t0)
            if time.monotonic() > stop:
                break
        result["latency"] = _latency(samples)

    async def level(inflight: int, seconds: float, max_calls: int) -> dict[str, Any]:
        counter = itertools.count()
        stop = time.monotonic() + seconds
        done = 0

        async def worker() -> None:
            nonlocal done
            while next(counter) < max_calls and time.monotonic() < stop:
                await call()
                done += 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(inflight)))
        return _level(inflight, done, time.perf_counter() - start)

    for inflight in plan.inflight:
        if plan.warmup:
            await level(inflight, min(0.2, plan.duration / 2), plan.warmup)
        runs = [await level(inflight, plan.duration, plan.max_calls) for _ in range(plan.repeats)]
        result["throughput"].append(_median_run(runs))
    return result


def _measure_threaded(call: Callable[[], None], plan: Plan) -> dict[str, Any]:
    result: dict[str, Any] = {"throughput": []}
    clock = time.perf_counter_ns
    if plan.lat_calls > 0:
        for _ in range(plan.warmup):
            call()
        samples: list[int] = []
        stop = time.monotonic() + plan.lat_seconds
        for _ in range(plan.lat_calls):
            t0 = clock()
            call()
            samples.append(clock() - t0)
            if time.monotonic() > stop:
                break
        result["latency"] = _latency(samples)

    def level(inflight: int, seconds: float, max_calls: int) -> dict[str, Any]:
        counter = itertools.count()  # next() is atomic under the GIL
        stop = time.monotonic() + seconds
        done = [0] * inflight
        errors: list[BaseException] = []

        def worker(i: int) -> None:
            n = 0
            try:
                while next(counter) < max_calls and time.monotonic() < stop:
                    call()
                    n += 1
            except BaseException as exc:
                errors.append(exc)
            done[i] = n

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(inflight)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
        if errors:
            raise errors[0]
        return _level(inflight, sum(done), elapsed)

    for inflight in plan.inflight:
        if plan.warmup:
            level(inflight, min(0.2, plan.duration / 2), plan.warmup)
        runs = [level(inflight, plan.duration, plan.max_calls) for _ in range(plan.repeats)]
        result["throughput"].append(_median_run(runs))
    return result


def _check(size: int) -> Callable[[Any], None]:
    def check(response: Any) -> None:
        if len(response.data) != size:
            raise RuntimeError(f"echo returned {len(response.data)} bytes, sent {size}")

    return check


async def _run_async_client(kind: str, path: str, plan: Plan) -> dict[str, Any]:
    import asyncio

    import interop_pb2

    request = interop_pb2.EchoRequest(data=b"x" * plan.size)
    check = _check(plan.size)
    if kind == "grpc-aio":
        import grpc
        import interop_pb2_grpc

        async with grpc.aio.insecure_channel(f"unix:{path}") as channel:
            await asyncio.wait_for(channel.channel_ready(), 10)
            gstub = interop_pb2_grpc.InteropStub(channel)

            async def gcall() -> None:
                check(await gstub.Echo(request))

            return await _measure_async(gcall, plan)
    import interop_ttrpc

    import ttrpc.aio

    client = await ttrpc.aio.connect(
        f"unix://{path}", timeout=10, interceptors=_interceptors(INTERCEPTORS)
    )
    try:
        stub = interop_ttrpc.InteropClient(client)

        async def call() -> None:
            check(await stub.Echo(request))

        return await _measure_async(call, plan)
    finally:
        await client.close()


def _run_threaded_client(kind: str, path: str, plan: Plan) -> dict[str, Any]:
    import interop_pb2

    request = interop_pb2.EchoRequest(data=b"x" * plan.size)
    check = _check(plan.size)
    if kind == "grpc-sync":
        import grpc
        import interop_pb2_grpc

        with grpc.insecure_channel(f"unix:{path}") as channel:
            grpc.channel_ready_future(channel).result(timeout=10)
            gstub = interop_pb2_grpc.InteropStub(channel)

            def gcall() -> None:
                check(gstub.Echo(request))

            return _measure_threaded(gcall, plan)
    import interop_ttrpc

    import ttrpc.blocking

    with ttrpc.blocking.connect(
        f"unix://{path}", timeout=10, interceptors=_interceptors(INTERCEPTORS)
    ) as client:
        stub = interop_ttrpc.InteropBlockingClient(client)

        def call() -> None:
            check(stub.Echo(request))

        return _measure_threaded(call, plan)


def run_client(kind: str, path: str, plan: Plan) -> dict[str, Any]:
    if kind == "uvloop":
        import uvloop

        return uvloop.run(_run_async_client(kind, path, plan))
    if kind in ASYNC_KINDS:
        import asyncio

        return asyncio.run(_run_async_client(kind, path, plan))
    return _run_threaded_client(kind, path, plan)


# -- streams -------------------------------------------------------------------


def _stream_result(runs: list[float], count: int) -> dict[str, Any]:
    rates = [count / s for s in runs]
    return {
        "count": count,
        "runs": rates,
        "messages_per_s": sorted(rates)[(len(rates) - 1) // 2],
    }


def _check_count(got: int, want: int) -> None:
    if got != want:
        raise RuntimeError(f"stream moved {got} messages, expected {want}")


async def _run_async_stream(kind: str, path: str, ns: argparse.Namespace) -> dict[str, Any]:
    import asyncio

    import streaming_pb2

    count, size, skind = ns.count, ns.size, ns.stream_kind
    item = streaming_pb2.Item(data=b"x" * size)
    request = streaming_pb2.CountRequest(count=count, size=size)

    def items() -> Any:
        return (item for _ in range(count))

    if kind == "grpc-aio":
        import grpc
        import streaming_pb2_grpc

        channel = grpc.aio.insecure_channel(f"unix:{path}")
        await asyncio.wait_for(channel.channel_ready(), 10)
        gstub = streaming_pb2_grpc.StreamingStub(channel)

        async def gonce() -> None:
            if skind == "server":
                n = 0
                async for _ in gstub.Count(request):
                    n += 1
                _check_count(n, count)
            elif skind == "client":
                _check_count((await gstub.Sum(items())).count, count)
            else:
                n = 0
                async for _ in gstub.Echo(items()):
                    n += 1
                _check_count(n, count)

        try:
            return _stream_result([await _timed_async(gonce) for _ in range(ns.repeats)], count)
        finally:
            await channel.close()
    import streaming_ttrpc

    import ttrpc.aio

    client = await ttrpc.aio.connect(
        f"unix://{path}", timeout=10, interceptors=_interceptors(INTERCEPTORS)
    )
    stub = streaming_ttrpc.StreamingClient(client)

    async def once() -> None:
        if skind == "server":
            n = 0
            async for _ in stub.Count(request):
                n += 1
            _check_count(n, count)
        elif skind == "client":
            _check_count((await stub.Sum(items())).count, count)
        else:
            n = 0
            async for _ in stub.Echo(items()):
                n += 1
            _check_count(n, count)

    try:
        return _stream_result([await _timed_async(once) for _ in range(ns.repeats)], count)
    finally:
        await client.close()


async def _timed_async(fn: Callable[[], Awaitable[None]]) -> float:
    start = time.perf_counter()
    await fn()
    return time.perf_counter() - start


def _timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _run_threaded_stream(kind: str, path: str, ns: argparse.Namespace) -> dict[str, Any]:
    import streaming_pb2

    count, size, skind = ns.count, ns.size, ns.stream_kind
    item = streaming_pb2.Item(data=b"x" * size)
    request = streaming_pb2.CountRequest(count=count, size=size)

    def items() -> Any:
        return (item for _ in range(count))

    if kind == "grpc-sync":
        import grpc
        import streaming_pb2_grpc

        with grpc.insecure_channel(f"unix:{path}") as channel:
            grpc.channel_ready_future(channel).result(timeout=10)
            gstub = streaming_pb2_grpc.StreamingStub(channel)

            def gonce() -> None:
                if skind == "server":
                    _check_count(sum(1 for _ in gstub.Count(request)), count)
                elif skind == "client":
                    _check_count(gstub.Sum(items()).count, count)
                else:
                    _check_count(sum(1 for _ in gstub.Echo(items())), count)

            return _stream_result([_timed(gonce) for _ in range(ns.repeats)], count)
    import streaming_ttrpc

    import ttrpc.blocking

    with ttrpc.blocking.connect(
        f"unix://{path}", timeout=10, interceptors=_interceptors(INTERCEPTORS)
    ) as client:
        stub = streaming_ttrpc.StreamingBlockingClient(client)

        def once() -> None:
            if skind == "server":
                _check_count(sum(1 for _ in stub.Count(request)), count)
            elif skind == "client":
                _check_count(stub.Sum(items()).count, count)
            else:
                _check_count(sum(1 for _ in stub.Echo(items())), count)

        return _stream_result([_timed(once) for _ in range(ns.repeats)], count)


def run_stream(kind: str, path: str, ns: argparse.Namespace) -> dict[str, Any]:
    if kind == "uvloop":
        import uvloop

        return uvloop.run(_run_async_stream(kind, path, ns))
    if kind in ASYNC_KINDS:
        import asyncio

        return asyncio.run(_run_async_stream(kind, path, ns))
    return _run_threaded_stream(kind, path, ns)


# -- command line --------------------------------------------------------------

INTERCEPTORS = False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("role", choices=("server", "client", "stream"))
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("path", help="unix socket path")
    parser.add_argument("--gen", required=True, help="directory of the generated interop code")
    parser.add_argument("--size", type=int, default=16, help="EchoRequest.data bytes")
    parser.add_argument("--warmup", type=int, default=1000, help="warmup calls per phase")
    parser.add_argument("--lat-calls", type=int, default=10000, help="latency calls (0: skip)")
    parser.add_argument("--lat-seconds", type=float, default=30.0, help="latency time bound")
    parser.add_argument("--inflight", default="1,8,64", help="comma-separated in-flight levels")
    parser.add_argument("--duration", type=float, default=1.0, help="seconds per level run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per level (median kept)")
    parser.add_argument("--max-calls", type=int, default=1_000_000, help="calls bound per run")
    parser.add_argument("--cprofile", help="write a cProfile of this process to FILE")
    parser.add_argument("--interceptors", action="store_true", help="two ttrpc interceptors")
    parser.add_argument("--stream-kind", choices=("server", "client", "bidi"), default="server")
    parser.add_argument("--count", type=int, default=100_000, help="messages per stream")
    ns = parser.parse_args(argv)
    sys.path.insert(0, os.path.abspath(ns.gen))
    global INTERCEPTORS
    INTERCEPTORS = ns.interceptors

    profiler = None
    if ns.cprofile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    try:
        if ns.role == "server":
            serve(ns.kind, ns.path)
        elif ns.role == "stream":
            sys.stdout.write(json.dumps(run_stream(ns.kind, ns.path, ns)) + "\n")
        else:
            result = run_client(ns.kind, ns.path, Plan(ns))
            sys.stdout.write(json.dumps(result) + "\n")
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(ns.cprofile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
