"""Socket addresses: ``unix:///path``, ``unix://@abstract``, a bare path, or ``fd://N``."""

from __future__ import annotations

import contextlib
import os
import socket

__all__ = ["connect_socket", "listen", "parse_unix_address", "socket_from_fd"]


def parse_unix_address(address: str) -> str:
    """The ``AF_UNIX`` socket address for ``address``.

    Abstract names come back with a leading NUL, the form :mod:`socket` takes.
    """
    rest = address[len("unix://") :] if address.startswith("unix://") else address
    if not rest:
        raise ValueError(f"empty unix socket address: {address!r}")
    if rest.startswith("@"):
        return "\0" + rest[1:]
    if "://" in rest:
        raise ValueError(f"unsupported address {address!r}: expected unix:///path or unix://@name")
    return rest


def socket_from_fd(fd: int) -> socket.socket:
    """Adopt an inherited socket file descriptor (e.g. a shim's listener on fd 3)."""
    return socket.socket(fileno=fd)


def _fd_of(address: str) -> int | None:
    if address.startswith("fd://"):
        return int(address[len("fd://") :])
    return None


def listen(address: str, *, backlog: int = 128, mode: int = 0o600) -> socket.socket:
    """A listening unix socket for ``address``.

    A path socket is created with ``mode`` (0600 by default) from the start:
    the mode is set on the socket before ``bind`` so there is no window in
    which others could connect. ``fd://N`` adopts an inherited listener.
    """
    fd = _fd_of(address)
    if fd is not None:
        return socket_from_fd(fd)
    target = parse_unix_address(address)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        if not target.startswith("\0"):
            # Linux gives the socket file the mode of the socket inode (less umask).
            os.fchmod(sock.fileno(), mode)
        sock.bind(target)
        if not target.startswith("\0"):
            os.chmod(target, mode)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def connect_socket(address: str, timeout: float | None = None) -> socket.socket:
    """A connected, blocking unix socket (the connect itself bounded by ``timeout``)."""
    fd = _fd_of(address)
    if fd is not None:
        return socket_from_fd(fd)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        sock.connect(parse_unix_address(address))
        sock.settimeout(None)
    except BaseException:
        sock.close()
        raise
    return sock


def unlink_socket(address: str) -> None:
    """Remove a path socket's file (nothing to do for abstract names and fds)."""
    if address.startswith("fd://"):
        return
    target = parse_unix_address(address)
    if not target.startswith("\0"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(target)
