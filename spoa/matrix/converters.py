"""HAProxy's converters that keys are computed with, byte for byte in Python.

The fallback computes a request's key inside HAProxy (``url_dec``,
``ub64dec``, ``regsub``, ``xxh32``, ...: the lines of haproxy.cfg); the
agent computes it here, with the same operations, so that both engines give
every request the same key. Each function follows the C code of HAProxy 2.6
to 3.4 (``url_decode`` in src/tools.c, ``base64urldec`` in src/base64.c, the
BIN to STR cast in src/sample.c), quirks included, and says so where it
differs from what Python's standard library would do.

Strings here are what the agent receives from HAProxy: text whose bytes
that are not UTF-8 are surrogate escapes, so that ``text.encode("utf-8",
"surrogateescape")`` gives back HAProxy's bytes.
"""

from __future__ import annotations

import re
import re._constants as sre  # type: ignore[import-not-found]
import re._parser as sre_parse  # type: ignore[import-not-found]
from typing import Final
from urllib.parse import unquote_to_bytes

import xxhash

#: A ``%`` not followed by two hex digits: ``url_dec`` fails on it.
_BAD_ESCAPE: Final = re.compile(rb"%(?![0-9A-Fa-f]{2})")
_HEX: Final = frozenset("0123456789abcdefABCDEF")

#: base64url's values by character, from HAProxy's ubase64rev table: "-" is
#: 62, "_" 63, and "=" 63 as well (HAProxy's table, not base64's).
_ALPHABET: Final = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
_UB64: Final[dict[str, int]] = {
    **{c: i for i, c in enumerate(_ALPHABET)},
    "-": 62,
    "_": 63,
    "=": 63,
}


def to_bytes(text: str) -> bytes:
    """HAProxy's bytes of a string the agent received."""
    return text.encode("utf-8", "surrogateescape")


def to_text(raw: bytes) -> str:
    """Bytes from a converter as the agent's strings hold them."""
    return raw.decode("utf-8", "surrogateescape")


class Regsub:
    """``regsub(regex,replacement[,g])``, made once: called with a string, the first match
    (``every``: each match, the ``g`` flag) replaced, the input unchanged when nothing
    matches. The regexes given to it here are written so that Python and PCRE read
    them alike (``\\xHH`` for quotes, backslashes, spaces and dollars, ``\\Z`` for the
    end: they stand verbatim in haproxy.cfg)."""

    __slots__ = ("_count", "_groups", "regex", "replacement")

    def __init__(self, pattern: str | re.Pattern[str], replacement: str, every: bool = False):
        self.regex = re.compile(pattern)
        self.replacement = replacement
        self._count = 0 if every else 1
        self._groups = None if every else _whole_match_groups(self.regex, replacement)

    def __call__(self, text: str) -> str:
        groups = self._groups
        if groups is not None:
            # The regex matches the whole input or nothing: the answer is its
            # groups, without sub()'s template expansion (the hot path).
            found = self.regex.match(text)
            if found is None:
                return text
            if len(groups) == 1:
                return found.group(groups[0]) or ""
            return "".join(found.group(g) or "" for g in groups)
        return self.regex.sub(self.replacement, text, count=self._count)


_GROUPS: Final = re.compile(r"(?:\\[1-9])+\Z")


def _whole_match_groups(regex: re.Pattern[str], replacement: str) -> tuple[int, ...] | None:
    """The groups ``replacement`` names (``\\1\\2``), when ``regex`` is anchored at both
    ends (``^...\\Z``, no multi-line flag): then its one possible match is the whole
    input, which sub() replaces by those groups. None for any other regex."""
    items = list(sre_parse.parse(regex.pattern, regex.flags))
    anchored = (
        len(items) >= 2
        and items[0] == (sre.AT, sre.AT_BEGINNING)
        and items[-1] == (sre.AT, sre.AT_END_STRING)
        and not regex.flags & re.MULTILINE
        and _GROUPS.match(replacement) is not None
    )
    return tuple(int(d) for d in replacement[1::2]) if anchored else None


def url_dec(text: str) -> str | None:
    """``url_dec``: each ``%XX`` decoded once; None (the converter fails) on a ``%`` not
    followed by two hex digits. A ``+`` after a ``?`` of the input becomes a space
    (HAProxy reads what follows a ``?`` as a query string); one before stays."""
    if "%" not in text and "+" not in text and "\x00" not in text:
        return text
    raw = to_bytes(text)
    if b"+" not in raw and b"\x00" not in raw:
        # Escapes only (room IDs, tokens): the byte loop below, in C.
        if _BAD_ESCAPE.search(raw):
            return None
        return to_text(unquote_to_bytes(raw))
    out = bytearray()
    in_form = False
    i, size = 0, len(raw)
    while i < size:
        byte = raw[i]
        if byte == 0:  # the C string ends here
            break
        if byte == 0x25:  # %
            pair = raw[i + 1 : i + 3]
            if len(pair) < 2 or not all(chr(b) in _HEX for b in pair):
                return None
            out.append(int(pair, 16))
            i += 3
            continue
        if byte == 0x2B:  # +
            out.append(0x20 if in_form else byte)
        else:
            if byte == 0x3F:  # ?
                in_form = True
            out.append(byte)
        i += 1
    return to_text(bytes(out))


def ub64dec(text: str) -> bytes | None:
    """``ub64dec``: base64url without padding, as HAProxy's table reads it; None on a
    character outside it or a length of 4n+1. Trailing bits are dropped."""
    if len(text) % 4 == 1:
        return None
    values = []
    for char in text:
        value = _UB64.get(char)
        if value is None:
            return None
        values.append(value)
    out = bytearray()
    for start in range(0, len(values), 4):
        group = values[start : start + 4]
        group += [0] * (4 - len(group))
        number = (group[0] << 18) | (group[1] << 12) | (group[2] << 6) | group[3]
        out += number.to_bytes(3, "big")
    return bytes(out[: len(values) * 3 // 4])


def bin_to_str(raw: bytes) -> bytes:
    """The cast HAProxy makes from binary to a string: cut at the first NUL byte."""
    end = raw.find(0)
    return raw if end < 0 else raw[:end]


def xxh32(raw: bytes) -> int:
    """``xxh32``: XXH32 with seed 0, an unsigned 32-bit integer."""
    return xxhash.xxh32_intdigest(raw)
