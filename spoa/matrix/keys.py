"""The canonical value each kind of key hashes on, taken from one request.

Each extractor returns ``(kind, value)``, where ``kind`` is the kind actually
used (a ``user`` key without a ``syt_`` token is a ``token`` key, an
``origin`` key without X-Matrix is a ``src`` key), or None when the request
has nothing to key on. docs/policy.md describes each value.
"""

from __future__ import annotations

from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address
from typing import Final, Protocol

from .rooms import room_from_path
from .tokens import access_token, syt_localpart
from .xmatrix import xmatrix_origin


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
    return ("user", localpart) if localpart else ("token", token)


def room_key(request: RequestParts) -> tuple[str, str] | None:
    """The room ID in the path, percent-decoded."""
    room = room_from_path(request.path)
    return ("room", room) if room else None


def src_key(request: RequestParts) -> tuple[str, str] | None:
    """The client address; an IPv4-mapped IPv6 address keys as its IPv4 address."""
    src = request.src
    if src is None or src == "":
        return None
    if isinstance(src, IPv6Address):
        # An IPv4 client on a dual-stack listener arrives IPv4-mapped: key it
        # as the IPv4 address it is (Python versions print mapped addresses
        # differently; the Lua fallback does the same).
        mapped = src.ipv4_mapped
        return ("src", str(mapped if mapped is not None else src))
    if isinstance(src, str) and src[:7].lower() == "::ffff:" and "." in src:
        return ("src", src[7:])
    return ("src", str(src))


def origin_key(request: RequestParts) -> tuple[str, str] | None:
    """The X-Matrix origin server; without one, the client address."""
    origin = xmatrix_origin(request.auth)
    if origin:
        return ("origin", origin)
    return src_key(request)


def uri_key(request: RequestParts) -> tuple[str, str] | None:
    """The raw path, with ``?`` and the raw query when there is one."""
    query = request.query
    return ("uri", f"{request.path}?{query}" if query else request.path)


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
