"""SHA-256 without ``hashlib`` where possible: ``start`` runs once per container, and
``hashlib`` loads OpenSSL (a few milliseconds) for one digest of a short string."""

from __future__ import annotations

__all__ = ["sha256"]

TYPE_CHECKING = False  # not typing's: importing typing costs ``start`` more than hashlib
if TYPE_CHECKING:
    from hashlib import sha256
else:
    try:  # CPython 3.12+'s built-in implementation
        from _sha2 import sha256
    except ImportError:
        try:  # 3.11's
            from _sha256 import sha256
        except ImportError:  # pragma: no cover
            from hashlib import sha256
