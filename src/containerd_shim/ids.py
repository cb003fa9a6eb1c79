"""containerd's identifier rule, stdlib-only so the per-container ``start`` can use it cheaply."""

from __future__ import annotations

__all__ = ["ID_RULE", "MAX_ID", "is_valid_id"]

# identifiers.Validate: ASCII alphanumerics separated by single '.', '_' or '-'.
ID_RULE = "^[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*$"
MAX_ID = 76
_SEPARATORS = frozenset("._-")


def is_valid_id(value: str) -> bool:
    """True if ``value`` matches :data:`ID_RULE` and is at most :data:`MAX_ID` long.

    Written out rather than as a regular expression: ``re`` costs ``start`` a few
    milliseconds of import for one check.
    """
    if not value or len(value) > MAX_ID or not value.isascii():
        return False
    after_separator = True  # no separator first, none doubled
    for ch in value:
        if ch.isalnum():
            after_separator = False
        elif ch in _SEPARATORS and not after_separator:
            after_separator = True
        else:
            return False
    return not after_separator
