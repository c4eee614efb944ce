"""Access tokens and the user they name.

Synapse takes the token from ``Authorization: Bearer <token>`` or, deprecated
since Matrix v1.11, from the ``access_token`` query parameter. Tokens Synapse
issues look like ``syt_<unpadded base64 of the localpart>_<random>_<crc>``,
which names the user without any lookup; every other kind (MAS ``mat_``,
macaroons, appservice tokens) is opaque.

Both engines read them alike: the agent here, HAProxy's fallback with the
regexes below verbatim in haproxy.cfg (:mod:`spoa.matrix.converters`).
"""

from __future__ import annotations

from typing import Final

from ..memo import Memo
from .converters import Regsub, bin_to_str, to_text, ub64dec, url_dec

#: The token of ``Authorization: Bearer <token>`` (the scheme in any case, one
#: space, then spaces and tabs skipped); empty for any other header.
BEARER: Final = r"^(?:[Bb][Ee][Aa][Rr][Ee][Rr]\x20[\x20\t]*(.*)|.*)\Z"
#: The raw value of the first ``access_token`` parameter of a query string
#: (empty if it has none, or none with ``=``).
QUERY_TOKEN: Final = r"^(?:(?:(?!access_token(?:[=&]|\Z))[^&]*&)*access_token=([^&]*).*|.*)\Z"

_BEARER: Final = Regsub(BEARER, r"\1")
_QUERY_TOKEN: Final = Regsub(QUERY_TOKEN, r"\1")

#: The localpart (or None) of each ``syt_`` token seen: clients send the same
#: token with every request. Synapse's tokens are well under 256 characters;
#: longer ones are decoded each time, so a flood of them cannot fill memory.
_SYT_LOCALPARTS: Memo[str, str | None] = Memo(65536, max_key=256)


#: The token of each Authorization header seen, for the same reason and with
#: the same bounds.
_BEARER_TOKENS: Memo[str, str] = Memo(65536, max_key=256)


def access_token(auth: str | None, query: str | None) -> str | None:
    """The access token: the Bearer header first, ``?access_token=`` second (decoded
    once, or raw if it holds a bad escape)."""
    if auth:
        token = _BEARER_TOKENS.get(auth)
        if token is None:
            token = _BEARER_TOKENS.remember(auth, _BEARER(auth))
        if token:
            return token
    if query and "access_token" in query:
        value = _QUERY_TOKEN(query)
        if value:
            decoded = url_dec(value)
            return value if decoded is None else decoded
    return None


def syt_localpart(token: str) -> str | None:
    """The user localpart inside a ``syt_`` token, or None for any other token.

    The localpart is the text between the first and the second ``_``,
    base64url-decoded as HAProxy's ``ub64dec`` does and cut at a NUL byte;
    None when it does not decode. Synapse's base64 of an ASCII localpart has
    neither ``+`` nor ``/``, so its tokens decode alike in both alphabets.
    """
    if not token.startswith("syt_"):
        return None
    cached = _SYT_LOCALPARTS.get(token)
    if cached is not None or token in _SYT_LOCALPARTS:
        return cached
    return _SYT_LOCALPARTS.remember(token, _decode_syt(token))


def _decode_syt(token: str) -> str | None:
    raw = ub64dec(token.split("_", 2)[1])
    return None if raw is None else to_text(bin_to_str(raw))
