"""Request metadata: string keys, each with one or more string values.

Mirrors Go ttrpc's ``MD``: keys given by the application are lower-cased;
keys received from the wire are kept exactly as sent (so a server can report
what arrived), and look-ups lower-case the key they are asked for.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, MutableMapping, Sequence

from ttrpc.ttrpc_pb2 import KeyValue

__all__ = ["Metadata", "MetadataInit"]


class Metadata(MutableMapping[str, list[str]]):
    """An ordered multimap of metadata.

    ``Metadata({"a": "1", "b": ["2", "3"]})`` or ``Metadata([("a", "1"), ("a", "2")])``.
    ``md["k"]`` is the list of values; :meth:`get_one` the first one.
    """

    __slots__ = ("_items",)

    def __init__(self, initial: MetadataInit | None = None) -> None:
        self._items: dict[str, list[str]] = {}
        if initial is None:
            return
        if isinstance(initial, Metadata):
            self._items = {k: list(v) for k, v in initial._items.items()}
        elif isinstance(initial, Mapping):
            for key, value in initial.items():
                if isinstance(value, str):
                    self.append(key, value)
                else:
                    self.append(key, *value)
        else:
            for key, value in initial:
                self.append(key, value)

    @classmethod
    def from_wire(cls, pairs: Iterable[KeyValue]) -> Metadata:
        """Metadata exactly as received: keys are not case-folded."""
        md = cls()
        items = md._items
        for kv in pairs:
            values = items.get(kv.key)
            if values is None:
                items[kv.key] = [kv.value]
            else:
                values.append(kv.value)
        return md

    def to_wire(self) -> list[KeyValue]:
        """One ``KeyValue`` per value, in insertion order."""
        return [KeyValue(key=k, value=v) for k, values in self._items.items() for v in values]

    def pairs(self) -> list[tuple[str, str]]:
        """Every ``(key, value)`` pair, in insertion order."""
        return [(k, v) for k, values in self._items.items() for v in values]

    def append(self, key: str, *values: str) -> None:
        """Add values to ``key`` (lower-cased), keeping those it has."""
        if not values:
            return
        key = key.lower()
        self._items.setdefault(key, []).extend(values)

    def set(self, key: str, *values: str) -> None:
        """Replace the values of ``key`` (lower-cased); no values deletes the key."""
        key = key.lower()
        if values:
            self._items[key] = list(values)
        else:
            self._items.pop(key, None)

    def get_one(self, key: str, default: str | None = None) -> str | None:
        """The first value of ``key``, or ``default``."""
        values = self._lookup(key)
        return values[0] if values else default

    def copy(self) -> Metadata:
        return Metadata(self)

    def _lookup(self, key: str) -> list[str] | None:
        values = self._items.get(key.lower())
        if values is None:
            values = self._items.get(key)
        return values

    def __getitem__(self, key: str) -> list[str]:
        values = self._lookup(key)
        if not values:
            raise KeyError(key)
        return values

    def __setitem__(self, key: str, value: list[str]) -> None:
        if isinstance(value, str):
            self.set(key, value)
        else:
            self.set(key, *value)

    def __delitem__(self, key: str) -> None:
        if key.lower() in self._items:
            del self._items[key.lower()]
        else:
            del self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Metadata({self._items!r})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Metadata):
            return self._items == other._items
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]


MetadataInit = Metadata | Mapping[str, str | Sequence[str]] | Iterable[tuple[str, str]]
"""What :class:`Metadata` and the call APIs accept as metadata."""
