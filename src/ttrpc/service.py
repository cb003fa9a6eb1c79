"""Service descriptions and the dispatch logic every server shares.

A :class:`Service` maps wire method names to :class:`Method` entries (the
handler plus its request and response types). Generated code builds them;
hand-written services can too::

    Service("example.v1.Greeter", {
        "Hello": Method("Hello", HelloRequest, HelloResponse, greeter.hello),
    })

The asyncio server takes coroutine handlers, the blocking server plain
functions; both get ``(request, ctx)`` and return the response message.

Streaming methods say so (``client_streaming``/``server_streaming``) and
their handlers take and give iterators (async iterators on asyncio):

==================  ===================================  ====================
kind                handler                              returns
==================  ===================================  ====================
server-streaming    ``(request, ctx)``                   iterator of responses
client-streaming    ``(iterator of requests, ctx)``      the response
bidi-streaming      ``(iterator of requests, ctx)``      iterator of responses
==================  ===================================  ====================

A generator (``async def`` with ``yield`` on asyncio) is the natural way to
write the ones that return iterators.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from google.protobuf.message import DecodeError, Message

from ttrpc.context import Context
from ttrpc.handshake import PeerCredentials
from ttrpc.interceptors import CallInfo, Interceptor, chain_stream, chain_unary
from ttrpc.metadata import Metadata
from ttrpc.status import Code, RpcError
from ttrpc.ttrpc_pb2 import Request

__all__ = ["Method", "Service", "ServiceProvider", "ServiceRegistry"]


@dataclass(frozen=True, slots=True)
class Method:
    """One RPC: its wire name, message types, handler and kind.

    A unary handler is ``(request, ctx) -> response``; see the module doc for streams.
    """

    name: str
    request_type: type[Message]
    response_type: type[Message]
    handler: Callable[[Any, Context], Any]
    client_streaming: bool = False
    server_streaming: bool = False

    @property
    def streaming(self) -> bool:
        return self.client_streaming or self.server_streaming


@dataclass(frozen=True, slots=True)
class Service:
    """A named set of methods, as registered on a server."""

    name: str
    methods: Mapping[str, Method] = field(default_factory=dict)


@runtime_checkable
class ServiceProvider(Protocol):
    """Anything that describes itself as a :class:`Service` (generated service bases do)."""

    def __ttrpc_service__(self) -> Service: ...


class ServiceRegistry:
    """The services of one server, and the step from a wire request to a handler call.

    With interceptors, each method's chain is built once, when it is registered
    (:meth:`invoker`, :meth:`call_info`).
    """

    __slots__ = ("_chains", "_interceptors", "_methods", "_services", "asynchronous")

    def __init__(self, *, asynchronous: bool, interceptors: tuple[Interceptor, ...] = ()) -> None:
        self.asynchronous = asynchronous
        self._interceptors = interceptors
        self._services: dict[str, Service] = {}
        self._methods: dict[tuple[str, str], Method] = {}
        self._chains: dict[Method, tuple[CallInfo, Callable[..., Any]]] = {}

    @property
    def intercepted(self) -> bool:
        return bool(self._interceptors)

    def register(self, service: Service | ServiceProvider) -> None:
        """Add a service; its name must be new and its handlers of the server's kind."""
        if not isinstance(service, Service):
            service = service.__ttrpc_service__()
        if service.name in self._services:
            raise ValueError(f"duplicate service {service.name} registered")
        for method in service.methods.values():
            problem = _handler_problem(method, self.asynchronous)
            if problem:
                raise TypeError(
                    f"{service.name}/{method.name}: this server's handlers must be {problem}"
                )
        self._services[service.name] = service
        for name, method in service.methods.items():
            self._methods[service.name, name] = method

    def chain(self, method: Method, terminal: Callable[..., Any]) -> Callable[..., Any]:
        """The interceptor chain around ``terminal`` for ``method`` (built once per method)."""
        entry = self._chains.get(method)
        if entry is None:
            info = self.call_info(method)
            prefix = "" if self.asynchronous else "blocking_"
            call: Callable[..., Any]
            if method.streaming:
                call = chain_stream(self._interceptors, f"{prefix}server_stream", info, terminal)
            else:
                call = chain_unary(self._interceptors, f"{prefix}server_unary", info, terminal)
            entry = self._chains[method] = (info, call)
        return entry[1]

    def call_info(self, method: Method) -> CallInfo:
        for (service, name), known in self._methods.items():
            if known is method:
                return CallInfo(
                    service,
                    name,
                    client_streaming=method.client_streaming,
                    server_streaming=method.server_streaming,
                )
        return CallInfo(
            "",
            method.name,
            client_streaming=method.client_streaming,
            server_streaming=method.server_streaming,
        )

    @property
    def services(self) -> Mapping[str, Service]:
        return self._services

    def prepare(
        self, request: Request, peer: PeerCredentials | None
    ) -> tuple[Method, Message, Context]:
        """Resolve and decode a request; raise :class:`RpcError` for the answers Go gives.

        For a streaming method the message is not decoded (the driver's stream
        does that); what comes back in its place must not be used.
        """
        method = self._methods.get((request.service, request.method))
        if method is None:
            if request.service not in self._services:
                raise RpcError(Code.UNIMPLEMENTED, f"service {request.service}")
            raise RpcError(Code.UNIMPLEMENTED, f"method {request.method}")
        if method.client_streaming or method.server_streaming:
            message: Message = request
        else:
            try:
                message = method.request_type.FromString(request.payload)
            except DecodeError as exc:
                raise RpcError(
                    Code.INTERNAL, f"ttrpc: error unmarshalling payload: {exc}"
                ) from None
        ctx = Context()
        if request.metadata:
            ctx.metadata = Metadata.from_wire(request.metadata)
        if request.timeout_nano:
            ctx.deadline = time.monotonic() + request.timeout_nano / 1e9
        ctx.method = f"/{request.service}/{request.method}"
        ctx.peer = peer
        return method, message, ctx


_CO_GENERATOR = 0x20  # code flags: ``def`` with ``yield``,
_CO_COROUTINE = 0x80  # ``async def``,
_CO_ASYNC_GENERATOR = 0x200  # ``async def`` with ``yield``


def _code_flags(obj: object) -> int:
    """The code flags of a callable (bound methods, partials, ``__call__``), or 0."""
    while isinstance(obj, functools.partial):
        obj = obj.func
    func = getattr(obj, "__func__", obj)
    code = getattr(func, "__code__", None)
    if code is None:
        code = getattr(type(obj).__dict__.get("__call__"), "__code__", None)
    return int(code.co_flags) if code is not None else 0


def _is_coroutine_function(obj: object) -> bool:
    """Like ``inspect.iscoroutinefunction``, without importing :mod:`inspect`."""
    return bool(_code_flags(obj) & _CO_COROUTINE)


def _handler_problem(method: Method, asynchronous: bool) -> str:
    """What is wrong with a handler for this kind of server ("" when nothing)."""
    flags = _code_flags(method.handler)
    if not method.streaming:
        if bool(flags & _CO_COROUTINE) != asynchronous:
            return "coroutine functions" if asynchronous else "plain (blocking) functions"
        return ""
    if asynchronous:
        if flags & _CO_GENERATOR:
            return "async generators or coroutine functions (not plain generators)"
        if not method.server_streaming and not flags & _CO_COROUTINE:
            return "coroutine functions"
        return ""
    if flags & (_CO_COROUTINE | _CO_ASYNC_GENERATOR):
        return "plain (blocking) functions or generators"
    return ""


def encode_result(method: Method, result: object) -> bytes:
    """Serialize a handler's return value; a wrong type is the handler's bug (INTERNAL)."""
    if not isinstance(result, Message):
        raise RpcError(
            Code.INTERNAL,
            f"ttrpc: handler for {method.name} returned {type(result).__name__}, "
            f"not {method.response_type.__name__}",
        )
    return result.SerializeToString()
