"""``/proc/self/mountinfo`` with the standard library only (``delete`` reads it per container)."""

from __future__ import annotations

import os

__all__ = ["mounted", "unescape"]


def unescape(field: str) -> str:
    """Undo mountinfo's octal escapes (``\\040`` for a space); other text is kept as is."""
    if "\\" not in field:
        return field
    out: list[str] = []
    i = 0
    while i < len(field):
        c = field[i]
        if c == "\\" and i + 4 <= len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(c)
            i += 1
    return "".join(out)


def mounted(path: str) -> bool:
    """Whether something is mounted exactly at ``path``."""
    real = os.path.realpath(path)
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and unescape(fields[4]) == real:
                    return True
    except OSError:
        return False
    return False
