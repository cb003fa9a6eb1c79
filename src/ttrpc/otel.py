"""OpenTelemetry tracing for ttrpc calls, propagated in metadata (``traceparent``).

Needs the ``otel`` extra (``pip install 'ttrpc[otel]'``, i.e. ``opentelemetry-api``)::

    from ttrpc.otel import TracingInterceptor

    server = ttrpc.aio.Server(interceptors=[TracingInterceptor()])
    client = await ttrpc.aio.connect(address, interceptors=[TracingInterceptor()])

Clients start a CLIENT span per call (named ``service/Method``) and inject its
context into the request metadata with the configured propagator (by default
OpenTelemetry's global one: W3C ``traceparent`` and ``tracestate``). Servers
extract it, start a SERVER span as its child and make it current while the
handler runs, so the handler's own spans nest under it. Spans carry
``rpc.system`` = ``ttrpc``, ``rpc.service``, ``rpc.method`` and
``rpc.ttrpc.status_code``; failed calls get an ERROR status. Stream spans
last until the stream ends.

Without an SDK configured the API's tracer does nothing (and costs little).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

try:
    from opentelemetry import context as otel_context
    from opentelemetry import propagate, trace
    from opentelemetry.propagators.textmap import Getter, Setter, TextMapPropagator
    from opentelemetry.trace import Span, SpanKind, Status, StatusCode
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("ttrpc.otel needs the OpenTelemetry API: pip install 'ttrpc[otel]'") from exc

from ttrpc import __version__
from ttrpc.context import Context
from ttrpc.interceptors import CallInfo, Interceptor
from ttrpc.metadata import Metadata
from ttrpc.status import Code, code_for_exception

if TYPE_CHECKING:
    from google.protobuf.message import Message

__all__ = ["TracingInterceptor"]


class _MetadataSetter(Setter[Metadata]):
    def set(self, carrier: Metadata, key: str, value: str) -> None:
        carrier.set(key, value)


class _MetadataGetter(Getter[Metadata]):
    def get(self, carrier: Metadata, key: str) -> list[str] | None:
        try:
            return list(carrier[key])
        except KeyError:
            return None

    def keys(self, carrier: Metadata) -> list[str]:
        return list(carrier)


_SETTER = _MetadataSetter()
_GETTER = _MetadataGetter()


class TracingInterceptor(Interceptor):
    """Client and server spans for every call, on any client or server (see module doc)."""

    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None = None,
        propagator: TextMapPropagator | None = None,
    ) -> None:
        self._tracer = trace.get_tracer("ttrpc", __version__, tracer_provider=tracer_provider)
        self._propagator = propagator

    def _inject(self, span: Span, md: Metadata) -> None:
        carrier_ctx = trace.set_span_in_context(span)
        propagator = self._propagator or propagate.get_global_textmap()
        propagator.inject(md, context=carrier_ctx, setter=_SETTER)

    def _extract(self, md: Metadata) -> otel_context.Context:
        propagator = self._propagator or propagate.get_global_textmap()
        return propagator.extract(md, getter=_GETTER)

    def _start(self, info: CallInfo, kind: SpanKind, parent: Any = None) -> Span:
        return self._tracer.start_span(
            info.full_method[1:],
            context=parent,
            kind=kind,
            attributes={
                "rpc.system": "ttrpc",
                "rpc.service": info.service,
                "rpc.method": info.method,
            },
        )

    @staticmethod
    def _end(span: Span, error: BaseException | None) -> None:
        code = Code.OK if error is None else code_for_exception(error)
        span.set_attribute("rpc.ttrpc.status_code", int(code))
        if error is not None:
            name = code.name if isinstance(code, Code) else str(code)
            span.set_status(Status(StatusCode.ERROR, f"{name}: {error}"))
        span.end()

    @contextmanager
    def _server_span(self, info: CallInfo, ctx: Context) -> Iterator[Span]:
        span = self._start(info, SpanKind.SERVER, self._extract(ctx.metadata))
        peer = ctx.peer
        if peer is not None:
            span.set_attribute("ttrpc.peer.pid", peer.pid)
            span.set_attribute("ttrpc.peer.uid", peer.uid)
        token = otel_context.attach(trace.set_span_in_context(span))
        try:
            yield span
        except BaseException as exc:
            self._end(span, exc)
            raise
        else:
            self._end(span, None)
        finally:
            otel_context.detach(token)

    # -- clients --

    async def client_unary(
        self,
        request: Message,
        ctx: Context,
        info: CallInfo,
        call_next: Callable[[Message, Context], Awaitable[Message]],
    ) -> Message:
        span = self._start(info, SpanKind.CLIENT)
        self._inject(span, ctx.metadata)
        try:
            reply = await call_next(request, ctx)
        except BaseException as exc:
            self._end(span, exc)
            raise
        self._end(span, None)
        return reply

    def blocking_client_unary(
        self,
        request: Message,
        ctx: Context,
        info: CallInfo,
        call_next: Callable[[Message, Context], Message],
    ) -> Message:
        span = self._start(info, SpanKind.CLIENT)
        self._inject(span, ctx.metadata)
        try:
            reply = call_next(request, ctx)
        except BaseException as exc:
            self._end(span, exc)
            raise
        self._end(span, None)
        return reply

    def _client_stream(
        self, request: Message | None, ctx: Context, info: CallInfo, call_next: Any
    ) -> Any:
        span = self._start(info, SpanKind.CLIENT)
        self._inject(span, ctx.metadata)
        try:
            stream = call_next(request, ctx)
        except BaseException as exc:
            self._end(span, exc)
            raise
        stream.add_done_callback(lambda error: self._end(span, error))
        return stream

    client_stream = _client_stream
    blocking_client_stream = _client_stream

    # -- servers --

    async def server_unary(
        self,
        request: Message,
        ctx: Context,
        info: CallInfo,
        call_next: Callable[[Message, Context], Awaitable[Message]],
    ) -> Message:
        with self._server_span(info, ctx):
            return await call_next(request, ctx)

    def blocking_server_unary(
        self,
        request: Message,
        ctx: Context,
        info: CallInfo,
        call_next: Callable[[Message, Context], Message],
    ) -> Message:
        with self._server_span(info, ctx):
            return call_next(request, ctx)

    async def server_stream(
        self, stream: Any, info: CallInfo, call_next: Callable[[Any], Awaitable[Message | None]]
    ) -> Message | None:
        with self._server_span(info, stream.ctx):
            return await call_next(stream)

    def blocking_server_stream(
        self, stream: Any, info: CallInfo, call_next: Callable[[Any], Message | None]
    ) -> Message | None:
        with self._server_span(info, stream.ctx):
            return call_next(stream)
