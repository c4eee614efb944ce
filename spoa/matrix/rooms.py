"""Room IDs and aliases in request paths."""

from __future__ import annotations

from typing import Final

from .converters import Regsub, url_dec

#: The segment after the first /rooms/, /join/ or /knock/ of a path: a room ID
#: (!opaque:domain, or !hash in room v12) or an alias (#alias:domain), raw or
#: percent-encoded; empty when there is none. Verbatim in haproxy.cfg.
ROOM: Final = r"^(?:.*?/(?:rooms|join|knock)/([^/]+).*|.*)\Z"
_ROOM: Final = Regsub(ROOM, r"\1")


def room_from_path(path: str) -> str | None:
    """The room ID or alias in a path, percent-decoded exactly once.

    ``%21abc%3Aexample.org`` and ``!abc:example.org`` give the same value;
    ``%2521`` gives ``%21`` (decoded once, not twice); a segment with a bad
    escape is taken as it is. None when the path has no such segment.
    """
    if "/rooms/" not in path and "/join/" not in path and "/knock/" not in path:
        return None
    segment = _ROOM(path)
    if not segment:
        return None
    decoded = url_dec(segment)
    return segment if decoded is None else decoded
