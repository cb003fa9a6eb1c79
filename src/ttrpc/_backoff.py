"""Redial policy shared by the reconnecting clients."""

from __future__ import annotations

import time

from ttrpc.status import Code, RpcError

__all__ = ["Backoff"]


class Backoff:
    """Exponential backoff with jitter between failed dials, and the fail-fast window.

    After a failed dial the next one is allowed ``delay`` seconds later
    (``initial``, times ``multiplier`` after each further failure, at most
    ``maximum``; each wait drawn within ±``jitter`` of it). Calls made before
    then fail at once with UNAVAILABLE instead of waiting or dialling.
    """

    def __init__(
        self,
        *,
        initial: float = 0.1,
        maximum: float = 5.0,
        multiplier: float = 2.0,
        jitter: float = 0.2,
    ) -> None:
        if initial <= 0 or maximum < initial or multiplier < 1 or not 0 <= jitter < 1:
            raise ValueError(
                "backoff needs 0 < initial <= maximum, multiplier >= 1, 0 <= jitter < 1"
            )
        self.initial = initial
        self.maximum = maximum
        self.multiplier = multiplier
        self.jitter = jitter
        self._delay = 0.0
        self.next_attempt = 0.0  # time.monotonic() before which no dial is made
        self.last_error: BaseException | None = None
        self.failures = 0

    def failed(self, error: BaseException) -> None:
        self.failures += 1
        self.last_error = error
        self._delay = (
            self.initial if self._delay == 0 else min(self.maximum, self._delay * self.multiplier)
        )
        import random  # only once something failed: not worth its import time up front

        spread = self._delay * self.jitter
        self.next_attempt = time.monotonic() + self._delay + random.uniform(-spread, spread)

    def succeeded(self) -> None:
        self.failures = 0
        self._delay = 0.0
        self.next_attempt = 0.0
        self.last_error = None

    def check(self, address: str) -> None:
        """Raise UNAVAILABLE while inside the wait after a failed dial."""
        wait = self.next_attempt - time.monotonic()
        if wait > 0:
            raise RpcError(
                Code.UNAVAILABLE,
                f"ttrpc: {address} is unreachable (next attempt in {wait:.2f} s): "
                f"{self.last_error}",
            )
