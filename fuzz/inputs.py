"""How the fuzz targets turn one input into a sequence of writes (shared by both)."""

from __future__ import annotations

__all__ = ["split"]


def split(data: bytes) -> list[bytes]:
    """Cut the input into pieces whose sizes come from its first bytes (none empty)."""
    if len(data) < 2:
        return [data] if data else []
    cuts = data[0] % 8 + 1
    sizes = list(data[1 : 1 + cuts])
    body = data[1 + cuts :]
    pieces = []
    pos = 0
    for size in sizes:
        pieces.append(body[pos : pos + size + 1])
        pos += size + 1
    pieces.append(body[pos:])
    return [p for p in pieces if p]
