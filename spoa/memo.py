"""A bounded memo: a dict that empties itself rather than grow without end.

The hot paths keep what they computed for inputs that repeat (an address
HAProxy sends in every NOTIFY, the user inside a token, the rules that match
a path). Reads are plain ``dict.get``; only a miss pays for ``remember``.
Emptying the whole memo when it is full costs one miss per entry afterwards
and needs no bookkeeping per hit, which an LRU order would.
"""

from __future__ import annotations

from typing import TypeVar

_K = TypeVar("_K")
_V = TypeVar("_V")


class Memo(dict[_K, _V]):
    """A dict of at most ``limit`` entries; a limit of 0 keeps nothing."""

    __slots__ = ("limit",)

    def __init__(self, limit: int) -> None:
        super().__init__()
        if limit < 0:
            raise ValueError(f"memo limit must be 0 or more, not {limit}")
        self.limit = limit

    def remember(self, key: _K, value: _V) -> _V:
        """Keep ``value`` under ``key`` (emptying the memo first if full); return it."""
        if self.limit:
            if len(self) >= self.limit and key not in self:
                self.clear()
            self[key] = value
        return value
