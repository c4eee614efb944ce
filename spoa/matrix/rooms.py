"""Room IDs and aliases in request paths."""

from __future__ import annotations

import re

from .query import percent_decode

# The segment after the first /rooms/, /join/ or /knock/: a room ID
# (!opaque:domain, or !hash in room v12) or an alias (#alias:domain), raw or
# percent-encoded.
_ROOM_SEGMENT = re.compile(r"/(?:rooms|join|knock)/([^/]+)")


def room_from_path(path: str) -> str | None:
    """The room ID or alias in a path, percent-decoded exactly once.

    ``%21abc%3Aexample.org`` and ``!abc:example.org`` give the same value;
    ``%2521`` gives ``%21`` (decoded once, not twice). None when the path has
    no such segment.
    """
    found = _ROOM_SEGMENT.search(path)
    if found is None:
        return None
    return percent_decode(found.group(1))
