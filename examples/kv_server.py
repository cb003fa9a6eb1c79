"""The key-value store served with ttrpc's asyncio server.

    python examples/kv_server.py unix:///tmp/kv.sock

Prints ``READY`` once listening; shuts down gracefully on SIGTERM.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import kvstore_pb2 as kv
from kvstore_ttrpc import KeyValueStoreService

import ttrpc
import ttrpc.aio


class Store(KeyValueStoreService):
    def __init__(self) -> None:
        self._data: dict[str, bytes] = {}

    async def Put(self, request: kv.PutRequest, ctx: ttrpc.Context | None = None) -> kv.PutResponse:
        if not request.key:
            raise ttrpc.RpcError(ttrpc.Code.INVALID_ARGUMENT, "key must not be empty")
        replaced = request.key in self._data
        self._data[request.key] = request.value
        return kv.PutResponse(replaced=replaced)

    async def Get(self, request: kv.GetRequest, ctx: ttrpc.Context | None = None) -> kv.GetResponse:
        try:
            return kv.GetResponse(value=self._data[request.key])
        except KeyError:
            raise ttrpc.RpcError(ttrpc.Code.NOT_FOUND, f"no key {request.key!r}") from None

    async def Compact(
        self, request: kv.CompactRequest, ctx: ttrpc.Context | None = None
    ) -> kv.CompactResponse:
        # The server cancels this at the caller's deadline and answers DEADLINE_EXCEEDED.
        await asyncio.sleep(request.seconds)
        return kv.CompactResponse(keys=len(self._data))

    async def WhoAmI(
        self, request: kv.WhoAmIRequest, ctx: ttrpc.Context | None = None
    ) -> kv.WhoAmIResponse:
        assert ctx is not None
        remaining = ctx.time_remaining()
        return kv.WhoAmIResponse(
            metadata={k: ",".join(v) for k, v in ctx.metadata.items()},
            deadline_seconds=remaining or 0.0,
            pid=ctx.peer.pid if ctx.peer else 0,
            uid=ctx.peer.uid if ctx.peer else -1,
        )


async def main(address: str) -> None:
    server = ttrpc.aio.Server(handshake=ttrpc.require_same_user())
    server.register(Store())
    await server.start(address)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    print("READY", flush=True)
    await stop.wait()
    finished = await server.shutdown(timeout=5)
    print(f"server: shut down ({'graceful' if finished else 'forced'})", flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
