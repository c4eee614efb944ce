"""Policy files: what is accepted, and every error with its exact located message."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from spoa.policy import KeyKind, PolicyError, compile_policy, parse_policy

ROOT = Path(__file__).resolve().parents[2]

VALID = """\
version: 1
name: test
seed: 7
classes:
  main: {description: the main process}
  sync:
  media: {}
default: {class: main, key: none}
rules:
  - name: sync
    class: sync
    key: user
    methods: [GET, post]
    path: '^/_matrix/client/v3/sync$'
    query: {present: [since], absent: [full_state]}
  - name: media
    class: media
    path:
      - '^/_matrix/media/'
      - '^/_matrix/client/v1/media/'
"""


def errors_of(text: str) -> list[str]:
    with pytest.raises(PolicyError) as info:
        parse_policy(textwrap.dedent(text), "p.yaml")
    return [str(e) for e in info.value.errors]


def test_a_valid_policy_is_parsed_in_full() -> None:
    spec = parse_policy(VALID, "p.yaml")
    assert spec.seed == 7
    assert spec.name == "test"
    assert spec.classes == ("main", "sync", "media")
    assert (spec.default_class, spec.default_key) == ("main", KeyKind.NONE)
    sync, media = spec.rules
    assert sync.name == "sync" and sync.worker_class == "sync" and sync.key is KeyKind.USER
    assert sync.methods == frozenset({"GET", "POST"})
    assert sync.query_present == ("since",) and sync.query_absent == ("full_state",)
    assert sync.paths == ("^/_matrix/client/v3/sync$",)
    assert sync.line == 10
    assert media.key is KeyKind.NONE and media.methods is None
    assert media.paths == ("^/_matrix/media/", "^/_matrix/client/v1/media/")


@pytest.mark.parametrize("name", ["simple.yaml", "synapse-workers.yaml"])
def test_bundled_policies_are_valid(name: str) -> None:
    content = (ROOT / "policies" / name).read_bytes()
    policy = compile_policy(content, name)
    assert policy.rules
    assert policy.default.worker_class in policy.classes


MINIMAL = """\
version: 1
classes: {main: }
default: {class: main}
rules: []
"""


def test_a_policy_without_rules_sends_everything_to_the_default() -> None:
    spec = parse_policy(MINIMAL)
    assert spec.rules == ()
    assert spec.default_key is KeyKind.NONE


# One fixture per kind of error: the document, and the exact messages.
ERRORS = {
    "empty file": ("", ["p.yaml:1: $: the policy file is empty"]),
    "not YAML": (
        "version: 1\nclasses: [a\n",
        ["p.yaml:3: $: invalid YAML: expected ',' or ']', but got '<stream end>'"],
    ),
    "tabs": (
        "version: 1\n\tclasses: {}\n",
        ["p.yaml:2: $: invalid YAML: found character '\\t' that cannot start any token"],
    ),
    "not a mapping": ("- 1\n- 2\n", ["p.yaml:1: $: expected a mapping, found a list"]),
    "missing sections": (
        "version: 1\n",
        [
            "p.yaml:1: $: missing required key 'classes'",
            "p.yaml:1: $: missing required key 'default'",
            "p.yaml:1: $: missing required key 'rules'",
        ],
    ),
    "unknown top-level key": (
        MINIMAL + "extra: 1\n",
        [
            "p.yaml:5: extra: unknown key 'extra' (allowed: classes, default, description, "
            "extends, name, rules, seed, version, whoami)"
        ],
    ),
    "duplicate top-level key": (
        MINIMAL + "rules: []\n",
        ["p.yaml:5: rules: duplicate key"],
    ),
    "wrong version": (
        MINIMAL.replace("version: 1", "version: 2"),
        ["p.yaml:1: version: unsupported version 2 (expected 1)"],
    ),
    "version not an integer": (
        MINIMAL.replace("version: 1", "version: one"),
        ["p.yaml:1: version: expected an integer, found str 'one'"],
    ),
    "seed out of range": (
        MINIMAL + "seed: -1\n",
        ["p.yaml:5: seed: must be within 0..4294967295"],
    ),
    "classes not a mapping": (
        MINIMAL.replace("classes: {main: }", "classes: [main]"),
        ["p.yaml:2: classes: expected a mapping of class names (at least one)"],
    ),
    "bad class name": (
        MINIMAL.replace("classes: {main: }", "classes: {main: , 'be sync': }"),
        [
            "p.yaml:2: classes.be sync: class name 'be sync' must be 1-48 characters of "
            "A-Z a-z 0-9 _ . -, a letter or digit among them"
        ],
    ),
    "class name without a letter or digit": (
        MINIMAL.replace("classes: {main: }", "classes: {main: , '-': }"),
        [
            "p.yaml:2: classes.-: class name '-' must be 1-48 characters of "
            "A-Z a-z 0-9 _ . -, a letter or digit among them"
        ],
    ),
    "duplicate class": (
        MINIMAL.replace("classes: {main: }", "classes: {main: , main: }"),
        ["p.yaml:2: classes.main: duplicate class"],
    ),
    "unknown class field": (
        MINIMAL.replace("classes: {main: }", "classes: {main: {backend: x}}"),
        ["p.yaml:2: classes.main.backend: unknown key 'backend' (allowed: description)"],
    ),
    "unknown default class": (
        MINIMAL.replace("default: {class: main}", "default: {class: nope}"),
        ["p.yaml:3: default.class: unknown class 'nope' (declared: main)"],
    ),
    "unknown default key kind": (
        MINIMAL.replace("default: {class: main}", "default: {class: main, key: ip}"),
        [
            "p.yaml:3: default.key: unknown key kind 'ip' (one of: token, user, room, "
            "origin, uri, src, none)"
        ],
    ),
    "unquoted boolean as a string": (
        MINIMAL.replace("default: {class: main}", "default: {class: main, key: no}"),
        ["p.yaml:3: default.key: expected a string, found bool 'no'"],
    ),
    "rules not a list": (
        MINIMAL.replace("rules: []", "rules: {a: 1}"),
        ["p.yaml:4: rules: expected a list of rules, found a mapping"],
    ),
    "rule missing keys": (
        MINIMAL.replace("rules: []", "rules:\n  - {key: user}"),
        [
            "p.yaml:5: rules[0]: missing required key 'class'",
            "p.yaml:5: rules[0]: missing required key 'name'",
            "p.yaml:5: rules[0]: missing required key 'path'",
        ],
    ),
    "unknown rule key": (
        MINIMAL.replace("rules: []", "rules:\n  - {name: a, class: main, path: ^/, host: x}"),
        [
            "p.yaml:5: rules[0].host: unknown key 'host' (allowed: class, description, key, "
            "methods, name, path, query)"
        ],
    ),
    "unknown rule class": (
        MINIMAL.replace("rules: []", "rules:\n  - {name: a, class: sync, path: ^/}"),
        ["p.yaml:5: rules[0].class: unknown class 'sync' (declared: main)"],
    ),
    "unknown rule key kind": (
        MINIMAL.replace("rules: []", "rules:\n  - {name: a, class: main, key: ip, path: ^/}"),
        [
            "p.yaml:5: rules[0].key: unknown key kind 'ip' (one of: token, user, room, "
            "origin, uri, src, none)"
        ],
    ),
    "duplicate rule name": (
        MINIMAL.replace(
            "rules: []",
            "rules:\n  - {name: a, class: main, path: ^/a}\n  - {name: a, class: main, path: ^/b}",
        ),
        ["p.yaml:6: rules[1].name: duplicate rule name 'a' (first at line 5)"],
    ),
    "bad rule name": (
        MINIMAL.replace("rules: []", "rules:\n  - {name: 'a b', class: main, path: ^/}"),
        [
            "p.yaml:5: rules[0].name: rule name 'a b' must be 1-48 characters of "
            "A-Z a-z 0-9 _ . -, a letter or digit among them"
        ],
    ),
    "bad regex": (
        MINIMAL.replace("rules: []", "rules:\n  - name: a\n    class: main\n    path: '^/(a'"),
        [
            "p.yaml:7: rules[0].path: bad regex '^/(a': missing ), unterminated subpattern "
            "at position 2"
        ],
    ),
    "bad regex in a list": (
        MINIMAL.replace(
            "rules: []",
            "rules:\n  - name: a\n    class: main\n    path:\n      - ^/ok\n      - '*'",
        ),
        ["p.yaml:9: rules[0].path[1]: bad regex '*': nothing to repeat at position 0"],
    ),
    "empty path list": (
        MINIMAL.replace("rules: []", "rules:\n  - {name: a, class: main, path: []}"),
        ["p.yaml:5: rules[0].path: must not be an empty list"],
    ),
    "named group": (
        MINIMAL.replace("rules: []", "rules:\n  - {name: a, class: main, path: '^/(?P<x>a)'}"),
        ["p.yaml:5: rules[0].path: named groups are not supported in path patterns"],
    ),
    "backreference": (
        MINIMAL.replace("rules: []", "rules:\n  - {name: a, class: main, path: '^/(a)\\1'}"),
        ["p.yaml:5: rules[0].path: backreferences are not supported in path patterns"],
    ),
    "bad method": (
        MINIMAL.replace(
            "rules: []", "rules:\n  - {name: a, class: main, path: ^/, methods: [GET, 'P UT']}"
        ),
        ["p.yaml:5: rules[0].methods[1]: bad method 'P UT'"],
    ),
    "methods not a list": (
        MINIMAL.replace("rules: []", "rules:\n  - {name: a, class: main, path: ^/, methods: GET}"),
        ["p.yaml:5: rules[0].methods: expected a list, found str 'GET'"],
    ),
    "unknown query condition": (
        MINIMAL.replace(
            "rules: []", "rules:\n  - {name: a, class: main, path: ^/, query: {equals: [x]}}"
        ),
        ["p.yaml:5: rules[0].query.equals: unknown key 'equals' (allowed: absent, present)"],
    ),
    "empty query condition": (
        MINIMAL.replace("rules: []", "rules:\n  - {name: a, class: main, path: ^/, query: {}}"),
        ["p.yaml:5: rules[0].query: give present or absent"],
    ),
    "contradictory query": (
        MINIMAL.replace(
            "rules: []",
            "rules:\n  - {name: a, class: main, path: ^/, query: {present: [x], absent: [x]}}",
        ),
        ["p.yaml:5: rules[0].query: parameters both present and absent: x"],
    ),
    "bad query parameter": (
        MINIMAL.replace(
            "rules: []", "rules:\n  - {name: a, class: main, path: ^/, query: {present: ['a=b']}}"
        ),
        ["p.yaml:5: rules[0].query.present[0]: bad parameter 'a=b'"],
    ),
}


@pytest.mark.parametrize(("text", "messages"), ERRORS.values(), ids=ERRORS.keys())
def test_each_kind_of_error_is_reported_with_file_line_and_yaml_path(
    text: str, messages: list[str]
) -> None:
    assert errors_of(text) == messages


def test_every_error_in_a_file_is_reported_at_once_in_line_order() -> None:
    text = """\
    version: 3
    classes: {main: }
    default: {class: other}
    rules:
      - {name: a, class: nope, path: '(', key: bad}
    """
    assert errors_of(text) == [
        "p.yaml:1: version: unsupported version 3 (expected 1)",
        "p.yaml:3: default.class: unknown class 'other' (declared: main)",
        "p.yaml:5: rules[0].class: unknown class 'nope' (declared: main)",
        "p.yaml:5: rules[0].key: unknown key kind 'bad' (one of: token, user, room, origin, "
        "uri, src, none)",
        "p.yaml:5: rules[0].path: bad regex '(': missing ), unterminated subpattern at position 0",
    ]


def test_a_file_that_is_not_utf8_is_an_error() -> None:
    with pytest.raises(PolicyError) as info:
        compile_policy(b"version: 1\nname: \xff\n", "p.yaml")
    assert [str(e) for e in info.value.errors] == [
        "p.yaml:2: $: the policy file is not valid UTF-8"
    ]


def test_quoted_numbers_are_accepted_as_names() -> None:
    spec = parse_policy(MINIMAL.replace("classes: {main: }", "classes: {main: , '42': }"))
    assert spec.classes == ("main", "42")
