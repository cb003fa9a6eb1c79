"""Parsing of option values: Go-style durations and ``key=value`` metadata."""

from __future__ import annotations

import re
from collections.abc import Iterable

from ttrpc.metadata import Metadata

__all__ = ["NAMESPACE_KEY", "parse_duration", "parse_metadata"]

# The metadata key containerd puts its namespace under on ttrpc calls
# (github.com/containerd/containerd/namespaces: TTRPCHeader).
NAMESPACE_KEY = "containerd-namespace-ttrpc"

_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,  # U+00B5 micro sign, as Go accepts
    "μs": 1e-6,  # U+03BC greek mu
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_NUMBER = re.compile(r"\d+(?:\.\d*)?|\.\d+")


def parse_duration(text: str) -> float:
    """Seconds in a Go duration: ``5s``, ``250ms``, ``1m30s``, ``1.5h``; a bare number is seconds.

    Raises :class:`ValueError` for anything else, including negative durations.
    """
    value = text.strip()
    if _NUMBER.fullmatch(value):
        return float(value)
    total = 0.0
    pos = 0
    while pos < len(value):
        match = _PART.match(value, pos)
        if match is None:
            raise ValueError(
                f"invalid duration {text!r}: expected e.g. 5s, 500ms, 1m30s (units: ns us ms s m h)"
            )
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if pos == 0:
        raise ValueError(f"invalid duration {text!r}: empty")
    return total


def parse_metadata(pairs: Iterable[str], namespace: str | None = None) -> Metadata:
    """Metadata from ``key=value`` strings (a key may repeat); ``namespace`` adds containerd's key.

    Raises :class:`ValueError` for a pair without ``=`` or with an empty key.
    """
    md = Metadata()
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"invalid metadata {pair!r}: expected KEY=VALUE")
        md.append(key, value)
    if namespace is not None:
        md.set(NAMESPACE_KEY, namespace)
    return md
