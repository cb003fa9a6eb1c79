"""ttrpc: containerd's lightweight RPC protocol, wire-compatible with Go ttrpc.

The asyncio API lives in :mod:`ttrpc.aio`, the blocking (threaded) one in
:mod:`ttrpc.blocking`; both share everything exported here.
"""

from ttrpc.context import Context
from ttrpc.handshake import (
    ANY,
    PeerCredentials,
    require_root,
    require_same_user,
    require_uid_gid,
)
from ttrpc.metadata import Metadata
from ttrpc.protocol import MAX_MESSAGE_LENGTH
from ttrpc.service import Method, Service
from ttrpc.status import Code, ConnectionClosed, RpcError

__version__ = "0.1.0"

__all__ = [
    "ANY",
    "MAX_MESSAGE_LENGTH",
    "Code",
    "ConnectionClosed",
    "Context",
    "Metadata",
    "Method",
    "PeerCredentials",
    "RpcError",
    "Service",
    "require_root",
    "require_same_user",
    "require_uid_gid",
]
