"""The policy file format: strict parsing of YAML into a plain specification.

The YAML is composed into nodes (not loaded into dicts) so every error can
name its line and YAML path, and so duplicate keys, which plain YAML loading
silently drops, are errors too. Every problem in the file is collected before
:class:`~spoa.policy.errors.PolicyError` is raised.

Format (see docs/policy.md)::

    version: 1                      # required; the format version
    extends: synapse-workers        # optional: a bundled policy by name, or a file
    seed: 0                         # optional; salts the hash keys (a new seed moves them all)
    classes:                        # worker classes; HAProxy backend be_<class>
      main: {description: ...}      #   (the value may also be empty)
    default: {class: main, key: none}
    rules:                          # first match wins
      - name: sync
        class: synchrotron
        key: user                   # token|user|room|origin|uri|src|none
        methods: [GET]              # optional
        path: '^/_matrix/client/(r0|v3)/sync$'   # a regex, or a list of them
        query: {present: [since]}   # optional: present / absent parameter names
    whoami: {url: ...}              # optional: per-user keys for opaque tokens

A policy that ``extends`` another starts from that policy (classes, default,
seed, rules, whoami) and changes it: ``classes`` adds classes, ``default``,
``seed`` and ``whoami`` replace the base's, and ``rules`` is a mapping of
``before`` and ``after`` (rules added around the base's), ``replace`` (rules
taking the place of the base rule of the same name) and ``drop`` (names of
base rules to remove). Reading the base is the caller's job (see
:mod:`spoa.policy.loader`): :func:`parse_policy` only asks for it by name.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Final
from urllib.parse import urlsplit

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from .errors import LocatedError, PolicyError
from .native import NativeRegexError, path_regex

FORMAT_VERSION: Final = 1


class KeyKind(StrEnum):
    """What a rule hashes on; the canonical value is described in docs/policy.md."""

    TOKEN = "token"
    USER = "user"
    ROOM = "room"
    ORIGIN = "origin"
    URI = "uri"
    SRC = "src"
    NONE = "none"


#: Names become HAProxy backend names (be_<class>), metric labels and SPOE
#: variable values: keep them to a safe alphabet and HAProxy's name length,
#: with a letter or digit ("-" alone is what HAProxy logs for "no value").
NAME_PATTERN: Final = re.compile(r"^(?=[A-Za-z0-9_.-]{1,48}$)[_.-]*[A-Za-z0-9]")
_METHOD_PATTERN: Final = re.compile(r"^[A-Za-z]{1,20}$")
_PARAM_PATTERN: Final = re.compile(r"^[^&=#\s]{1,64}$")
_BACKREFERENCE: Final = re.compile(r"\\(?:[1-9]|g<)|\(\?P=")
_DURATION: Final = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)$")
_UNITS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


class Resolve(StrEnum):
    """Which access tokens the whoami lookup resolves to their user."""

    #: Tokens that do not name their user (everything but Synapse's ``syt_``).
    OPAQUE = "opaque"
    #: Every token, ``syt_`` ones included.
    ALL = "all"


@dataclass(frozen=True, slots=True)
class WhoamiSpec:
    """Per-user keys for opaque tokens: how to ask the homeserver who a token is.

    Every field is a bound with a default (docs/policy.md, "Per-user keys for
    opaque tokens"); durations are in seconds.
    """

    url: str
    resolve: Resolve = Resolve.OPAQUE
    #: How long the first request of a new token may wait for its lookup.
    wait: float = 0.0
    #: Time allowed to one lookup, connection included.
    timeout: float = 2.0
    #: How long a token's user is remembered.
    ttl: float = 3600.0
    #: How long a token the homeserver rejected (401/403) keeps its token key.
    negative_ttl: float = 60.0
    #: How long a token whose lookup failed (error, timeout) waits for a retry.
    error_ttl: float = 10.0
    #: Tokens with a known user, at most (oldest forgotten first).
    max_entries: int = 50_000
    #: Rejected or failed tokens remembered, at most.
    max_negative_entries: int = 10_000
    #: Lookups in flight at once; a new token finding none free keeps its token key.
    max_concurrent: int = 4
    #: Lookups started per second, at most (bursts of up to one second's worth).
    max_per_second: float = 20.0


#: (field, minimum, maximum) of the whoami durations.
_WHOAMI_DURATIONS: Final = (
    ("wait", 0.0, 0.05),
    ("timeout", 0.01, 30.0),
    ("ttl", 1.0, 7 * 86400.0),
    ("negative_ttl", 1.0, 86400.0),
    ("error_ttl", 0.1, 3600.0),
)
#: (field, minimum, maximum) of the whoami counts.
_WHOAMI_COUNTS: Final = (
    ("max_entries", 1, 10_000_000),
    ("max_negative_entries", 1, 10_000_000),
    ("max_concurrent", 1, 256),
)


@dataclass(frozen=True, slots=True)
class RuleSpec:
    name: str
    worker_class: str
    key: KeyKind
    paths: tuple[str, ...]
    methods: frozenset[str] | None
    query_present: tuple[str, ...]
    query_absent: tuple[str, ...]
    description: str
    line: int
    #: The file the rule is written in (a base policy's, for inherited rules).
    source: str = ""
    #: Where each patch of it was made (``file:line``), in the order applied.
    patches: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class PolicySpec:
    """A policy file, checked: every reference resolves, every regex compiles.

    For a policy that extends another, everything here is the result: the
    base's classes and rules with this file's changes applied.
    """

    source: str
    seed: int
    name: str
    classes: tuple[str, ...]
    default_class: str
    default_key: KeyKind
    rules: tuple[RuleSpec, ...]
    whoami: WhoamiSpec | None = None
    #: What ``extends`` named, or "".
    extends: str = ""


class BaseError(Exception):
    """The base policy named by ``extends`` cannot be found or read, or extends in a cycle."""


#: Given what ``extends`` names, the base policy, checked; raises BaseError,
#: or PolicyError for errors inside the base.
BaseLoader = Callable[[str], PolicySpec]


class _Checker:
    """Walks the YAML node tree, collecting located errors."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.errors: list[LocatedError] = []

    def error(self, node: Node | None, path: str, message: str) -> None:
        line = node.start_mark.line + 1 if node is not None else 1
        self.errors.append(LocatedError(self.source, line, path, message))

    def mapping(
        self, node: Node, path: str, required: set[str], optional: set[str]
    ) -> dict[str, Node] | None:
        if not isinstance(node, MappingNode):
            self.error(node, path, f"expected a mapping, found {_kind(node)}")
            return None
        result: dict[str, Node] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode):
                self.error(key_node, path, "keys must be plain names")
                continue
            key = key_node.value
            where = f"{path}.{key}" if path != "$" else key
            if key in result:
                self.error(key_node, where, "duplicate key")
                continue
            if key not in required and key not in optional:
                allowed = ", ".join(sorted(required | optional))
                self.error(key_node, where, f"unknown key {key!r} (allowed: {allowed})")
                continue
            result[key] = value_node
        for key in sorted(required - result.keys()):
            self.error(node, path, f"missing required key {key!r}")
        return result

    def string(self, node: Node, path: str, allow_empty: bool = False) -> str | None:
        if not isinstance(node, ScalarNode) or node.tag not in (
            "tag:yaml.org,2002:str",
            "tag:yaml.org,2002:null",
        ):
            # Plain scalars that YAML would read as numbers or booleans are
            # still accepted as text when quoted; unquoted they are an error,
            # so "class: 1" or "key: no" never surprise anyone.
            if isinstance(node, ScalarNode) and node.style in ("'", '"'):
                return str(node.value)
            self.error(node, path, f"expected a string, found {_kind(node)}")
            return None
        value = str(node.value)
        if not value and not allow_empty:
            self.error(node, path, "must not be empty")
            return None
        return value

    def string_list(self, node: Node, path: str, single_ok: bool) -> list[tuple[str, Node]]:
        if isinstance(node, SequenceNode):
            items = []
            if not node.value:
                self.error(node, path, "must not be an empty list")
            for i, item in enumerate(node.value):
                value = self.string(item, f"{path}[{i}]")
                if value is not None:
                    items.append((value, item))
            return items
        if single_ok:
            value = self.string(node, path)
            return [(value, node)] if value is not None else []
        self.error(node, path, f"expected a list, found {_kind(node)}")
        return []

    def integer(self, node: Node, path: str) -> int | None:
        if not isinstance(node, ScalarNode) or node.tag != "tag:yaml.org,2002:int":
            self.error(node, path, f"expected an integer, found {_kind(node)}")
            return None
        try:
            return int(SafeConstructor().construct_yaml_int(node))
        except (ValueError, yaml.YAMLError):
            self.error(node, path, f"not an integer: {node.value!r}")
            return None

    def number(self, node: Node, path: str, low: float, high: float) -> float | None:
        if not isinstance(node, ScalarNode) or node.tag not in (
            "tag:yaml.org,2002:int",
            "tag:yaml.org,2002:float",
        ):
            self.error(node, path, f"expected a number, found {_kind(node)}")
            return None
        try:
            value = float(node.value)
        except ValueError:
            self.error(node, path, f"not a number: {node.value!r}")
            return None
        if not low <= value <= high:
            self.error(node, path, f"must be within {low:g}..{high:g}")
            return None
        return value

    def duration(self, node: Node, path: str, low: float, high: float) -> float | None:
        """Seconds: a number, or a string like ``50ms``, ``2s``, ``10m``, ``1h``."""
        value: float | None = None
        if isinstance(node, ScalarNode) and node.tag in (
            "tag:yaml.org,2002:int",
            "tag:yaml.org,2002:float",
        ):
            try:
                value = float(node.value)
            except ValueError:
                value = None
        elif isinstance(node, ScalarNode) and node.tag == "tag:yaml.org,2002:str":
            found = _DURATION.match(node.value.strip())
            if found:
                value = float(found.group(1)) * _UNITS[found.group(2)]
        if value is None:
            self.error(
                node,
                path,
                f"expected a duration (seconds, or 50ms, 2s, 10m, 1h), found {_kind(node)}",
            )
            return None
        if not low <= value <= high:
            self.error(node, path, f"must be within {_show(low)}..{_show(high)}")
            return None
        return value

    def name(self, node: Node, path: str, what: str) -> str | None:
        value = self.string(node, path)
        if value is not None and not NAME_PATTERN.match(value):
            self.error(
                node,
                path,
                f"{what} {value!r} must be 1-48 characters of A-Z a-z 0-9 _ . -, "
                "a letter or digit among them",
            )
            return None
        return value

    def key_kind(self, node: Node, path: str) -> KeyKind | None:
        value = self.string(node, path)
        if value is None:
            return None
        try:
            return KeyKind(value)
        except ValueError:
            kinds = ", ".join(k.value for k in KeyKind)
            self.error(node, path, f"unknown key kind {value!r} (one of: {kinds})")
            return None

    def regex(self, pattern: str, node: Node, path: str) -> None:
        try:
            compiled = re.compile(pattern)
        except re.error as exc:
            self.error(node, path, f"bad regex {pattern!r}: {exc}")
            return
        if compiled.groupindex:
            self.error(node, path, "named groups are not supported in path patterns")
        elif _BACKREFERENCE.search(pattern):
            self.error(node, path, "backreferences are not supported in path patterns")
        else:
            try:
                path_regex(pattern)
            except NativeRegexError as exc:
                self.error(
                    node,
                    path,
                    f"regex {pattern!r}: HAProxy's fallback would not read it as the agent "
                    f"does: {exc}",
                )


def _show(seconds: float) -> str:
    return f"{seconds * 1000:g}ms" if seconds < 1 else f"{seconds:g}s"


def _kind(node: Node | None) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    if isinstance(node, ScalarNode):
        tag = node.tag.rsplit(":", 1)[-1]
        return f"{tag} {node.value!r}" if tag != "null" else "nothing"
    return "nothing"


def parse_policy(text: str, source: str = "<policy>", base: BaseLoader | None = None) -> PolicySpec:
    """Check a policy document; raise PolicyError listing every problem.

    ``base`` loads the policy an ``extends`` names; without it, ``extends``
    is an error.
    """
    checker = _Checker(source)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        problem = exc.problem or exc.context or "invalid YAML"
        raise PolicyError([LocatedError(source, line, "$", f"invalid YAML: {problem}")]) from None
    except yaml.YAMLError as exc:
        raise PolicyError([LocatedError(source, 1, "$", f"invalid YAML: {exc}")]) from None
    if root is None:
        raise PolicyError([LocatedError(source, 1, "$", "the policy file is empty")])

    extending = isinstance(root, MappingNode) and any(
        isinstance(k, ScalarNode) and k.value == "extends" for k, _ in root.value
    )
    required = {"version"} if extending else {"version", "classes", "default", "rules"}
    optional = {"seed", "name", "description", "extends", "whoami", "classes", "default", "rules"}
    top = checker.mapping(root, "$", required, optional - required)
    if top is None:
        raise PolicyError(checker.errors)

    if "version" in top:
        version = checker.integer(top["version"], "version")
        if version is not None and version != FORMAT_VERSION:
            checker.error(top["version"], "version", f"unsupported version {version} (expected 1)")

    parent: PolicySpec | None = None
    extends = ""
    base_errors: list[LocatedError] = []
    if "extends" in top:
        parent, extends, base_errors = _base(checker, top["extends"], base)
        if parent is None:
            raise PolicyError([*sorted(checker.errors, key=lambda e: e.line), *base_errors])

    seed = parent.seed if parent else 0
    if "seed" in top:
        seed_value = checker.integer(top["seed"], "seed")
        if seed_value is not None:
            if not 0 <= seed_value < 2**32:
                checker.error(top["seed"], "seed", "must be within 0..4294967295")
            else:
                seed = seed_value
    name = parent.name if parent else ""
    if "name" in top:
        name = checker.string(top["name"], "name") or ""
    if "description" in top:
        checker.string(top["description"], "description", allow_empty=True)

    inherited = list(parent.classes) if parent else []
    classes = inherited + _classes(checker, top.get("classes"), parent)
    default_class, default_key = (
        (parent.default_class, parent.default_key) if parent else (None, None)
    )
    if "default" in top or parent is None:
        default_class, default_key = _default(checker, top.get("default"), classes)
    if parent is None:
        rules = _rules(checker, top.get("rules"), classes)
    else:
        rules = _rule_edits(checker, top.get("rules"), classes, parent)
    whoami = parent.whoami if parent else None
    if "whoami" in top:
        whoami = _whoami(checker, top["whoami"])

    if checker.errors:
        raise PolicyError(sorted(checker.errors, key=lambda e: e.line))
    assert default_class is not None and default_key is not None
    return PolicySpec(
        source=source,
        seed=seed,
        name=name,
        classes=tuple(classes),
        default_class=default_class,
        default_key=default_key,
        rules=tuple(rules),
        whoami=whoami,
        extends=extends,
    )


def _base(
    checker: _Checker, node: Node, base: BaseLoader | None
) -> tuple[PolicySpec | None, str, list[LocatedError]]:
    """The policy ``extends`` names, or None with the reason recorded."""
    reference = checker.string(node, "extends")
    if reference is None:
        return None, "", []
    if base is None:
        checker.error(node, "extends", "extends needs a policy read from a file")
        return None, reference, []
    try:
        return base(reference), reference, []
    except BaseError as exc:
        checker.error(node, "extends", str(exc))
        return None, reference, []
    except PolicyError as exc:
        count = len(exc.errors)
        checker.error(
            node,
            "extends",
            f"the base policy {reference!r} has {count} error{'s' if count != 1 else ''}",
        )
        return None, reference, exc.errors


def _classes(checker: _Checker, node: Node | None, parent: PolicySpec | None) -> list[str]:
    if node is None:
        return []
    if not isinstance(node, MappingNode) or not node.value:
        checker.error(node, "classes", "expected a mapping of class names (at least one)")
        return []
    inherited = parent.classes if parent else ()
    classes: list[str] = []
    for key_node, value_node in node.value:
        path = f"classes.{getattr(key_node, 'value', '?')}"
        name = checker.name(key_node, path, "class name")
        if name is None:
            continue
        if name in classes:
            checker.error(key_node, path, "duplicate class")
            continue
        if name in inherited:
            assert parent is not None
            checker.error(key_node, path, f"class {name!r} is already declared in {parent.source}")
            continue
        classes.append(name)
        if isinstance(value_node, ScalarNode) and value_node.tag == "tag:yaml.org,2002:null":
            continue
        fields = checker.mapping(value_node, path, set(), {"description"})
        if fields and "description" in fields:
            checker.string(fields["description"], f"{path}.description", allow_empty=True)
    return classes


def _class_ref(checker: _Checker, node: Node, path: str, classes: list[str]) -> str | None:
    name = checker.string(node, path)
    if name is None:
        return None
    if classes and name not in classes:
        checker.error(node, path, f"unknown class {name!r} (declared: {', '.join(classes)})")
        return None
    return name


def _default(
    checker: _Checker, node: Node | None, classes: list[str]
) -> tuple[str | None, KeyKind | None]:
    if node is None:
        return None, None
    fields = checker.mapping(node, "default", {"class"}, {"key"})
    if fields is None:
        return None, None
    worker_class = (
        _class_ref(checker, fields["class"], "default.class", classes)
        if "class" in fields
        else None
    )
    key = checker.key_kind(fields["key"], "default.key") if "key" in fields else KeyKind.NONE
    return worker_class, key


def _rules(checker: _Checker, node: Node | None, classes: list[str]) -> list[RuleSpec]:
    if node is None:
        return []
    if not isinstance(node, SequenceNode):
        checker.error(node, "rules", f"expected a list of rules, found {_kind(node)}")
        return []
    seen: dict[str, int] = {}
    rules = []
    for i, rule_node in enumerate(node.value):
        rule = _rule(checker, rule_node, f"rules[{i}]", classes, seen)
        if rule is not None:
            rules.append(rule)
    return rules


def _rule_list(
    checker: _Checker, node: Node, path: str, classes: list[str], seen: dict[str, int]
) -> list[tuple[RuleSpec, Node, str]]:
    """The rules of a list, each with its node and YAML path."""
    if not isinstance(node, SequenceNode):
        checker.error(node, path, f"expected a list of rules, found {_kind(node)}")
        return []
    rules = []
    for i, rule_node in enumerate(node.value):
        rule = _rule(checker, rule_node, f"{path}[{i}]", classes, seen)
        if rule is not None:
            rules.append((rule, rule_node, f"{path}[{i}].name"))
    return rules


def _rule_edits(
    checker: _Checker, node: Node | None, classes: list[str], parent: PolicySpec
) -> list[RuleSpec]:
    """The base's rules with ``before``, ``after``, ``replace``, ``patch`` and ``drop`` applied."""
    inherited = [rule.name for rule in parent.rules]
    if node is None:
        return list(parent.rules)
    if isinstance(node, SequenceNode):
        checker.error(
            node,
            "rules",
            "a policy that extends another changes its rules with a mapping of "
            "before, after, replace, patch and drop, not a list",
        )
        return []
    fields = checker.mapping(node, "rules", set(), {"before", "after", "replace", "patch", "drop"})
    if fields is None:
        return []
    known = ", ".join(inherited) or "none"
    dropped: dict[str, Node] = {}
    if "drop" in fields:
        for j, (name, item) in enumerate(
            checker.string_list(fields["drop"], "rules.drop", single_ok=False)
        ):
            if name not in inherited:
                checker.error(
                    item,
                    f"rules.drop[{j}]",
                    f"no rule {name!r} to drop in {parent.source} (its rules: {known})",
                )
            elif name in dropped:
                checker.error(item, f"rules.drop[{j}]", f"rule {name!r} is dropped twice")
            else:
                dropped[name] = item
    seen: dict[str, int] = {}
    replaced: dict[str, RuleSpec] = {}
    if "replace" in fields:
        for rule, rule_node, where in _rule_list(
            checker, fields["replace"], "rules.replace", classes, seen
        ):
            if rule.name not in inherited:
                checker.error(
                    rule_node,
                    where,
                    f"no rule {rule.name!r} to replace in {parent.source} (its rules: {known})",
                )
            elif rule.name in dropped:
                checker.error(rule_node, where, f"rule {rule.name!r} is both replaced and dropped")
            else:
                replaced[rule.name] = rule
    if "patch" in fields:
        _patches(checker, fields["patch"], classes, parent, dropped, replaced)
    added: dict[str, list[RuleSpec]] = {"before": [], "after": []}
    for place, target in added.items():
        if place not in fields:
            continue
        for rule, rule_node, where in _rule_list(
            checker, fields[place], f"rules.{place}", classes, seen
        ):
            if rule.name in inherited and rule.name not in dropped:
                checker.error(
                    rule_node,
                    where,
                    f"rule name {rule.name!r} is already used in {parent.source}: "
                    "replace it, or drop it first",
                )
            else:
                target.append(rule)
    kept = [replaced.get(r.name, r) for r in parent.rules if r.name not in dropped]
    return [*added["before"], *kept, *added["after"]]


def _patches(
    checker: _Checker,
    node: Node,
    classes: list[str],
    parent: PolicySpec,
    dropped: dict[str, Node],
    replaced: dict[str, RuleSpec],
) -> None:
    """Each patch of ``rules.patch`` applied to its base rule, into ``replaced``."""
    if not isinstance(node, SequenceNode):
        checker.error(node, "rules.patch", f"expected a list of patches, found {_kind(node)}")
        return
    base = {rule.name: rule for rule in parent.rules}
    known = ", ".join(base) or "none"
    patched: set[str] = set()
    for i, patch_node in enumerate(node.value):
        path = f"rules.patch[{i}]"
        fields = checker.mapping(patch_node, path, {"name"}, _PATCH_FIELDS)
        if fields is None or "name" not in fields:
            continue
        name = checker.string(fields["name"], f"{path}.name")
        if name is None:
            continue
        problem = None
        if name not in base:
            problem = f"no rule {name!r} to patch in {parent.source} (its rules: {known})"
        elif name in dropped:
            problem = f"rule {name!r} is both patched and dropped"
        elif name in patched:
            problem = f"rule {name!r} is patched twice: one patch may change several fields"
        elif name in replaced:
            problem = f"rule {name!r} is both replaced and patched"
        if problem:
            checker.error(fields["name"], f"{path}.name", problem)
            continue
        rule = _patch(checker, patch_node, fields, path, classes, base[name])
        if rule is not None:
            patched.add(rule.name)
            replaced[rule.name] = rule


def _rule(
    checker: _Checker, rule_node: Node, path: str, classes: list[str], seen: dict[str, int]
) -> RuleSpec | None:
    """One rule; ``seen`` maps the rule names met so far in this file to their lines."""
    fields = checker.mapping(
        rule_node, path, {"name", "class", "path"}, {"key", "methods", "query", "description"}
    )
    if fields is None:
        return None
    ok = True
    name = checker.name(fields["name"], f"{path}.name", "rule name") if "name" in fields else None
    if name is not None:
        if name in seen:
            checker.error(
                fields["name"],
                f"{path}.name",
                f"duplicate rule name {name!r} (first at line {seen[name]})",
            )
            ok = False
        else:
            seen[name] = fields["name"].start_mark.line + 1
    worker_class = (
        _class_ref(checker, fields["class"], f"{path}.class", classes)
        if "class" in fields
        else None
    )
    key = checker.key_kind(fields["key"], f"{path}.key") if "key" in fields else KeyKind.NONE
    patterns = _paths(checker, fields["path"], f"{path}.path") if "path" in fields else []
    methods = (
        _methods(checker, fields["methods"], f"{path}.methods") if "methods" in fields else None
    )
    present, absent = (
        _query(checker, fields["query"], f"{path}.query") if "query" in fields else ([], [])
    )
    description = ""
    if "description" in fields:
        description = (
            checker.string(fields["description"], f"{path}.description", allow_empty=True) or ""
        )
    if not (ok and name and worker_class and key is not None and patterns):
        return None
    return RuleSpec(
        name=name,
        worker_class=worker_class,
        key=key,
        paths=tuple(patterns),
        methods=methods,
        query_present=tuple(present),
        query_absent=tuple(absent),
        description=description,
        line=rule_node.start_mark.line + 1,
        source=checker.source,
    )


def _paths(checker: _Checker, node: Node, path: str) -> list[str]:
    """A rule's path patterns (one, or a list), each compiled."""
    patterns = []
    multiple = isinstance(node, SequenceNode)
    for j, (pattern, item_node) in enumerate(checker.string_list(node, path, single_ok=True)):
        checker.regex(pattern, item_node, f"{path}[{j}]" if multiple else path)
        patterns.append(pattern)
    return patterns


def _methods(checker: _Checker, node: Node, path: str) -> frozenset[str]:
    names = checker.string_list(node, path, single_ok=False)
    for j, (method, item_node) in enumerate(names):
        if not _METHOD_PATTERN.match(method):
            checker.error(item_node, f"{path}[{j}]", f"bad method {method!r}")
    return frozenset(m.upper() for m, _ in names)


def _query(checker: _Checker, node: Node, path: str) -> tuple[list[str], list[str]]:
    """A rule's query condition: the parameters present, and absent."""
    present: list[str] = []
    absent: list[str] = []
    query = checker.mapping(node, path, set(), {"present", "absent"})
    if query is not None and not node.value:
        checker.error(node, path, "give present or absent")
    for which, target in (("present", present), ("absent", absent)):
        if query and which in query:
            where = f"{path}.{which}"
            for j, (param, item_node) in enumerate(
                checker.string_list(query[which], where, single_ok=False)
            ):
                if not _PARAM_PATTERN.match(param):
                    checker.error(item_node, f"{where}[{j}]", f"bad parameter {param!r}")
                target.append(param)
    both = set(present) & set(absent)
    if both:
        checker.error(node, path, f"parameters both present and absent: {', '.join(sorted(both))}")
    return present, absent


def _is_null(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.tag == "tag:yaml.org,2002:null"


#: What a patch may change of a base rule.
_PATCH_FIELDS: Final = {"class", "key", "methods", "path", "add_path", "query", "description"}


def _patch(
    checker: _Checker,
    node: Node,
    fields: dict[str, Node],
    path: str,
    classes: list[str],
    rule: RuleSpec,
) -> RuleSpec | None:
    """``rule`` with the fields of the patch ``node`` changed: the rest stays the base's."""
    if set(fields) == {"name"}:
        checker.error(
            node, path, f"a patch changes something: give one of {', '.join(sorted(_PATCH_FIELDS))}"
        )
        return None
    errors = len(checker.errors)
    changes: dict[str, object] = {}
    if "class" in fields:
        changes["worker_class"] = _class_ref(checker, fields["class"], f"{path}.class", classes)
    if "key" in fields:
        changes["key"] = checker.key_kind(fields["key"], f"{path}.key")
    if "path" in fields and "add_path" in fields:
        checker.error(fields["add_path"], f"{path}.add_path", "give path (instead) or add_path")
    elif "path" in fields:
        changes["paths"] = tuple(_paths(checker, fields["path"], f"{path}.path"))
    elif "add_path" in fields:
        added = _paths(checker, fields["add_path"], f"{path}.add_path")
        changes["paths"] = rule.paths + tuple(p for p in added if p not in rule.paths)
    if "methods" in fields:
        # null: any method, as a rule without methods.
        node_methods = fields["methods"]
        changes["methods"] = (
            None if _is_null(node_methods) else _methods(checker, node_methods, f"{path}.methods")
        )
    if "query" in fields:
        # null: no query condition.
        node_query = fields["query"]
        present, absent = (
            ([], []) if _is_null(node_query) else _query(checker, node_query, f"{path}.query")
        )
        changes["query_present"], changes["query_absent"] = tuple(present), tuple(absent)
    if "description" in fields:
        changes["description"] = (
            checker.string(fields["description"], f"{path}.description", allow_empty=True) or ""
        )
    if len(checker.errors) > errors:
        return None
    where = f"{checker.source}:{node.start_mark.line + 1}"
    return dataclasses.replace(rule, patches=(*rule.patches, where), **changes)  # type: ignore[arg-type]


def _whoami(checker: _Checker, node: Node) -> WhoamiSpec | None:
    optional = {"resolve", "max_per_second"}
    optional |= {name for name, _, _ in (*_WHOAMI_DURATIONS, *_WHOAMI_COUNTS)}
    fields = checker.mapping(node, "whoami", {"url"}, optional)
    if fields is None:
        return None
    ok = True
    url = checker.string(fields["url"], "whoami.url") if "url" in fields else None
    if url is not None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            checker.error(fields["url"], "whoami.url", f"expected an http(s) URL, not {url!r}")
            ok = False
        elif parts.query or parts.fragment or parts.username or parts.password:
            checker.error(
                fields["url"], "whoami.url", "the URL takes no query, fragment or credentials"
            )
            ok = False
    settings: dict[str, object] = {}
    if "resolve" in fields:
        value = checker.string(fields["resolve"], "whoami.resolve")
        try:
            settings["resolve"] = Resolve(value or "")
        except ValueError:
            if value is not None:
                checker.error(
                    fields["resolve"], "whoami.resolve", f"expected opaque or all, not {value!r}"
                )
            ok = False
    for field_name, low, high in _WHOAMI_DURATIONS:
        if field_name in fields:
            seconds = checker.duration(fields[field_name], f"whoami.{field_name}", low, high)
            ok = ok and seconds is not None
            settings[field_name] = seconds
    for field_name, low_count, high_count in _WHOAMI_COUNTS:
        if field_name in fields:
            count = checker.integer(fields[field_name], f"whoami.{field_name}")
            if count is not None and not low_count <= count <= high_count:
                checker.error(
                    fields[field_name],
                    f"whoami.{field_name}",
                    f"must be within {low_count}..{high_count}",
                )
                count = None
            ok = ok and count is not None
            settings[field_name] = count
    if "max_per_second" in fields:
        rate = checker.number(fields["max_per_second"], "whoami.max_per_second", 0.1, 10_000.0)
        ok = ok and rate is not None
        settings["max_per_second"] = rate
    if not ok or url is None:
        return None
    return WhoamiSpec(url=url, **settings)  # type: ignore[arg-type]
