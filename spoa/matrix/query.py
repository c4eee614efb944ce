"""Query strings as HAProxy's ``query`` fetch gives them: raw, without the ``?``."""

from __future__ import annotations


def query_value(query: str | None, name: str) -> str | None:
    """The raw value of the first ``name`` parameter (``&``-separated), or None if absent.

    A parameter without ``=`` has the value ``""``. Names are compared as sent,
    undecoded, as the fallback's map compares them; the value is returned
    undecoded.
    """
    if not query or name not in query:
        return None
    for part in query.split("&"):
        key, _, value = part.partition("=")
        if key == name:
            return value
    return None


def has_value(query: str | None, name: str) -> bool:
    """Whether ``name`` is present with a non-empty value.

    ``?since=`` and ``?since`` count as absent, as in the Synapse docs'
    nginx example (``map $arg_since``: empty means initial sync).
    """
    return bool(query_value(query, name))
