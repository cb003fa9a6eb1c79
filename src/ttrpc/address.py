"""Socket addresses: ``unix:///path``, ``unix://@abstract``, a bare path, ``fd://N``,
or ``vsock://CID:PORT`` (virtio sockets, as kata-style agents in VMs listen on).

``vsock://CID:PORT``: CID is a number, ``-1``/``any`` (``VMADDR_CID_ANY``, to
listen on every CID), ``host`` (2) or ``local`` (1); PORT a number. A server
in a guest typically listens on ``vsock://-1:1024`` and the host connects to
``vsock://GUEST_CID:1024``.
"""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Any

__all__ = [
    "connect_socket",
    "listen",
    "parse_unix_address",
    "parse_vsock_address",
    "resolve",
    "socket_from_fd",
]

_VMADDR_CID_ANY = 0xFFFFFFFF
_CID_NAMES = {"-1": _VMADDR_CID_ANY, "any": _VMADDR_CID_ANY, "host": 2, "local": 1}


def parse_vsock_address(address: str) -> tuple[int, int]:
    """``(cid, port)`` for ``vsock://CID:PORT``."""
    if not address.startswith("vsock://"):
        raise ValueError(f"not a vsock address: {address!r}")
    rest = address[len("vsock://") :]
    cid_text, sep, port_text = rest.rpartition(":")
    if not sep or not cid_text:
        raise ValueError(f"vsock address must be vsock://CID:PORT, got {address!r}")
    cid = _CID_NAMES.get(cid_text.lower())
    try:
        if cid is None:
            cid = int(cid_text, 10)
        port = int(port_text, 10)
    except ValueError:
        raise ValueError(f"vsock address must be vsock://CID:PORT, got {address!r}") from None
    if not 0 <= cid <= 0xFFFFFFFF or not 0 <= port <= 0xFFFFFFFF:
        raise ValueError(f"vsock CID and port must be 32-bit unsigned numbers: {address!r}")
    return cid, port


def _vsock_family() -> int:
    family = getattr(socket, "AF_VSOCK", None)
    if family is None:
        raise OSError("vsock sockets are not supported on this platform")
    return int(family)


def resolve(address: str) -> tuple[int | None, Any]:
    """``(family, sockaddr)`` for an address; ``(None, fd)`` for ``fd://N``."""
    fd = _fd_of(address)
    if fd is not None:
        return None, fd
    if address.startswith("vsock://"):
        return _vsock_family(), parse_vsock_address(address)
    return socket.AF_UNIX, parse_unix_address(address)


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
        raise ValueError(
            f"unsupported address {address!r}: expected unix:///path, unix://@name, "
            "fd://N or vsock://CID:PORT"
        )
    return rest


def socket_from_fd(fd: int) -> socket.socket:
    """Adopt an inherited socket file descriptor (e.g. a shim's listener on fd 3)."""
    return socket.socket(fileno=fd)


def _fd_of(address: str) -> int | None:
    if address.startswith("fd://"):
        return int(address[len("fd://") :])
    return None


def listen(address: str, *, backlog: int = 128, mode: int = 0o600) -> socket.socket:
    """A listening socket for ``address``.

    A path socket is created with ``mode`` (0600 by default) from the start:
    the mode is set on the socket before ``bind`` so there is no window in
    which others could connect. ``fd://N`` adopts an inherited listener;
    ``vsock://CID:PORT`` binds a vsock socket.
    """
    family, target = resolve(address)
    if family is None:
        return socket_from_fd(target)
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    if family != socket.AF_UNIX:
        try:
            sock.bind(target)
            sock.listen(backlog)
        except BaseException:
            sock.close()
            raise
        return sock
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
    """A connected, blocking socket (the connect itself bounded by ``timeout``)."""
    family, target = resolve(address)
    if family is None:
        return socket_from_fd(target)
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        sock.connect(target)
        sock.settimeout(None)
    except BaseException:
        sock.close()
        raise
    return sock


def unlink_socket(address: str) -> None:
    """Remove a path socket's file (nothing to do for abstract names, fds and vsock)."""
    if address.startswith(("fd://", "vsock://")):
        return
    target = parse_unix_address(address)
    if not target.startswith("\0"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(target)
