"""The ``origin`` of ``Authorization: X-Matrix ...`` (Matrix server-server API).

Grammar (RFC 9110 11.4 as the Matrix spec applies it): the scheme, one or
more spaces, then comma-separated ``name=value`` pairs with optional spaces
and tabs around the commas. Names are case-insensitive and may come in any
order. Values are tokens or quoted strings with backslash escapes; the spec
asks recipients to accept ``:`` in unquoted values, so ``origin=host:8448``
is valid. An origin is a server name: a DNS name, an IPv4 address or an IPv6
literal in brackets, each optionally with a port.

One regex reads it, the same in the agent and, verbatim, in haproxy.cfg's
fallback: the parameters before the first one named ``origin`` must be well
formed, and its value (quoted or bare) is captured; then backslash escapes
are undone.
"""

from __future__ import annotations

from typing import Final

from .converters import Regsub

_NAME: Final = r"[!#\x24%&\x27*+.^_`|~0-9A-Za-z-]+"
_QUOTED: Final = r"\x22((?:[^\x22\x5c]|\x5c.)*)\x22"
_BARE: Final = r"([^,\x22\x20\t\r\n\f\x0b]*)"
_ORIGIN_NAME: Final = r"[Oo][Rr][Ii][Gg][Ii][Nn][\x20\t]*="
_OTHER: Final = (
    rf"[\x20\t]*(?!{_ORIGIN_NAME}){_NAME}[\x20\t]*=[\x20\t]*"
    r"(?:\x22(?:[^\x22\x5c]|\x5c.)*\x22|[^,\x22\x20\t\r\n\f\x0b]*)[\x20\t]*,"
)
#: The origin's value, quoted (group 1) or bare (group 2); empty for a header
#: that is not X-Matrix or has no well-formed origin. Verbatim in haproxy.cfg.
ORIGIN: Final = (
    rf"^(?:[Xx]-[Mm][Aa][Tt][Rr][Ii][Xx]\x20+(?:{_OTHER})*[\x20\t]*{_ORIGIN_NAME}[\x20\t]*"
    rf"(?:{_QUOTED}|{_BARE})[\x20\t]*(?:,.*)?|.*)\Z"
)
#: A backslash escape, undone (``\\x`` gives ``x``). Verbatim in haproxy.cfg.
ESCAPE: Final = r"\x5c(.)"

_ORIGIN: Final = Regsub(ORIGIN, r"\1\2")
_ESCAPE: Final = Regsub(ESCAPE, r"\1", every=True)


def xmatrix_origin(auth: str | None) -> str | None:
    """The origin server name, or None if the header is not a usable X-Matrix one.

    Parameters are read in order until ``origin`` is found, so a header cut
    short after its origin still gives it; a syntax error before it gives
    None. Escapes are undone in a quoted or a bare value alike.
    """
    if not auth or auth[:8].lower() != "x-matrix":
        return None
    value = _ORIGIN(auth)
    if "\\" in value:
        value = _ESCAPE(value)
    return value or None
