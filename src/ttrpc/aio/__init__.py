"""ttrpc for asyncio: :class:`Server`, :class:`Client` and :func:`connect`."""

from ttrpc.aio.client import Client, connect
from ttrpc.aio.server import Server

__all__ = ["Client", "Server", "connect"]
