"""Peer credentials of unix-socket connections, and the checks servers apply to them.

A server built with ``handshake=require_same_user()`` reads ``SO_PEERCRED``
of each accepted connection and closes it without a reply when the check
fails, as Go ttrpc does.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "ANY",
    "Handshake",
    "PeerCredentials",
    "log_refusal",
    "peer_credentials",
    "require_root",
    "require_same_user",
    "require_uid_gid",
]

log = logging.getLogger("ttrpc")

ANY = -1
"""Wildcard for :func:`require_uid_gid`."""

_UCRED = struct.Struct("3i")


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    """The process at the other end of a unix socket, as the kernel saw it at connect time."""

    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> PeerCredentials | None:
    """``SO_PEERCRED`` of a connected unix socket; ``None`` for other sockets."""
    if sock.family != socket.AF_UNIX:
        return None
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return PeerCredentials(pid, uid, gid)


Handshake = Callable[[PeerCredentials | None], bool]
"""A server's accept check: gets the peer's credentials (None when the transport has
none, e.g. vsock), returns whether to serve it. Any callable will do (a custom hook)."""


def log_refusal(peer: PeerCredentials | None) -> None:
    """What servers log when their handshake refuses a connection (closed without a reply)."""
    if peer is None:
        log.warning("ttrpc: refusing connection after handshake: no peer credentials")
    else:
        log.warning(
            "ttrpc: refusing connection after handshake: pid %d uid %d gid %d",
            peer.pid,
            peer.uid,
            peer.gid,
        )


def require_uid_gid(uid: int = ANY, gid: int = ANY) -> Handshake:
    """Accept only peers with this uid and gid (either may be :data:`ANY`)."""

    def check(peer: PeerCredentials | None) -> bool:
        if peer is None:
            return False
        return (uid == ANY or peer.uid == uid) and (gid == ANY or peer.gid == gid)

    return check


def require_root() -> Handshake:
    """Accept only uid 0 and gid 0."""
    return require_uid_gid(0, 0)


def require_same_user() -> Handshake:
    """Accept only peers running as this process's effective uid and gid."""
    return require_uid_gid(os.geteuid(), os.getegid())
