"""Service descriptions and the dispatch logic every server shares.

A :class:`Service` maps wire method names to :class:`Method` entries (the
handler plus its request and response types). Generated code builds them;
hand-written services can too::

    Service("example.v1.Greeter", {
        "Hello": Method("Hello", HelloRequest, HelloResponse, greeter.hello),
    })

The asyncio server takes coroutine handlers, the blocking server plain
functions; both get ``(request, ctx)`` and return the response message.
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
from ttrpc.metadata import Metadata
from ttrpc.status import Code, RpcError
from ttrpc.ttrpc_pb2 import Request

__all__ = ["Method", "Service", "ServiceProvider", "ServiceRegistry"]


@dataclass(frozen=True, slots=True)
class Method:
    """One RPC: its wire name, message types and handler ``(request, ctx) -> response``."""

    name: str
    request_type: type[Message]
    response_type: type[Message]
    handler: Callable[[Any, Context], Any]


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
    """The services of one server, and the step from a wire request to a handler call."""

    __slots__ = ("_methods", "_services", "asynchronous")

    def __init__(self, *, asynchronous: bool) -> None:
        self.asynchronous = asynchronous
        self._services: dict[str, Service] = {}
        self._methods: dict[tuple[str, str], Method] = {}

    def register(self, service: Service | ServiceProvider) -> None:
        """Add a service; its name must be new and its handlers of the server's kind."""
        if not isinstance(service, Service):
            service = service.__ttrpc_service__()
        if service.name in self._services:
            raise ValueError(f"duplicate service {service.name} registered")
        for method in service.methods.values():
            is_async = _is_coroutine_function(method.handler)
            if is_async != self.asynchronous:
                kind = "coroutine functions" if self.asynchronous else "plain (blocking) functions"
                raise TypeError(
                    f"{service.name}/{method.name}: this server's handlers must be {kind}"
                )
        self._services[service.name] = service
        for name, method in service.methods.items():
            self._methods[service.name, name] = method

    @property
    def services(self) -> Mapping[str, Service]:
        return self._services

    def prepare(
        self, request: Request, peer: PeerCredentials | None
    ) -> tuple[Method, Message, Context]:
        """Resolve and decode a request; raise :class:`RpcError` for the answers Go gives."""
        method = self._methods.get((request.service, request.method))
        if method is None:
            if request.service not in self._services:
                raise RpcError(Code.UNIMPLEMENTED, f"service {request.service}")
            raise RpcError(Code.UNIMPLEMENTED, f"method {request.method}")
        try:
            message = method.request_type.FromString(request.payload)
        except DecodeError as exc:
            raise RpcError(Code.INTERNAL, f"ttrpc: error unmarshalling payload: {exc}") from None
        ctx = Context()
        if request.metadata:
            ctx.metadata = Metadata.from_wire(request.metadata)
        if request.timeout_nano:
            ctx.deadline = time.monotonic() + request.timeout_nano / 1e9
        ctx.method = f"/{request.service}/{request.method}"
        ctx.peer = peer
        return method, message, ctx


_CO_COROUTINE = 0x80  # code flag of ``async def`` functions


def _is_coroutine_function(obj: object) -> bool:
    """Like ``inspect.iscoroutinefunction`` (bound methods, partials, async ``__call__``),
    without importing :mod:`inspect`."""
    while isinstance(obj, functools.partial):
        obj = obj.func
    func = getattr(obj, "__func__", obj)
    code = getattr(func, "__code__", None)
    if code is None:
        code = getattr(type(obj).__dict__.get("__call__"), "__code__", None)
    return code is not None and bool(code.co_flags & _CO_COROUTINE)


def encode_result(method: Method, result: object) -> bytes:
    """Serialize a handler's return value; a wrong type is the handler's bug (INTERNAL)."""
    if not isinstance(result, Message):
        raise RpcError(
            Code.INTERNAL,
            f"ttrpc: handler for {method.name} returned {type(result).__name__}, "
            f"not {method.response_type.__name__}",
        )
    return result.SerializeToString()
