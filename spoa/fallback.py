"""The fail-open fallback: the policy compiled into one HAProxy map.

When the agent gives no answer, HAProxy routes by itself, natively, by the
same policy: ``haproxy.cfg`` looks the string ``<path> <method> <query>`` up
in a ``map_reg`` map made from the compiled policy, and computes the key
from the request with a fixed set of converters, one line per key kind,
with the hash the agent uses (``xxh32`` of the key's source and the
policy's salt). Nothing of the policy is written twice by hand: this module
makes the map, the agent writes it for every policy it loads (``spoa serve
--fallback-map``) and pushes it into the running HAProxy (:mod:`spoa.haproxyapi`),
and ``spoa fallback`` writes it offline.

One map entry per path pattern of every rule, in the policy's order (HAProxy
tries a ``map_reg`` map's regexes in order and takes the first that
matches), then one matching everything for the policy's default::

    # matrix-spoa fallback map 2: policy synapse-workers 3f2a9c0d1e2b
    ^/_matrix/client/(?:r0|v3)/sync(?=\\x20)[^\\x20]*\\x20[^\\x20]*\\x20(?=...) \\
        synchrotron 2 #0 3f2a9c0d1e2b sync
    ...
    ^ main 0 #0 3f2a9c0d1e2b default

(one entry a line; the first is cut here).

A key (the regex) is the rule's path pattern as PCRE reads it within the
path (:mod:`spoa.policy.native`), then, for a rule with conditions, the
methods and the query conditions (a parameter present with a value, or
not). A value is the class, the key kind (a number, :data:`KIND_CODES`), the
key salt, the policy version and the rule, separated by spaces: haproxy.cfg
reads the short fields from the front and the rule from the back, and tests
the kind with integer matches, the cheapest HAProxy has.
HAProxy's map files hold a key, spaces, a value and nothing else on a line,
and ``#`` starts a comment: a key never holds a space (``\\x20`` stands
for one) and never starts with ``#``.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Final

from .policy import CompiledPolicy, KeyKind
from .policy.compiled import key_salt
from .policy.native import SEPARATOR, path_regex

log = logging.getLogger("spoa.fallback")

FORMAT: Final = "matrix-spoa fallback map 2"

#: The key kinds as the map gives them; haproxy.cfg's key lines test these
#: numbers (a test holds the two equal). Kinds that share lines are neighbours,
#: so one range test covers them: token and user, origin and src.
KIND_CODES: Final[dict[KeyKind, int]] = {
    KeyKind.NONE: 0,
    KeyKind.TOKEN: 1,
    KeyKind.USER: 2,
    KeyKind.ROOM: 3,
    KeyKind.ORIGIN: 4,
    KeyKind.SRC: 5,
    KeyKind.URI: 6,
}
_HEADER: Final = re.compile(rf"^# {FORMAT}: policy (\S+) ([0-9a-f]+)$")


def _present(name: str) -> str:
    """The query holds ``name`` with a non-empty value (its first occurrence), as
    :func:`spoa.matrix.query.has_value` reads it."""
    quoted = re.escape(name)
    return f"(?:(?!{quoted}(?:[=&]|\\Z))[^&]*&)*{quoted}=[^&]"


def map_entries(policy: CompiledPolicy) -> list[tuple[str, str]]:
    """Every (regex, value) entry of ``policy``'s map, in the order HAProxy tries them."""
    entries = []
    salt = key_salt(policy.seed)
    for rule in policy.rules:
        spec = rule.spec
        assert spec is not None
        # What follows the path, when the rule has conditions: the rest of
        # the path, the method, the query. A rule without only needs its path
        # pattern, which never matches past the path.
        tail = ""
        if spec.methods or spec.query_present or spec.query_absent:
            if spec.methods:
                methods = "(?:" + "|".join(re.escape(m) for m in sorted(spec.methods)) + ")"
            else:
                methods = f"[^{SEPARATOR}]*"
            tail = f"[^{SEPARATOR}]*{SEPARATOR}{methods}{SEPARATOR}"
            tail += "".join(f"(?={_present(name)})" for name in spec.query_present)
            tail += "".join(f"(?!{_present(name)})" for name in spec.query_absent)
        value = _value(rule.worker_class, rule.key, salt, policy.version, rule.name)
        for pattern in spec.paths:
            entries.append((path_regex(pattern) + tail, value))
    default = policy.default
    entries.append(
        ("^", _value(default.worker_class, default.key, salt, policy.version, default.name))
    )
    return entries


def _value(worker_class: str, kind: KeyKind, salt: str, version: str, rule: str) -> str:
    return f"{worker_class} {KIND_CODES[kind]} {salt} {version} {rule}"


def entry_version(value: str) -> str | None:
    """The policy version in a map entry's value, or None if it has no such field."""
    fields = value.split(" ")
    return fields[3] if len(fields) == 5 else None


def fallback_map(policy: CompiledPolicy, entries: list[tuple[str, str]] | None = None) -> str:
    """The map file for ``policy``: a header naming the policy, then its entries
    (:func:`map_entries`, unless the caller has them already)."""
    lines = [f"# {FORMAT}: policy {policy.spec.name} {policy.version}"]
    if entries is None:
        entries = map_entries(policy)
    lines += [f"{regex} {value}" for regex, value in entries]
    return "\n".join(lines) + "\n"


def map_version(text: str) -> str | None:
    """The policy version a map file was made from, or None if it is no such map."""
    first = text.split("\n", 1)[0]
    found = _HEADER.match(first)
    return found.group(2) if found else None


def write_map(path: str | os.PathLike[str], text: str) -> bool:
    """Write the map atomically (a reader sees the old or the new file); False if unchanged."""
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


def publish(
    policy: CompiledPolicy,
    path: str | os.PathLike[str],
    entries: list[tuple[str, str]] | None = None,
) -> bool:
    """Write ``policy``'s map to ``path`` for the HAProxy that starts next; False (logged)
    if it cannot be written. The agent calls this for every policy it loads."""
    try:
        changed = write_map(path, fallback_map(policy, entries))
    except OSError as exc:
        log.error("fallback map %s not updated: %s", path, exc.strerror or exc)
        return False
    if changed:
        log.info("fallback map %s written for policy version %s", path, policy.version)
    return True
