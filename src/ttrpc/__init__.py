"""ttrpc: containerd's lightweight RPC protocol, wire-compatible with Go ttrpc.

The asyncio API lives in :mod:`ttrpc.aio`, the blocking (threaded) one in
:mod:`ttrpc.blocking`; both share everything exported here. The names below
are loaded on first use, so ``import ttrpc`` alone (a command line, say)
does not pay for protobuf.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "ANY": "ttrpc.handshake",
    "Backoff": "ttrpc._backoff",
    "PeerCredentials": "ttrpc.handshake",
    "require_root": "ttrpc.handshake",
    "require_same_user": "ttrpc.handshake",
    "require_uid_gid": "ttrpc.handshake",
    "CallInfo": "ttrpc.interceptors",
    "Context": "ttrpc.context",
    "Interceptor": "ttrpc.interceptors",
    "LoggingInterceptor": "ttrpc.interceptors",
    "Metadata": "ttrpc.metadata",
    "MAX_MESSAGE_LENGTH": "ttrpc.protocol",
    "Method": "ttrpc.service",
    "Service": "ttrpc.service",
    "Code": "ttrpc.status",
    "ConnectionClosed": "ttrpc.status",
    "RpcError": "ttrpc.status",
}

__all__ = [
    "ANY",
    "MAX_MESSAGE_LENGTH",
    "Backoff",
    "CallInfo",
    "Code",
    "ConnectionClosed",
    "Context",
    "Interceptor",
    "LoggingInterceptor",
    "Metadata",
    "Method",
    "PeerCredentials",
    "RpcError",
    "Service",
    "require_root",
    "require_same_user",
    "require_uid_gid",
]

if TYPE_CHECKING:
    from ttrpc._backoff import Backoff
    from ttrpc.context import Context
    from ttrpc.handshake import (
        ANY,
        PeerCredentials,
        require_root,
        require_same_user,
        require_uid_gid,
    )
    from ttrpc.interceptors import CallInfo, Interceptor, LoggingInterceptor
    from ttrpc.metadata import Metadata
    from ttrpc.protocol import MAX_MESSAGE_LENGTH
    from ttrpc.service import Method, Service
    from ttrpc.status import Code, ConnectionClosed, RpcError


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ttrpc' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*_EXPORTS, "__version__"})
