"""The ``origin`` of ``Authorization: X-Matrix ...`` (Matrix server-server API).

Grammar (RFC 9110 11.4 as the Matrix spec applies it): the scheme, one or
more spaces, then comma-separated ``name=value`` pairs with optional spaces
and tabs around the commas. Names are case-insensitive and may come in any
order. Values are tokens or quoted strings with backslash escapes; the spec
asks recipients to accept ``:`` in unquoted values, so ``origin=host:8448``
is valid. An origin is a server name: a DNS name, an IPv4 address or an IPv6
literal in brackets, each optionally with a port.
"""

from __future__ import annotations

import re

_PARAM = re.compile(
    r"""[ \t]*
        ([!#$%&'*+.^_`|~0-9A-Za-z-]+)      # name (an RFC 9110 token)
        [ \t]*=[ \t]*
        (?:"((?:[^"\\]|\\.)*)"             # quoted value, with escapes
          |([^,"\s]*))                     # or a bare value (":" and "[]" allowed)
        [ \t]*(?:,|$)""",
    re.VERBOSE | re.DOTALL,
)
_ESCAPE = re.compile(r"\\(.)", re.DOTALL)


def xmatrix_origin(auth: str | None) -> str | None:
    """The origin server name, or None if the header is not a usable X-Matrix one.

    Parameters are read in order until ``origin`` is found, so a header cut
    short after its origin still gives it; a syntax error before it gives
    None.
    """
    if not auth or auth[:8].lower() != "x-matrix":
        return None
    pos = 8
    size = len(auth)
    if pos >= size or auth[pos] != " ":
        return None
    while pos < size and auth[pos] == " ":
        pos += 1
    while pos < size:
        found = _PARAM.match(auth, pos)
        if found is None:
            return None
        if found.group(1).lower() == "origin":
            quoted = found.group(2)
            if quoted is not None:
                value = _ESCAPE.sub(r"\1", quoted) if "\\" in quoted else quoted
            else:
                value = found.group(3)
            return value or None
        pos = found.end()
    return None
