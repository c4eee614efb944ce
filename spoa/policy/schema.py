"""The policy file format: strict parsing of YAML into a plain specification.

The YAML is composed into nodes (not loaded into dicts) so every error can
name its line and YAML path, and so duplicate keys, which plain YAML loading
silently drops, are errors too. Every problem in the file is collected before
:class:`~spoa.policy.errors.PolicyError` is raised.

Format (see docs/policy.md)::

    version: 1                      # required; the format version
    seed: 0                         # optional; mmh3 seed of the hash keys
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
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from .errors import LocatedError, PolicyError

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
#: variable values: keep them to a safe alphabet and HAProxy's name length.
NAME_PATTERN: Final = re.compile(r"^[A-Za-z0-9_.-]{1,48}$")
_METHOD_PATTERN: Final = re.compile(r"^[A-Za-z]{1,20}$")
_PARAM_PATTERN: Final = re.compile(r"^[^&=#\s]{1,64}$")
_BACKREFERENCE: Final = re.compile(r"\\(?:[1-9]|g<)|\(\?P=")


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


@dataclass(frozen=True, slots=True)
class PolicySpec:
    """A policy file, checked: every reference resolves, every regex compiles."""

    source: str
    seed: int
    name: str
    classes: tuple[str, ...]
    default_class: str
    default_key: KeyKind
    rules: tuple[RuleSpec, ...]


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

    def name(self, node: Node, path: str, what: str) -> str | None:
        value = self.string(node, path)
        if value is not None and not NAME_PATTERN.match(value):
            self.error(node, path, f"{what} {value!r} must be 1-48 characters of A-Z a-z 0-9 _ . -")
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


def _kind(node: Node | None) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    if isinstance(node, ScalarNode):
        tag = node.tag.rsplit(":", 1)[-1]
        return f"{tag} {node.value!r}" if tag != "null" else "nothing"
    return "nothing"


def parse_policy(text: str, source: str = "<policy>") -> PolicySpec:
    """Check a policy document; raise PolicyError listing every problem."""
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

    top = checker.mapping(
        root, "$", {"version", "classes", "default", "rules"}, {"seed", "name", "description"}
    )
    if top is None:
        raise PolicyError(checker.errors)

    if "version" in top:
        version = checker.integer(top["version"], "version")
        if version is not None and version != FORMAT_VERSION:
            checker.error(top["version"], "version", f"unsupported version {version} (expected 1)")
    seed = 0
    if "seed" in top:
        seed_value = checker.integer(top["seed"], "seed")
        if seed_value is not None:
            if not 0 <= seed_value < 2**32:
                checker.error(top["seed"], "seed", "must be within 0..4294967295")
            else:
                seed = seed_value
    name = ""
    if "name" in top:
        name = checker.string(top["name"], "name") or ""
    if "description" in top:
        checker.string(top["description"], "description", allow_empty=True)

    classes = _classes(checker, top.get("classes"))
    default_class, default_key = _default(checker, top.get("default"), classes)
    rules = _rules(checker, top.get("rules"), classes)

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
    )


def _classes(checker: _Checker, node: Node | None) -> list[str]:
    if node is None:
        return []
    if not isinstance(node, MappingNode) or not node.value:
        checker.error(node, "classes", "expected a mapping of class names (at least one)")
        return []
    classes: list[str] = []
    for key_node, value_node in node.value:
        path = f"classes.{getattr(key_node, 'value', '?')}"
        name = checker.name(key_node, path, "class name")
        if name is None:
            continue
        if name in classes:
            checker.error(key_node, path, "duplicate class")
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
    rules: list[RuleSpec] = []
    seen: dict[str, int] = {}
    for i, rule_node in enumerate(node.value):
        path = f"rules[{i}]"
        fields = checker.mapping(
            rule_node, path, {"name", "class", "path"}, {"key", "methods", "query", "description"}
        )
        if fields is None:
            continue
        ok = True
        name = (
            checker.name(fields["name"], f"{path}.name", "rule name") if "name" in fields else None
        )
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
        patterns: list[str] = []
        if "path" in fields:
            items = checker.string_list(fields["path"], f"{path}.path", single_ok=True)
            multiple = isinstance(fields["path"], SequenceNode)
            for j, (pattern, item_node) in enumerate(items):
                where = f"{path}.path[{j}]" if multiple else f"{path}.path"
                checker.regex(pattern, item_node, where)
                patterns.append(pattern)
        methods: frozenset[str] | None = None
        if "methods" in fields:
            names = checker.string_list(fields["methods"], f"{path}.methods", single_ok=False)
            for j, (method, item_node) in enumerate(names):
                if not _METHOD_PATTERN.match(method):
                    checker.error(item_node, f"{path}.methods[{j}]", f"bad method {method!r}")
            methods = frozenset(m.upper() for m, _ in names)
        present: list[str] = []
        absent: list[str] = []
        if "query" in fields:
            query = checker.mapping(fields["query"], f"{path}.query", set(), {"present", "absent"})
            if query is not None and not fields["query"].value:
                checker.error(fields["query"], f"{path}.query", "give present or absent")
            for which, target in (("present", present), ("absent", absent)):
                if query and which in query:
                    where = f"{path}.query.{which}"
                    for j, (param, item_node) in enumerate(
                        checker.string_list(query[which], where, single_ok=False)
                    ):
                        if not _PARAM_PATTERN.match(param):
                            checker.error(item_node, f"{where}[{j}]", f"bad parameter {param!r}")
                        target.append(param)
            both = set(present) & set(absent)
            if both:
                checker.error(
                    fields["query"],
                    f"{path}.query",
                    f"parameters both present and absent: {', '.join(sorted(both))}",
                )
        description = ""
        if "description" in fields:
            description = (
                checker.string(fields["description"], f"{path}.description", allow_empty=True) or ""
            )
        if ok and name and worker_class and key is not None and patterns:
            rules.append(
                RuleSpec(
                    name=name,
                    worker_class=worker_class,
                    key=key,
                    paths=tuple(patterns),
                    methods=methods,
                    query_present=tuple(present),
                    query_absent=tuple(absent),
                    description=description,
                    line=rule_node.start_mark.line + 1,
                )
            )
    return rules
