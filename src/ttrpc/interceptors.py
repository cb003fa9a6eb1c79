"""Interceptors: code that wraps every call, on clients and on servers.

Subclass :class:`Interceptor` and override the hooks you need; each hook gets
the call and ``call_next``, the rest of the chain (the next interceptor, and
in the end the call itself). Give a list to a client or server
(``interceptors=[...]``): the first one is the outermost, so they run in
order on the way in and in reverse order on the way out. One interceptor
object may serve any client and server, asyncio or blocking: each kind calls
its own hooks.

What a hook can do:

* see the call: ``info.full_method`` (``/service/Method``), ``info.kind``,
  ``ctx.metadata``, ``ctx.deadline`` and, on servers, ``ctx.peer``;
* change the metadata and the deadline before the call goes out (client
  hooks get their own copy of the caller's :class:`~ttrpc.Context`), or
  before the handler runs (server hooks);
* short-circuit: raise :class:`~ttrpc.RpcError` (or return a reply) without
  calling ``call_next``;
* see the outcome: the reply returned or the exception raised by
  ``call_next``. Client stream hooks get the stream back at once and learn
  its outcome through :meth:`ClientStream.add_done_callback`.

====================== ============================================================
hook                   signature (``call_next`` has the signature minus ``info``/itself)
====================== ============================================================
client_unary           ``async (request, ctx, info, call_next) -> reply``
client_stream          ``(request | None, ctx, info, call_next) -> ttrpc.aio.ClientStream``
server_unary           ``async (request, ctx, info, call_next) -> reply``
server_stream          ``async (stream, info, call_next) -> reply | None``
blocking_client_unary  ``(request, ctx, info, call_next) -> reply``
blocking_client_stream ``(request | None, ctx, info, call_next) -> ttrpc.blocking.ClientStream``
blocking_server_unary  ``(request, ctx, info, call_next) -> reply``
blocking_server_stream ``(stream, info, call_next) -> reply | None``
====================== ============================================================

Client stream hooks run when the stream is opened (``request`` is the one
request of a server-streaming call, else None). Server stream hooks get the
server's stream object (``stream.ctx``, ``stream.recv()``, ``stream.send()``);
``call_next(stream)`` runs the handler to its end and returns the reply of a
client-streaming call (None for the other kinds). Wrapping ``stream`` in an
object with the same methods lets a hook see every message.

:class:`LoggingInterceptor` is a complete example; :mod:`ttrpc.otel` another.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

from ttrpc.context import Context
from ttrpc.status import Code, RpcError, code_for_exception

if TYPE_CHECKING:
    from google.protobuf.message import Message

__all__ = ["CallInfo", "Interceptor", "LoggingInterceptor"]

_KINDS = {
    (False, False): "unary",
    (False, True): "server-streaming",
    (True, False): "client-streaming",
    (True, True): "bidi-streaming",
}


class CallInfo:
    """What is being called: service, method and the method's kind."""

    __slots__ = ("client_streaming", "full_method", "method", "server_streaming", "service")

    def __init__(
        self,
        service: str,
        method: str,
        *,
        client_streaming: bool = False,
        server_streaming: bool = False,
    ) -> None:
        self.service = service
        self.method = method
        self.client_streaming = client_streaming
        self.server_streaming = server_streaming
        self.full_method = f"/{service}/{method}"

    @property
    def kind(self) -> str:
        """``unary``, ``server-streaming``, ``client-streaming`` or ``bidi-streaming``."""
        return _KINDS[self.client_streaming, self.server_streaming]

    @property
    def streaming(self) -> bool:
        return self.client_streaming or self.server_streaming

    def __repr__(self) -> str:
        return f"CallInfo({self.full_method!r}, {self.kind})"


class Interceptor:
    """Base class: every hook passes the call on unchanged; override the ones you need."""

    # -- asyncio clients (ttrpc.aio.Client) --

    async def client_unary(
        self,
        request: Message,
        ctx: Context,
        info: CallInfo,
        call_next: Callable[[Message, Context], Awaitable[Message]],
    ) -> Message:
        return await call_next(request, ctx)

    def client_stream(
        self,
        request: Message | None,
        ctx: Context,
        info: CallInfo,
        call_next: Callable[[Message | None, Context], Any],
    ) -> Any:
        return call_next(request, ctx)

    # -- asyncio servers (ttrpc.aio.Server) --

    async def server_unary(
        self,
        request: Message,
        ctx: Context,
        info: CallInfo,
        call_next: Callable[[Message, Context], Awaitable[Message]],
    ) -> Message:
        return await call_next(request, ctx)

    async def server_stream(
        self, stream: Any, info: CallInfo, call_next: Callable[[Any], Awaitable[Message | None]]
    ) -> Message | None:
        return await call_next(stream)

    # -- blocking clients (ttrpc.blocking.Client) --

    def blocking_client_unary(
        self,
        request: Message,
        ctx: Context,
        info: CallInfo,
        call_next: Callable[[Message, Context], Message],
    ) -> Message:
        return call_next(request, ctx)

    def blocking_client_stream(
        self,
        request: Message | None,
        ctx: Context,
        info: CallInfo,
        call_next: Callable[[Message | None, Context], Any],
    ) -> Any:
        return call_next(request, ctx)

    # -- blocking servers (ttrpc.blocking.Server) --

    def blocking_server_unary(
        self,
        request: Message,
        ctx: Context,
        info: CallInfo,
        call_next: Callable[[Message, Context], Message],
    ) -> Message:
        return call_next(request, ctx)

    def blocking_server_stream(
        self, stream: Any, info: CallInfo, call_next: Callable[[Any], Message | None]
    ) -> Message | None:
        return call_next(stream)


# -- chains ---------------------------------------------------------------------------
#
# A chain is built from the innermost call outwards: each step is a partial that
# calls one hook with ``info`` and the next step. Servers build one per method when it
# is registered; clients one per call (only when they have interceptors).


def _unary_step(hook: Any, info: CallInfo, call_next: Any, request: Any, ctx: Context) -> Any:
    return hook(request, ctx, info, call_next)


def _stream_step(hook: Any, info: CallInfo, call_next: Any, stream: Any) -> Any:
    return hook(stream, info, call_next)


def chain_unary(
    interceptors: Sequence[Interceptor], hook: str, info: CallInfo, terminal: Callable[..., Any]
) -> Callable[[Any, Context], Any]:
    """``terminal(request, ctx)`` wrapped in each interceptor's ``hook``, first outermost."""
    call: Callable[..., Any] = terminal
    for interceptor in reversed(interceptors):
        call = partial(_unary_step, getattr(interceptor, hook), info, call)
    return call


def chain_stream(
    interceptors: Sequence[Interceptor], hook: str, info: CallInfo, terminal: Callable[..., Any]
) -> Callable[[Any], Any]:
    """``terminal(stream)`` wrapped in each interceptor's server stream ``hook``."""
    call: Callable[..., Any] = terminal
    for interceptor in reversed(interceptors):
        call = partial(_stream_step, getattr(interceptor, hook), info, call)
    return call


def check_interceptors(interceptors: Sequence[Interceptor] | None) -> tuple[Interceptor, ...]:
    if not interceptors:
        return ()
    out = tuple(interceptors)
    for interceptor in out:
        if not isinstance(interceptor, Interceptor):
            raise TypeError(
                f"interceptors must be ttrpc.interceptors.Interceptor objects, "
                f"not {type(interceptor).__name__}"
            )
    return out


# -- structured logging ---------------------------------------------------------------


class LoggingInterceptor(Interceptor):
    """One log record per call, on either side, with structured fields.

    Each record has ``extra`` fields (for JSON log formatters):
    ``ttrpc_method``, ``ttrpc_kind``, ``ttrpc_side`` (``client``/``server``),
    ``ttrpc_code`` (a :class:`~ttrpc.Code` name), ``ttrpc_duration_ms``,
    ``ttrpc_peer_pid``/``_uid``/``_gid`` on servers when known, and the
    values of the metadata keys listed in ``metadata_keys``. OK calls log at
    ``level``, failed ones at ``error_level``. Stream records are written
    when the stream ends.
    """

    def __init__(
        self,
        logger: logging.Logger | None = None,
        *,
        level: int = logging.INFO,
        error_level: int = logging.WARNING,
        metadata_keys: Sequence[str] = (),
    ) -> None:
        self.logger = logger or logging.getLogger("ttrpc.calls")
        self.level = level
        self.error_level = error_level
        self.metadata_keys = tuple(metadata_keys)

    def _log(
        self,
        side: str,
        info: CallInfo,
        ctx: Context,
        start: float,
        error: BaseException | None,
    ) -> None:
        level = self.level if error is None else self.error_level
        if not self.logger.isEnabledFor(level):
            return
        code = Code.OK if error is None else code_for_exception(error)
        name = code.name if isinstance(code, Code) else str(code)
        duration_ms = (time.monotonic() - start) * 1000
        extra: dict[str, object] = {
            "ttrpc_side": side,
            "ttrpc_method": info.full_method,
            "ttrpc_kind": info.kind,
            "ttrpc_code": name,
            "ttrpc_duration_ms": round(duration_ms, 3),
        }
        peer = ctx.peer
        if peer is not None:
            extra.update(ttrpc_peer_pid=peer.pid, ttrpc_peer_uid=peer.uid, ttrpc_peer_gid=peer.gid)
        for key in self.metadata_keys:
            value = ctx.metadata.get_one(key)
            if value is not None:
                extra[f"ttrpc_md_{key.replace('-', '_')}"] = value
        message = "ttrpc %s %s %s %.3fms"
        args: tuple[object, ...] = (side, info.full_method, name, duration_ms)
        if error is not None:
            message += ": %s"
            args = (*args, error.message if isinstance(error, RpcError) else error)
        self.logger.log(level, message, *args, extra=extra)

    async def _async_unary(
        self,
        side: str,
        request: Message,
        ctx: Context,
        info: CallInfo,
        call_next: Callable[[Message, Context], Awaitable[Message]],
    ) -> Message:
        start = time.monotonic()
        try:
            reply = await call_next(request, ctx)
        except BaseException as exc:
            self._log(side, info, ctx, start, exc)
            raise
        self._log(side, info, ctx, start, None)
        return reply

    def _blocking_unary(
        self,
        side: str,
        request: Message,
        ctx: Context,
        info: CallInfo,
        call_next: Callable[[Message, Context], Message],
    ) -> Message:
        start = time.monotonic()
        try:
            reply = call_next(request, ctx)
        except BaseException as exc:
            self._log(side, info, ctx, start, exc)
            raise
        self._log(side, info, ctx, start, None)
        return reply

    async def client_unary(
        self,
        request: Message,
        ctx: Context,
        info: CallInfo,
        call_next: Callable[[Message, Context], Awaitable[Message]],
    ) -> Message:
        return await self._async_unary("client", request, ctx, info, call_next)

    def blocking_client_unary(
        self,
        request: Message,
        ctx: Context,
        info: CallInfo,
        call_next: Callable[[Message, Context], Message],
    ) -> Message:
        return self._blocking_unary("client", request, ctx, info, call_next)

    def _client_stream(
        self, request: Message | None, ctx: Context, info: CallInfo, call_next: Any
    ) -> Any:
        start = time.monotonic()
        try:
            stream = call_next(request, ctx)
        except BaseException as exc:
            self._log("client", info, ctx, start, exc)
            raise
        stream.add_done_callback(lambda error: self._log("client", info, ctx, start, error))
        return stream

    client_stream = _client_stream
    blocking_client_stream = _client_stream

    async def server_unary(
        self,
        request: Message,
        ctx: Context,
        info: CallInfo,
        call_next: Callable[[Message, Context], Awaitable[Message]],
    ) -> Message:
        return await self._async_unary("server", request, ctx, info, call_next)

    def blocking_server_unary(
        self,
        request: Message,
        ctx: Context,
        info: CallInfo,
        call_next: Callable[[Message, Context], Message],
    ) -> Message:
        return self._blocking_unary("server", request, ctx, info, call_next)

    async def server_stream(
        self, stream: Any, info: CallInfo, call_next: Callable[[Any], Awaitable[Message | None]]
    ) -> Message | None:
        start = time.monotonic()
        try:
            reply = await call_next(stream)
        except BaseException as exc:
            self._log("server", info, stream.ctx, start, exc)
            raise
        self._log("server", info, stream.ctx, start, None)
        return reply

    def blocking_server_stream(
        self, stream: Any, info: CallInfo, call_next: Callable[[Any], Message | None]
    ) -> Message | None:
        start = time.monotonic()
        try:
            reply = call_next(stream)
        except BaseException as exc:
            self._log("server", info, stream.ctx, start, exc)
            raise
        self._log("server", info, stream.ctx, start, None)
        return reply
