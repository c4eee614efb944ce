"""The Lua fallback's routing table, generated from a policy.

When the agent gives no answer, ``lua/matrix_fallback.lua`` routes. It must
route as the agent's policy does, rule for rule, so its table is never written
by hand: :func:`fallback_table` produces it from the compiled policy, the agent
writes it whenever it loads a policy (``spoa serve --fallback-table``) and
``spoa fallback`` writes it offline. The Lua reads the file when HAProxy starts
and again whenever its content changes.

Lua has no regular expressions, only patterns. The rules' regexes are parsed
with Python's own regex parser (so they mean what they mean to the agent) and
rewritten as Lua patterns: literals, ``.``, character sets, ``*`` ``+`` ``?``
on one of those, ``^`` and ``$``, and groups with alternatives, which become
one pattern per combination. Anything else (``\\d``, case-insensitive flags,
repeated groups, lookarounds, ...) raises :class:`UntranslatableError`, naming the
rule: the policy is still good for the agent, but no fallback can follow it.

Where Python matches one character, a Lua pattern matches one byte. The two
differ only for a lone ``.`` or negated set, unrepeated or with ``?``, facing a
non-ASCII character; ``[^/]+``, ``.*`` and every literal match the same.

The table format, one record per line, fields separated by one space::

    matrix-spoa-fallback 1
    policy <name> <version>
    seed <seed>
    default <class> <key kind>
    rule <name> <class> <key kind> <methods|-> <present|-> <absent|->
    path <Lua pattern>
    end

``methods``, ``present`` and ``absent`` are comma-separated lists. The final
``end`` tells a whole file from a truncated one.
"""

from __future__ import annotations

import logging
import os
import re
import re._constants as sre  # type: ignore[import-not-found]
import re._parser as sre_parse  # type: ignore[import-not-found]
import tempfile
from pathlib import Path
from typing import Any, Final

from .policy import CompiledPolicy

log = logging.getLogger("spoa.fallback")

FORMAT: Final = "matrix-spoa-fallback 1"
#: Combinations of alternatives one regex may expand to.
MAX_EXPANSIONS: Final = 512
#: Characters with a meaning in Lua patterns, escaped with "%" when literal.
_LUA_MAGIC: Final = frozenset("^$()%.[]*+-?")


class UntranslatableError(ValueError):
    """A rule's regex has no exact Lua pattern equivalent."""


def _literal(code: int, where: str) -> str:
    char = chr(code)
    if code >= 0x80:
        raise UntranslatableError(f"{where}: non-ASCII character {char!r}")
    if code < 0x20 or code == 0x7F or char == " ":
        raise UntranslatableError(f"{where}: control or space character {char!r}")
    return "%" + char if char in _LUA_MAGIC else char


def _set_member(code: int, where: str) -> str:
    char = chr(code)
    if code >= 0x80 or code < 0x21 or code == 0x7F:
        raise UntranslatableError(f"{where}: character {char!r} in a set")
    return "%" + char if char in "%]-^[" else char


def _char_set(items: list[tuple[Any, Any]], where: str) -> str:
    negate = ""
    parts = []
    for op, value in items:
        if op is sre.NEGATE:
            negate = "^"
        elif op is sre.LITERAL:
            parts.append(_set_member(value, where))
        elif op is sre.RANGE:
            low, high = value
            parts.append(f"{_set_member(low, where)}-{_set_member(high, where)}")
        elif op is sre.CATEGORY:
            raise UntranslatableError(
                f"{where}: \\d, \\w and \\s have no Lua equivalent (Lua's are ASCII only)"
            )
        else:
            raise UntranslatableError(f"{where}: {str(op).lower()} in a set has no Lua equivalent")
    return f"[{negate}{''.join(parts)}]"


def _single(op: Any, value: Any, where: str) -> str | None:
    """A Lua single-character item, or None if this is not one."""
    if op is sre.LITERAL:
        return _literal(value, where)
    if op is sre.NOT_LITERAL:
        return f"[^{_set_member(value, where)}]"
    if op is sre.ANY:
        return "."
    if op is sre.IN:
        return _char_set(value, where)
    return None


def _product(prefixes: list[str], suffixes: list[str], where: str) -> list[str]:
    if len(prefixes) * len(suffixes) > MAX_EXPANSIONS:
        raise UntranslatableError(f"{where}: more than {MAX_EXPANSIONS} combinations")
    return [p + s for p in prefixes for s in suffixes]


# Anchors are kept as markers while expanding and checked once a pattern is whole.
_BEGIN, _END = "\x01", "\x02"


def _expand(items: Any, where: str) -> list[str]:
    """Every combination of alternatives of a parsed regex, as Lua item strings."""
    results = [""]
    for op, value in items:
        single = _single(op, value, where)
        if single is not None:
            results = [r + single for r in results]
        elif op is sre.AT:
            if value in (sre.AT_BEGINNING, sre.AT_BEGINNING_STRING):
                results = [r + _BEGIN for r in results]
            elif value in (sre.AT_END, sre.AT_END_STRING):
                results = [r + _END for r in results]
            else:
                raise UntranslatableError(f"{where}: {value} has no Lua equivalent")
        elif op is sre.SUBPATTERN:
            _group, add_flags, del_flags, sub = value
            if add_flags or del_flags:
                raise UntranslatableError(f"{where}: inline flags have no Lua equivalent")
            results = _product(results, _expand(sub, where), where)
        elif op is sre.BRANCH:
            alternatives: list[str] = []
            for branch in value[1]:
                alternatives += _expand(branch, where)
            results = _product(results, alternatives, where)
        elif op in (sre.MAX_REPEAT, sre.MIN_REPEAT):
            # Greedy or lazy: the same strings match a whole pattern.
            low, high, sub = value
            results = _product(results, _repeat(low, high, sub, where), where)
        else:
            raise UntranslatableError(f"{where}: {str(op).lower()} has no Lua equivalent")
    return results


def _repeat(low: int, high: int, sub: Any, where: str) -> list[str]:
    single = _single(sub[0][0], sub[0][1], where) if len(sub) == 1 else None
    if single is not None:
        if (low, high) == (0, sre.MAXREPEAT):
            return [single + "*"]
        if (low, high) == (1, sre.MAXREPEAT):
            return [single + "+"]
        if high != sre.MAXREPEAT and high <= 16:
            return [single * low + (single + "?") * (high - low)]
        if high == sre.MAXREPEAT and 1 < low <= 16:
            return [single * (low - 1) + single + "+"]
        raise UntranslatableError(f"{where}: repeat {{{low},{high}}} is too wide")
    if (low, high) == (0, 1):
        return ["", *_expand(sub, where)]
    raise UntranslatableError(f"{where}: a repeated group has no Lua equivalent")


def lua_patterns(regex: str, where: str = "pattern") -> list[str]:
    """The Lua patterns that together match exactly what ``regex`` matches at a path's start.

    A regex not anchored with ``^`` is searched anywhere in the path, as the
    agent does; so is the Lua pattern, which then has no ``^``.
    """
    try:
        parsed = sre_parse.parse(regex)
    except re.error as error:
        raise UntranslatableError(f"{where}: {error}") from None
    if parsed.state.flags & ~(sre.SRE_FLAG_UNICODE):
        raise UntranslatableError(f"{where}: flags have no Lua equivalent")
    patterns = []
    for expanded in _expand(parsed, where):
        begins = expanded.startswith(_BEGIN)
        body = expanded.lstrip(_BEGIN)
        ends = body.endswith(_END)
        body = body.rstrip(_END)
        if _BEGIN in body or _END in body:
            # "^" or "$" inside: an alternative that can never match is
            # dropped; one that could (an empty one beside) is not supported.
            raise UntranslatableError(f"{where}: an anchor inside the pattern")
        patterns.append(("^" if begins else "") + body + ("$" if ends else ""))
    return patterns


def fallback_table(policy: CompiledPolicy) -> str:
    """The fallback's table for ``policy``; UntranslatableError for a rule it cannot follow."""
    lines = [
        FORMAT,
        f"policy {policy.spec.name} {policy.version}",
        f"seed {policy.seed}",
        f"default {policy.default.worker_class} {policy.default.key.value}",
    ]
    for rule in policy.rules:
        spec = rule.spec
        assert spec is not None
        methods = ",".join(sorted(spec.methods)) if spec.methods else "-"
        present = ",".join(spec.query_present) or "-"
        absent = ",".join(spec.query_absent) or "-"
        for name in (*spec.query_present, *spec.query_absent):
            if not name or any(c in name for c in " ,\t\r\n"):
                raise UntranslatableError(f"rule {rule.name}: query parameter {name!r}")
        lines.append(
            f"rule {rule.name} {rule.worker_class} {rule.key.value} {methods} {present} {absent}"
        )
        for index, regex in enumerate(spec.paths):
            where = f"rule {rule.name}, path {index + 1} ({regex!r})"
            lines += [f"path {pattern}" for pattern in lua_patterns(regex, where)]
    lines.append("end")
    return "\n".join(lines) + "\n"


def write_table(path: str | os.PathLike[str], text: str) -> bool:
    """Write the table atomically (a reader sees the old or the new file); False if unchanged."""
    target = Path(path)
    try:
        if target.read_text() == text:
            return False
    except (OSError, UnicodeDecodeError):
        pass
    handle, temporary = tempfile.mkstemp(prefix=".fallback-", dir=target.parent)
    try:
        with os.fdopen(handle, "w") as out:
            out.write(text)
        os.chmod(temporary, 0o644)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return True


def table_version(text: str) -> str | None:
    """The policy version a table was generated from, or None if it is no table."""
    lines = text.splitlines()
    if len(lines) < 2 or lines[0] != FORMAT or lines[-1] != "end":
        return None
    fields = lines[1].split(" ")
    return fields[2] if len(fields) == 3 and fields[0] == "policy" else None


def publish(policy: CompiledPolicy, path: str | os.PathLike[str]) -> bool:
    """Write ``policy``'s table to ``path`` for the fallback; False (logged) if it cannot be.

    The agent calls this for every policy it loads. A table that cannot be
    made or written leaves the previous file in place, and says so.
    """
    try:
        text = fallback_table(policy)
    except UntranslatableError as exc:
        log.error(
            "fallback table %s not updated: the Lua fallback cannot follow policy version %s: %s",
            path,
            policy.version,
            exc,
        )
        return False
    try:
        changed = write_table(path, text)
    except OSError as exc:
        log.error("fallback table %s not updated: %s", path, exc.strerror or exc)
        return False
    if changed:
        log.info("fallback table %s written for policy version %s", path, policy.version)
    return True
