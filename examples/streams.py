"""Streams of every kind, interceptors and a reconnecting client, in one runnable file.

    python examples/streams.py            # asyncio server and client
    python examples/streams.py --blocking # the blocking ones

No code generation here: the service is described by hand with protobuf's
``StringValue`` (generated services look the same, with typed methods; see
docs/streaming.md). Server and client run in this process, on a socket in a
temporary directory.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import tempfile
from collections.abc import AsyncIterator, Iterator

from google.protobuf.wrappers_pb2 import StringValue as S

import ttrpc
import ttrpc.aio
import ttrpc.blocking
from ttrpc import Context, Method, Service
from ttrpc.interceptors import CallInfo, Interceptor, LoggingInterceptor

NAME = "example.v1.Words"


class RequestId(Interceptor):
    """Client side: stamps every call with a request id (changing metadata before it goes out)."""

    def __init__(self) -> None:
        self.next = 0

    def _stamp(self, ctx: Context) -> None:
        self.next += 1
        ctx.metadata.set("x-request-id", f"req-{self.next}")

    async def client_unary(self, request, ctx, info: CallInfo, call_next):  # type: ignore[no-untyped-def]
        self._stamp(ctx)
        return await call_next(request, ctx)

    def client_stream(self, request, ctx, info: CallInfo, call_next):  # type: ignore[no-untyped-def]
        self._stamp(ctx)
        return call_next(request, ctx)

    blocking_client_stream = client_stream

    def blocking_client_unary(self, request, ctx, info: CallInfo, call_next):  # type: ignore[no-untyped-def]
        self._stamp(ctx)
        return call_next(request, ctx)


# -- asyncio ---------------------------------------------------------------------------


def async_words() -> Service:
    async def upper(request: S, ctx: Context) -> S:  # unary
        return S(value=request.value.upper())

    async def spell(request: S, ctx: Context) -> AsyncIterator[S]:  # server-streaming
        for letter in request.value:
            yield S(value=letter)

    async def join(requests: AsyncIterator[S], ctx: Context) -> S:  # client-streaming
        return S(value=" ".join([r.value async for r in requests]))

    async def shout(requests: AsyncIterator[S], ctx: Context) -> AsyncIterator[S]:  # bidi
        async for r in requests:
            yield S(value=r.value.upper() + "!")

    return _service(upper, spell, join, shout)


async def run_async(address: str) -> None:
    logging_icpt = LoggingInterceptor(metadata_keys=["x-request-id"])
    server = ttrpc.aio.Server(interceptors=[logging_icpt])
    server.register(async_words())
    await server.start(address)
    client = ttrpc.aio.ReconnectingClient(address, interceptors=[RequestId()])
    try:
        print((await client.call(NAME, "Upper", S(value="hello"), S)).value)
        print([m.value async for m in client.server_stream(NAME, "Spell", S(value="ttrpc"), S)])
        words = [S(value=w) for w in ("streams", "are", "here")]
        print((await client.client_stream(NAME, "Join", words, S)).value)
        chat = client.bidi_stream(NAME, "Shout", None, S)
        for word in ("one", "two"):
            await chat.send(S(value=word))
            print((await chat.recv()).value)  # type: ignore[union-attr]
        await chat.close_send()
        assert await chat.recv() is None
    finally:
        await client.close()
        await server.shutdown(timeout=2)


# -- blocking --------------------------------------------------------------------------


def blocking_words() -> Service:
    def upper(request: S, ctx: Context) -> S:
        return S(value=request.value.upper())

    def spell(request: S, ctx: Context) -> Iterator[S]:
        for letter in request.value:
            yield S(value=letter)

    def join(requests: Iterator[S], ctx: Context) -> S:
        return S(value=" ".join(r.value for r in requests))

    def shout(requests: Iterator[S], ctx: Context) -> Iterator[S]:
        for r in requests:
            yield S(value=r.value.upper() + "!")

    return _service(upper, spell, join, shout)


def run_blocking(address: str) -> None:
    with ttrpc.blocking.Server(interceptors=[LoggingInterceptor()]) as server:
        server.register(blocking_words())
        server.start(address)
        with ttrpc.blocking.ReconnectingClient(address, interceptors=[RequestId()]) as client:
            print(client.call(NAME, "Upper", S(value="hello"), S).value)
            print([m.value for m in client.server_stream(NAME, "Spell", S(value="ttrpc"), S)])
            words = [S(value=w) for w in ("streams", "are", "here")]
            print(client.client_stream(NAME, "Join", words, S).value)
            print([m.value for m in client.bidi_stream(NAME, "Shout", words, S)])


def _service(upper: object, spell: object, join: object, shout: object) -> Service:
    return Service(
        NAME,
        {
            "Upper": Method("Upper", S, S, upper),  # type: ignore[arg-type]
            "Spell": Method("Spell", S, S, spell, server_streaming=True),  # type: ignore[arg-type]
            "Join": Method("Join", S, S, join, client_streaming=True),  # type: ignore[arg-type]
            "Shout": Method(
                "Shout",
                S,
                S,
                shout,  # type: ignore[arg-type]
                client_streaming=True,
                server_streaming=True,
            ),
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocking", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        address = "unix://" + os.path.join(tmp, "words.sock")
        if args.blocking:
            run_blocking(address)
        else:
            asyncio.run(run_async(address))


if __name__ == "__main__":
    main()
