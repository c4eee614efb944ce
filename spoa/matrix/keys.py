"""The canonical value each kind of key hashes on, taken from one request.

Each extractor returns ``(kind, value)``, where ``kind`` is the kind actually
used (a ``user`` key without a ``syt_`` token is a ``token`` key, an
``origin`` key without X-Matrix is a ``src`` key), or None when the request
has nothing to key on. docs/policy.md describes each value.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address
from typing import Final, Protocol

from .converters import Regsub
from .rooms import ROOM, room_from_path
from .tokens import BEARER, QUERY_TOKEN, access_token, syt_localpart
from .xmatrix import ESCAPE, ORIGIN, xmatrix_origin


class RequestParts(Protocol):
    """The parts of a request keys are taken from, raw as HAProxy sends them."""

    @property
    def path(self) -> str: ...

    @property
    def query(self) -> str | None: ...

    @property
    def auth(self) -> str | None: ...

    @property
    def src(self) -> str | IPv4Address | IPv6Address | None: ...


KeyExtractor = Callable[[RequestParts], tuple[str, str] | None]


def token_key(request: RequestParts) -> tuple[str, str] | None:
    """The access token itself."""
    token = access_token(request.auth, request.query)
    return ("token", token) if token else None


def user_key(request: RequestParts) -> tuple[str, str] | None:
    """The localpart inside a ``syt_`` token; any other token keys as itself."""
    token = access_token(request.auth, request.query)
    if not token:
        return None
    localpart = syt_localpart(token)
    return ("user", localpart) if localpart is not None else ("token", token)


def room_key(request: RequestParts) -> tuple[str, str] | None:
    """The room ID in the path, percent-decoded."""
    room = room_from_path(request.path)
    return ("room", room) if room else None


#: An IPv4-mapped IPv6 address as HAProxy writes it, to its IPv4 address.
#: Verbatim in haproxy.cfg.
MAPPED: Final = r"^::[Ff][Ff][Ff][Ff]:([0-9.]+)\Z"
_MAPPED: Final = Regsub(MAPPED, r"\1")


def src_key(request: RequestParts) -> tuple[str, str] | None:
    """The client address as HAProxy writes it (``inet_ntop``); an IPv4-mapped IPv6
    address keys as the IPv4 address it is."""
    src = request.src
    if src is None or src == "":
        return None
    if isinstance(src, IPv6Address):
        text = socket.inet_ntop(socket.AF_INET6, src.packed)
    else:
        text = str(src)
    return ("src", _MAPPED(text) if text[:2] == "::" else text)


def origin_key(request: RequestParts) -> tuple[str, str] | None:
    """The X-Matrix origin server; without one, the client address."""
    origin = xmatrix_origin(request.auth)
    if origin:
        return ("origin", origin)
    return src_key(request)


def uri_key(request: RequestParts) -> tuple[str, str] | None:
    """The raw path, with ``?`` and the raw query when the request has a ``?`` (HAProxy's
    ``pathq``: ``/a?`` keeps its ``?``)."""
    query = request.query
    return ("uri", f"{request.path}?{query}" if query is not None else request.path)


def no_key(request: RequestParts) -> tuple[str, str] | None:
    """Nothing: the request is not hashed."""
    return None


#: The extractor of each key kind, by the kind's name in a policy.
KEY_EXTRACTORS: Final[dict[str, KeyExtractor]] = {
    "token": token_key,
    "user": user_key,
    "room": room_key,
    "origin": origin_key,
    "uri": uri_key,
    "src": src_key,
    "none": no_key,
}


#: The regexes both engines compute keys with, by what they read: haproxy.cfg's
#: fallback lines hold each verbatim (spoa check --haproxy and a test compare).
NATIVE_REGEXES: Final[dict[str, str]] = {
    "bearer token": BEARER,
    "access_token parameter": QUERY_TOKEN,
    "room": ROOM,
    "X-Matrix origin": ORIGIN,
    "escape": ESCAPE,
    "IPv4-mapped address": MAPPED,
}
