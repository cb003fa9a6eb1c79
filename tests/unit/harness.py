"""Run either server kind and drive either client kind from plain (synchronous) test code."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any, TypeVar

import ttrpc.aio
import ttrpc.blocking
from ttrpc import Code, Context, Method, RpcError, Service
from ttrpc.ttrpc_pb2 import KeyValue

T = TypeVar("T")
SERVICE = "test.v1.Test"
STREAMS = "test.v1.Streams"


class LoopThread:
    """An event loop in a background thread, for asyncio parts under synchronous tests."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


# -- the test service, written once for each server kind -------------------


def _reply(req: KeyValue, ctx: Context) -> KeyValue:
    remaining = ctx.time_remaining()
    return KeyValue(
        key=req.key,
        value=repr(
            (ctx.metadata.pairs(), None if remaining is None else round(remaining, 3), ctx.method)
        ),
    )


def _fail(req: KeyValue) -> None:
    if req.key == "rpc":
        raise RpcError(Code.FAILED_PRECONDITION, req.value)
    if req.key == "notfound":
        raise FileNotFoundError(req.value)
    raise RuntimeError(req.value)


def async_service(events: dict[str, threading.Event] | None = None) -> Service:
    async def echo(req: KeyValue, ctx: Context) -> KeyValue:
        return _reply(req, ctx)

    async def sleep(req: KeyValue, ctx: Context) -> KeyValue:
        await asyncio.sleep(float(req.value))
        return KeyValue(key="slept")

    async def fail(req: KeyValue, ctx: Context) -> KeyValue:
        _fail(req)
        return KeyValue()

    async def big(req: KeyValue, ctx: Context) -> KeyValue:
        return KeyValue(value="x" * int(req.value))

    async def wrong(req: KeyValue, ctx: Context) -> KeyValue:
        return "not a message"  # type: ignore[return-value]

    return _service(echo, sleep, fail, big, wrong)


def blocking_service() -> Service:
    def echo(req: KeyValue, ctx: Context) -> KeyValue:
        return _reply(req, ctx)

    def sleep(req: KeyValue, ctx: Context) -> KeyValue:
        end = time.monotonic() + float(req.value)
        while time.monotonic() < end and not ctx.cancelled:
            time.sleep(0.005)  # a handler doing work in slices, checking for cancellation
        return KeyValue(key="slept")

    def fail(req: KeyValue, ctx: Context) -> KeyValue:
        _fail(req)
        return KeyValue()

    def big(req: KeyValue, ctx: Context) -> KeyValue:
        return KeyValue(value="x" * int(req.value))

    def wrong(req: KeyValue, ctx: Context) -> KeyValue:
        return "not a message"  # type: ignore[return-value]

    return _service(echo, sleep, fail, big, wrong)


def _service(*handlers: Callable[..., Any]) -> Service:
    names = ["Echo", "Sleep", "Fail", "Big", "Wrong"]
    methods = {n: Method(n, KeyValue, KeyValue, h) for n, h in zip(names, handlers, strict=True)}
    return Service(SERVICE, methods)


# -- the streaming test service ------------------------------------------------
#
# Down (server-streaming): req.key = count, req.value = mode ("", "empty", "fail", "md",
#   "slow", "hold", "big": 64 KiB messages);
# Up (client-streaming): joins the keys, fails on a key "fail";
# Both (bidi): echoes keys upper-cased, ends early on "stop", fails on "fail";
# Hold (bidi): reads nothing until the call ends (a stalled consumer).


def _down_item(i: int, mode: str, ctx: Context) -> KeyValue:
    if mode == "empty":
        return KeyValue()
    if mode == "big":
        return KeyValue(key=str(i), value="x" * 65536)
    if mode == "md":
        remaining = ctx.time_remaining()
        return KeyValue(
            key=ctx.method,
            value=repr((ctx.metadata.pairs(), None if remaining is None else round(remaining, 1))),
        )
    return KeyValue(key=str(i))


def _up_reply(keys: list[str]) -> KeyValue:
    if "fail" in keys:
        raise RpcError(Code.FAILED_PRECONDITION, f"failed after {keys.index('fail')}")
    return KeyValue(key=",".join(keys), value=str(len(keys)))


def _both_item(req: KeyValue) -> KeyValue | None:
    if req.key == "fail":
        raise RpcError(Code.ABORTED, "asked to fail")
    if req.key == "stop":
        return None
    return KeyValue(key=req.key.upper(), value=req.value)


def async_stream_service() -> Service:
    async def down(req: KeyValue, ctx: Context) -> Any:
        for i in range(int(req.key or 0)):
            if req.value == "slow":
                await asyncio.sleep(0.05)
            yield _down_item(i, req.value, ctx)
        if req.value == "fail":
            raise RpcError(Code.ABORTED, "failed mid-stream")
        if req.value == "hold":
            await asyncio.sleep(30)

    async def up(reqs: Any, ctx: Context) -> KeyValue:
        return _up_reply([r.key async for r in reqs])

    async def both(reqs: Any, ctx: Context) -> Any:
        async for r in reqs:
            item = _both_item(r)
            if item is None:
                return
            yield item

    async def hold(reqs: Any, ctx: Context) -> Any:
        await asyncio.sleep(30)
        yield KeyValue()

    return _stream_service(down, up, both, hold)


def blocking_stream_service() -> Service:
    def down(req: KeyValue, ctx: Context) -> Any:
        for i in range(int(req.key or 0)):
            if req.value == "slow":
                time.sleep(0.05)
            yield _down_item(i, req.value, ctx)
        if req.value == "fail":
            raise RpcError(Code.ABORTED, "failed mid-stream")
        if req.value == "hold":
            end = time.monotonic() + 30
            while not ctx.cancelled and time.monotonic() < end:
                time.sleep(0.01)

    def up(reqs: Any, ctx: Context) -> KeyValue:
        return _up_reply([r.key for r in reqs])

    def both(reqs: Any, ctx: Context) -> Any:
        for r in reqs:
            item = _both_item(r)
            if item is None:
                return
            yield item

    def hold(reqs: Any, ctx: Context) -> Any:
        end = time.monotonic() + 30
        while not ctx.cancelled and time.monotonic() < end:
            time.sleep(0.01)
        yield KeyValue()

    return _stream_service(down, up, both, hold)


def _stream_service(*handlers: Callable[..., Any]) -> Service:
    kinds = {"Down": (False, True), "Up": (True, False), "Both": (True, True), "Hold": (True, True)}
    methods = {
        name: Method(name, KeyValue, KeyValue, h, client_streaming=c, server_streaming=s)
        for (name, (c, s)), h in zip(kinds.items(), handlers, strict=True)
    }
    return Service(STREAMS, methods)


# -- servers ----------------------------------------------------------------


class RunningServer:
    def __init__(self, kind: str, loop: LoopThread | None, server: Any) -> None:
        self.kind = kind
        self.loop = loop
        self.server = server

    def shutdown(self, timeout: float | None) -> bool:
        if self.loop is not None:
            return bool(self.loop.run(self.server.shutdown(timeout)))
        return bool(self.server.shutdown(timeout))

    def close(self) -> None:
        if self.loop is not None:
            self.loop.run(self.server.close())
        else:
            self.server.close()


@contextmanager
def running_server(kind: str, listener: Any, **options: Any) -> Iterator[RunningServer]:
    if kind == "aio":
        loop = LoopThread()

        async def start() -> ttrpc.aio.Server:
            server = ttrpc.aio.Server(**options)
            server.register(async_service())
            server.register(async_stream_service())
            await server.start(listener)
            return server

        running = RunningServer(kind, loop, loop.run(start()))
        try:
            yield running
        finally:
            running.close()
            loop.stop()
    else:
        server = ttrpc.blocking.Server(**options)
        server.register(blocking_service())
        server.register(blocking_stream_service())
        server.start(listener)
        running = RunningServer(kind, None, server)
        try:
            yield running
        finally:
            running.close()


# -- clients ------------------------------------------------------------------


class SyncCaller:
    """One client connection of either kind, called synchronously."""

    def __init__(self, kind: str, address: Any, **options: Any) -> None:
        self.kind = kind
        self.loop: LoopThread | None = None
        if kind == "aio":
            self.loop = LoopThread()
            self.client: Any = self.loop.run(ttrpc.aio.connect(address, **options))
        else:
            self.client = ttrpc.blocking.connect(address, **options)

    def call(
        self, method: str, req: KeyValue, ctx: Context | None = None, service: str = SERVICE
    ) -> KeyValue:
        if self.loop is not None:
            return self.loop.run(self.client.call(service, method, req, KeyValue, ctx))
        result: KeyValue = self.client.call(service, method, req, KeyValue, ctx)
        return result

    def submit(self, method: str, req: KeyValue, ctx: Context | None = None) -> Future[KeyValue]:
        """Start a call without waiting for it."""
        if self.loop is not None:
            return self.loop.submit(self.client.call(SERVICE, method, req, KeyValue, ctx))
        future: Future[KeyValue] = Future()

        def run() -> None:
            try:
                future.set_result(self.client.call(SERVICE, method, req, KeyValue, ctx))
            except BaseException as exc:
                future.set_exception(exc)

        threading.Thread(target=run, daemon=True).start()
        return future

    def close(self) -> None:
        if self.loop is not None:
            self.loop.run(self.client.close())
            self.loop.stop()
        else:
            self.client.close()
