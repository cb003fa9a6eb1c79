"""A client that redials its server when the connection is lost (asyncio)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Sequence
from typing import Any

from google.protobuf.message import Message

from ttrpc._backoff import Backoff
from ttrpc.aio.client import STREAM_STALL_TIMEOUT, Client, ClientStream, connect
from ttrpc.context import Context
from ttrpc.interceptors import CallInfo, Interceptor, check_interceptors
from ttrpc.protocol import MAX_MESSAGE_LENGTH, STREAM_BUFFER_SIZE
from ttrpc.status import Code, RpcError

__all__ = ["ReconnectingClient"]


class ReconnectingClient(Client):
    """A :class:`Client` for long-lived callers: it dials on first use and redials after
    the connection is lost, with exponential backoff.

    While the server is unreachable calls fail fast with UNAVAILABLE (no waiting,
    no dial) until the backoff allows the next attempt, which the next call makes.
    Calls in flight when a connection drops fail with
    :class:`~ttrpc.ConnectionClosed` and are not retried (they may have run).
    It stands in for a :class:`Client` everywhere, generated clients included;
    ``interceptors`` run once per call, whatever connection carries it.

    ::

        client = ttrpc.aio.ReconnectingClient("unix:///run/agent.sock")
        tasks = TaskClient(client)
        ...
        await client.close()
    """

    def __init__(
        self,
        address: str,
        *,
        backoff: Backoff | None = None,
        connect_timeout: float | None = 5.0,
        max_message_length: int = MAX_MESSAGE_LENGTH,
        interceptors: Sequence[Interceptor] | None = None,
        stream_buffer_size: int = STREAM_BUFFER_SIZE,
        stream_stall_timeout: float = STREAM_STALL_TIMEOUT,
    ) -> None:
        # Not Client.__init__: this object owns no connection itself.
        self.address = address
        self.backoff = backoff or Backoff()
        self._connect_timeout = connect_timeout
        self._options: dict[str, Any] = {
            "max_message_length": max_message_length,
            "stream_buffer_size": stream_buffer_size,
            "stream_stall_timeout": stream_stall_timeout,
        }
        self._interceptors = check_interceptors(interceptors)
        self._chains: dict[tuple[str, str, type[Message]], Any] = {}
        self._loop = asyncio.get_running_loop()
        self._current: Client | None = None
        self._dialing: asyncio.Task[Client] | None = None
        self._closed_for_good = False
        self.connects = 0  # successful dials so far

    async def _connection(self) -> Client:
        if self._closed_for_good:
            raise RpcError(Code.UNAVAILABLE, "ttrpc: client closed")
        current = self._current
        if current is not None and not current.closed:
            return current
        dialing = self._dialing
        if dialing is None:
            self.backoff.check(self.address)  # fail fast while the server is down
            dialing = self._dialing = self._loop.create_task(self._dial())
            dialing.add_done_callback(self._dialed)
        return await asyncio.shield(dialing)

    async def _dial(self) -> Client:
        try:
            client = await connect(self.address, timeout=self._connect_timeout, **self._options)
        except (OSError, asyncio.TimeoutError) as exc:
            self.backoff.failed(exc)
            raise RpcError(
                Code.UNAVAILABLE, f"ttrpc: cannot connect to {self.address}: {exc or 'timed out'}"
            ) from None
        self.backoff.succeeded()
        self.connects += 1
        if self._closed_for_good:
            await client.close()
            raise RpcError(Code.UNAVAILABLE, "ttrpc: client closed")
        self._current = client
        return client

    def _dialed(self, task: asyncio.Task[Client]) -> None:
        self._dialing = None
        if not task.cancelled():
            task.exception()  # retrieved here, so an unawaited failure is not reported

    async def connect(self) -> None:
        """Dial now (if not connected); raises UNAVAILABLE when that fails."""
        await self._connection()

    async def _call(
        self,
        service: str,
        method: str,
        request: Message,
        ctx: Context | None,
        *,
        response_type: Any,
    ) -> Any:
        client = await self._connection()
        return await client._call(service, method, request, ctx, response_type=response_type)

    def _open_stream(
        self,
        info: CallInfo,
        response_type: Any,
        request: Message | None,
        ctx: Context | None,
    ) -> ClientStream[Any]:
        current = self._current
        if current is None or current.closed:
            # Opening a stream does not wait, so it cannot dial: it starts a dial for the
            # next attempt and fails now (await connect() first to avoid this).
            self.backoff.check(self.address)
            if self._dialing is None and not self._closed_for_good:
                self._dialing = self._loop.create_task(self._dial())
                self._dialing.add_done_callback(self._dialed)
            raise RpcError(Code.UNAVAILABLE, f"ttrpc: not connected to {self.address} yet")
        return current._open_stream(info, response_type, request, ctx)

    @property
    def connected(self) -> bool:
        return self._current is not None and not self._current.closed

    @property
    def closed(self) -> bool:
        return self._closed_for_good

    async def close(self) -> None:
        self._closed_for_good = True
        if self._current is not None:
            await self._current.close()

    async def wait_closed(self) -> None:
        if self._current is not None:
            await self._current.wait_closed()

    async def __aenter__(self) -> ReconnectingClient:
        return self

    @classmethod
    async def from_socket(cls, sock: socket.socket, **options: Any) -> Client:
        raise TypeError("a ReconnectingClient dials its address itself")
