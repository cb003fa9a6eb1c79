"""Per-call context: metadata, deadline and (on servers) who is calling."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ttrpc.metadata import Metadata, MetadataInit

if TYPE_CHECKING:
    from ttrpc.handshake import PeerCredentials

__all__ = ["Context"]


class Context:
    """What travels with a call besides its message.

    Clients pass one to say what to send::

        Context(timeout=2.5, metadata={"containerd-namespace-ttrpc": "default"})

    Servers hand one to every handler: the metadata as received, the
    deadline the client asked for, the full method name (``/service/Method``)
    and the peer's credentials when the transport has them.

    ``deadline`` is an absolute :func:`time.monotonic` value, or ``None``.
    """

    __slots__ = ("_cancelled", "deadline", "metadata", "method", "peer")

    def __init__(
        self,
        *,
        timeout: float | None = None,
        deadline: float | None = None,
        metadata: MetadataInit | None = None,
    ) -> None:
        if timeout is not None and deadline is not None:
            raise ValueError("give timeout or deadline, not both")
        if timeout is not None:
            deadline = time.monotonic() + timeout
        self.deadline = deadline
        self.metadata = metadata if isinstance(metadata, Metadata) else Metadata(metadata)
        self.method = ""
        self.peer: PeerCredentials | None = None
        self._cancelled = False

    def copy(self) -> Context:
        """A new context with the same deadline and a copy of the metadata.

        Client interceptors get a copy, so that what they add to one call's
        metadata does not stick to a context the caller reuses.
        """
        ctx = Context(deadline=self.deadline, metadata=self.metadata.copy())
        ctx.method = self.method
        ctx.peer = self.peer
        return ctx

    def set_timeout(self, timeout: float | None) -> None:
        """Set the deadline ``timeout`` seconds from now (``None``: no deadline)."""
        self.deadline = None if timeout is None else time.monotonic() + timeout

    def time_remaining(self) -> float | None:
        """Seconds left before the deadline (may be negative), or ``None`` without one."""
        if self.deadline is None:
            return None
        return self.deadline - time.monotonic()

    @property
    def cancelled(self) -> bool:
        """True once the call can no longer be answered: its deadline passed or the peer left.

        Long-running blocking handlers should check it and stop early.
        """
        if self._cancelled:
            return True
        return self.deadline is not None and time.monotonic() >= self.deadline

    def cancel(self) -> None:
        """Mark the call as abandoned (used by servers when the connection goes away)."""
        self._cancelled = True

    def __repr__(self) -> str:
        return (
            f"Context(method={self.method!r}, deadline={self.deadline!r}, "
            f"metadata={self.metadata!r}, peer={self.peer!r})"
        )
