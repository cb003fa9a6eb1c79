"""Blocking (threaded) ttrpc: :class:`Server`, :class:`Client` and :func:`connect`."""

from ttrpc.blocking.client import Client, ClientStream, connect
from ttrpc.blocking.reconnect import ReconnectingClient
from ttrpc.blocking.server import Server, ServerStream

__all__ = ["Client", "ClientStream", "ReconnectingClient", "Server", "ServerStream", "connect"]
