"""A bounded memo: a dict that empties itself rather than grow without end.

The hot paths keep what they computed for inputs that repeat (an address
HAProxy sends in every NOTIFY, the user inside a token, the rules that match
a path). Reads are plain ``dict.get``; only a miss pays for ``remember``.
Emptying the whole memo when it is full costs one miss per entry afterwards
and needs no bookkeeping per hit, which an LRU order would.
"""

from __future__ import annotations

from typing import TypeVar

#: Keys are strings or bytes (what the hot paths see, and what has a length
#: for ``max_key``), or integers (key hashes).
_K = TypeVar("_K", str, bytes, int)
_V = TypeVar("_V")


class Memo(dict[_K, _V]):
    """A dict of at most ``limit`` entries; a limit of 0 keeps nothing.

    With ``max_key``, a key longer than that is not kept: the memo's memory
    stays bounded by ``limit`` times ``max_key`` whatever the input.
    """

    __slots__ = ("limit", "max_key")

    def __init__(self, limit: int, max_key: int | None = None) -> None:
        super().__init__()
        if limit < 0:
            raise ValueError(f"memo limit must be 0 or more, not {limit}")
        if max_key is not None and max_key < 1:
            raise ValueError(f"memo key length must be 1 or more, not {max_key}")
        self.limit = limit
        self.max_key = max_key

    def remember(self, key: _K, value: _V) -> _V:
        """Keep ``value`` under ``key`` (emptying the memo first if full); return it."""
        if self.limit and (
            self.max_key is None or isinstance(key, int) or len(key) <= self.max_key
        ):
            if len(self) >= self.limit and key not in self:
                self.clear()
            self[key] = value
        return value
