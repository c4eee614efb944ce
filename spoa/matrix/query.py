"""Query strings as HAProxy's ``query`` fetch gives them: raw, without the ``?``."""

from __future__ import annotations

from urllib.parse import unquote


def percent_decode(text: str) -> str:
    """Decode %XX escapes exactly once; bad escapes stay as they are.

    Bytes that are not UTF-8 become surrogate escapes, so different inputs
    never decode to the same string.
    """
    if "%" not in text:
        return text
    return unquote(text, errors="surrogateescape")


def query_value(query: str | None, name: str) -> str | None:
    """The raw value of the first ``name=`` parameter, or None if absent.

    A parameter without ``=`` has the value ``""``. Names are compared after
    percent-decoding; the value is returned undecoded.
    """
    if not query or (name not in query and "%" not in query):
        return None
    for part in query.split("&"):
        key, _, value = part.partition("=")
        if key == name or ("%" in key and percent_decode(key) == name):
            return value
    return None


def has_value(query: str | None, name: str) -> bool:
    """Whether ``name`` is present with a non-empty value.

    ``?since=`` and ``?since`` count as absent, as in the Synapse docs'
    nginx example (``map $arg_since``: empty means initial sync).
    """
    return bool(query_value(query, name))
