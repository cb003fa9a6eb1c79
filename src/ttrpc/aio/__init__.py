"""ttrpc for asyncio: :class:`Server`, :class:`Client` and :func:`connect`."""

from ttrpc.aio.client import Client, ClientStream, Requests, connect
from ttrpc.aio.reconnect import ReconnectingClient
from ttrpc.aio.server import Server, ServerStream

__all__ = [
    "Client",
    "ClientStream",
    "ReconnectingClient",
    "Requests",
    "Server",
    "ServerStream",
    "connect",
]
