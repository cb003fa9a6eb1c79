"""Blocking (threaded) ttrpc: :class:`Server`, :class:`Client` and :func:`connect`."""

from ttrpc.blocking.client import Client, connect
from ttrpc.blocking.server import Server

__all__ = ["Client", "Server", "connect"]
