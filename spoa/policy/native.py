"""A rule's path regex as HAProxy's PCRE reads it, inside the fallback's lookup string.

The fallback routes in HAProxy itself: one ``map_reg`` lookup over the
string ``<path> <method> <query>`` (single spaces; none of the three can hold
a raw space), every rule's path patterns, methods and query conditions
folded into one regex per pattern (:mod:`spoa.fallback`). The path comes
first, so a rule's ``^`` still means the start of the path; everything else
must stop where the path stops:

- ``.`` becomes ``[^\\x20]`` and a negated set gets ``\\x20`` added, so no
  part of a pattern can run past the path into the method or the query;
- ``$`` (and ``\\Z``) becomes ``(?=\\x20)``, the end of the path;
- capturing groups become non-capturing ones (map values never use them).

Python's ``re`` and PCRE agree on the rest of what is let through, the agent
matching in ASCII mode as PCRE does: literals, sets and ranges of ASCII
characters, ``.``, anchors, ``\\b``, ``\\d`` and ``\\w`` (ASCII), groups,
alternatives, greedy, lazy and possessive repeats, atomic groups,
lookarounds, and the flags ``i`` (ASCII letters only, in both), ``s``,
``m``, ``x``. Refused, with the reason: ``\\s`` and what matches a space,
which no path holds and the lookup string does between its parts; non-ASCII
characters in sets and ranges (characters in Python, bytes in PCRE); the
locale flag. A lone ``.`` or negated set facing a non-ASCII character of the
path matches one character in Python and one byte in PCRE: the one
difference left (docs/policy.md).
"""

from __future__ import annotations

import re
import re._constants as sre  # type: ignore[import-not-found]
import re._parser as sre_parse  # type: ignore[import-not-found]
from typing import Any, Final

#: ASCII punctuation that PCRE reads as a metacharacter somewhere: escaped
#: wherever it stands for itself.
_META: Final = frozenset("\\^$.|?*+()[]{}-#")
SEPARATOR: Final = "\\x20"


class NativeRegexError(ValueError):
    """A path regex HAProxy's PCRE would not read as Python's ``re`` does."""


def _char(code: int, in_set: bool = False) -> str:
    if code == 0x20 or code < 0x20 or code == 0x7F:
        raise NativeRegexError(f"a space or control character ({chr(code)!r}): no path holds one")
    if code >= 0x80:
        if in_set:
            raise NativeRegexError(
                f"the non-ASCII character {chr(code)!r} in a set: Python's sets hold "
                "characters, PCRE's bytes"
            )
        # Outside a set the character is its UTF-8 bytes in a row, as it
        # stands in the path HAProxy sees.
        return "".join(f"\\x{byte:02x}" for byte in chr(code).encode("utf-8"))
    char = chr(code)
    if char.isalnum() or char == "_":
        return char
    return "\\" + char if char in _META or not char.isprintable() else char


def _set(items: list[tuple[Any, Any]]) -> str:
    if len(items) == 1 and items[0][0] is sre.CATEGORY and items[0][1] in _ALONE:
        return _ALONE[items[0][1]]  # \\D, \\W, \\S: the parser makes them sets
    negated = False
    parts = []
    for op, value in items:
        if op is sre.NEGATE:
            negated = True
        elif op is sre.LITERAL:
            parts.append(_char(value, in_set=True))
        elif op is sre.RANGE:
            low, high = value
            if low <= 0x20 <= high:
                raise NativeRegexError(f"the range {chr(low)!r}-{chr(high)!r} holds a space")
            parts.append(f"{_char(low, in_set=True)}-{_char(high, in_set=True)}")
        elif op is sre.CATEGORY and value in _IN_SET:
            parts.append(_IN_SET[value])
        elif op is sre.CATEGORY:
            raise NativeRegexError(_CATEGORY_REASON)
        else:
            raise NativeRegexError(f"{str(op).lower()} in a set")
    if negated:
        return f"[^{''.join(parts)}{SEPARATOR}]"
    return f"[{''.join(parts)}]"


_CATEGORY_REASON: Final = (
    "\\s, and \\D, \\W, \\S in a set: they match a space, which no path holds "
    "and which separates the parts of the fallback's lookup string"
)
#: Categories as members of a set, and standing alone (the negated ones
#: kept from matching a space).
_IN_SET: Final = {sre.CATEGORY_DIGIT: "0-9", sre.CATEGORY_WORD: "A-Za-z0-9_"}
_ALONE: Final = {
    sre.CATEGORY_DIGIT: "[0-9]",
    sre.CATEGORY_WORD: "[A-Za-z0-9_]",
    sre.CATEGORY_NOT_DIGIT: f"[^0-9{SEPARATOR}]",
    sre.CATEGORY_NOT_WORD: f"[^A-Za-z0-9_{SEPARATOR}]",
    sre.CATEGORY_NOT_SPACE: "\\S",
}
#: Flags both engines read alike (the agent matches in ASCII mode).
_FLAGS: Final = {
    sre.SRE_FLAG_IGNORECASE: "i",
    sre.SRE_FLAG_DOTALL: "s",
    sre.SRE_FLAG_MULTILINE: "m",
    sre.SRE_FLAG_VERBOSE: "",
    sre.SRE_FLAG_ASCII: "",
    sre.SRE_FLAG_UNICODE: "",
}


def _flags(flags: int) -> str:
    """The PCRE letters of Python regex flags; NativeRegexError for the locale flag."""
    letters = ""
    for flag, letter in _FLAGS.items():
        if flags & flag:
            letters += letter
            flags &= ~flag
    if flags:
        raise NativeRegexError("the locale flag: no such thing in PCRE")
    return letters


#: Items that stand for one character (or one multi-byte literal, see below).
_ONE_CHARACTER: Final = (sre.LITERAL, sre.NOT_LITERAL, sre.ANY, sre.IN)


def _repeat(low: int, high: int) -> str:
    if high == sre.MAXREPEAT:
        return {0: "*", 1: "+"}.get(low, f"{{{low},}}")
    if (low, high) == (0, 1):
        return "?"
    return f"{{{low}}}" if low == high else f"{{{low},{high}}}"


def _emit(items: Any) -> str:
    out = []
    for op, value in items:
        if op is sre.LITERAL:
            out.append(_char(value))
        elif op is sre.NOT_LITERAL:
            out.append(f"[^{_char(value, in_set=True)}{SEPARATOR}]")
        elif op is sre.ANY:
            out.append(f"[^{SEPARATOR}]")
        elif op is sre.IN:
            out.append(_set(value))
        elif op is sre.AT:
            if value in (sre.AT_BEGINNING, sre.AT_BEGINNING_STRING):
                out.append("^")
            elif value in (sre.AT_END, sre.AT_END_STRING):
                out.append(f"(?={SEPARATOR})")
            elif value is sre.AT_BOUNDARY:
                out.append("\\b")
            elif value is sre.AT_NON_BOUNDARY:
                out.append("\\B")
            else:
                raise NativeRegexError(f"{str(value).lower()} is not supported by the fallback")
        elif op is sre.CATEGORY:
            if value not in _ALONE:
                raise NativeRegexError(_CATEGORY_REASON)
            out.append(_ALONE[value])
        elif op is sre.SUBPATTERN:
            _group, add_flags, del_flags, sub = value
            inner = _emit(sub)
            if add_flags or del_flags:
                removed = _flags(del_flags)
                out.append(f"(?{_flags(add_flags)}{'-' + removed if removed else ''}:{inner})")
                continue
            # A group around one alternation is that alternation's own group.
            single = len(sub) == 1 and sub[0][0] is sre.BRANCH
            out.append(inner if single else f"(?:{inner})")
        elif op is sre.BRANCH:
            out.append("(?:" + "|".join(_emit(branch) for branch in value[1]) + ")")
        elif op in (sre.MAX_REPEAT, sre.MIN_REPEAT, sre.POSSESSIVE_REPEAT):
            low, high, sub = value
            suffix = {sre.MIN_REPEAT: "?", sre.POSSESSIVE_REPEAT: "+"}.get(op, "")
            inner = _emit(sub)
            multibyte = sub[0][0] is sre.LITERAL and sub[0][1] >= 0x80
            if multibyte or not (len(sub) == 1 and sub[0][0] in _ONE_CHARACTER):
                inner = f"(?:{inner})"
            out.append(f"{inner}{_repeat(low, high)}{suffix}")
        elif op is sre.ATOMIC_GROUP:
            out.append(f"(?>{_emit(value)})")
        elif op in (sre.ASSERT, sre.ASSERT_NOT):
            direction, sub = value
            behind = "<" if direction < 0 else ""
            sign = "=" if op is sre.ASSERT else "!"
            out.append(f"(?{behind}{sign}{_emit(sub)})")
        else:
            raise NativeRegexError(f"{str(op).lower()} is not supported by the fallback")
    return "".join(out)


def path_regex(regex: str) -> str:
    """``regex`` (a rule's path pattern) as PCRE anchored at the start of the lookup
    string, matching within the path and nothing past it.

    A pattern not anchored with ``^`` is searched anywhere in the path, as the
    agent searches it. NativeRegexError says why a pattern cannot be followed.
    """
    try:
        parsed = sre_parse.parse(regex)
    except re.error as exc:
        raise NativeRegexError(str(exc)) from None
    flags = _flags(parsed.state.flags)
    items = list(parsed)
    body = _emit(items)
    if flags:
        body = f"(?{flags}:{body})"
    if items and items[0] == (sre.AT, sre.AT_BEGINNING):
        return body if not flags else f"^{body}"
    # Unanchored: the match may start anywhere in the path (never past it).
    return f"^[^{SEPARATOR}]*?(?:{body})"
