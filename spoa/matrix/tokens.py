"""Access tokens and the user they name.

Synapse takes the token from ``Authorization: Bearer <token>`` or, deprecated
since Matrix v1.11, from the ``access_token`` query parameter. Tokens Synapse
issues look like ``syt_<unpadded base64 of the localpart>_<random>_<crc>``,
which names the user without any lookup; every other kind (MAS ``mat_``,
macaroons, appservice tokens) is opaque.
"""

from __future__ import annotations

import binascii

from ..memo import Memo
from .query import percent_decode, query_value

#: The localpart (or None) of each ``syt_`` token seen: clients send the same
#: token with every request. Synapse's tokens are well under 256 characters;
#: longer ones are decoded each time, so a flood of them cannot fill memory.
_SYT_LOCALPARTS: Memo[str, str | None] = Memo(65536, max_key=256)


def access_token(auth: str | None, query: str | None) -> str | None:
    """The access token: the Bearer header first, ``?access_token=`` second."""
    if auth and auth[:7].lower() == "bearer ":
        token = auth[7:].strip(" \t")
        if token:
            return token
    if query and "access_token" in query:
        value = query_value(query, "access_token")
        if value:
            return percent_decode(value)
    return None


def syt_localpart(token: str) -> str | None:
    """The user localpart inside a ``syt_`` token, or None for any other token."""
    if not token.startswith("syt_"):
        return None
    cached = _SYT_LOCALPARTS.get(token)
    if cached is not None or token in _SYT_LOCALPARTS:
        return cached
    return _SYT_LOCALPARTS.remember(token, _decode_syt(token))


def _decode_syt(token: str) -> str | None:
    parts = token.split("_")
    if len(parts) < 3 or not parts[1]:
        return None
    encoded = parts[1]
    try:
        raw = binascii.a2b_base64(
            (encoded + "=" * (-len(encoded) % 4)).encode("ascii"), strict_mode=True
        )
        localpart = raw.decode("utf-8")
    except (ValueError, UnicodeError):
        return None
    return localpart or None
