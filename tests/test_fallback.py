"""The fallback's table: regexes as Lua patterns, the table file, and the agent writing it."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spoa.demo.ports import free_port
from spoa.fallback import (
    FORMAT,
    UntranslatableError,
    fallback_table,
    lua_patterns,
    publish,
    table_version,
    write_table,
)
from spoa.policy import load_policy

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("regex", "patterns"),
    [
        ("^/_matrix/media/", ["^/_matrix/media/"]),
        ("^/a/(r0|v3)/sync$", ["^/a/r0/sync$", "^/a/v3/sync$"]),
        ("^/x/[^/]+/typing", ["^/x/[^/]+/typing"]),
        ("^/d(/|$)", ["^/d/", "^/d$"]),
        ("^/u/(rooms/[^/]+/)?data", ["^/u/data", "^/u/rooms/[^/]+/data"]),
        ("^/m/(un)?q/.*$", ["^/m/q/.*$", "^/m/unq/.*$"]),
        ("^/org.matrix-x/a+b?", ["^/org.matrix%-x/a+b?"]),
        ("^/v(1|2)/x", ["^/v[12]/x"]),  # Python's parser folds one-character branches
        ("^/[a-c_%]z", ["^/[a-c_%%]z"]),
        ("^/n{2,3}", ["^/nnn?"]),
        ("/keys/", ["/keys/"]),  # not anchored: searched, as by the agent
        ("^/lazy.*?x$", ["^/lazy.*x$"]),
    ],
)
def test_regexes_become_the_lua_patterns_that_match_the_same(
    regex: str, patterns: list[str]
) -> None:
    assert sorted(lua_patterns(regex)) == sorted(patterns)


@pytest.mark.parametrize(
    ("regex", "reason"),
    [
        (r"^/rooms/\d+$", r"\d, \w and \s"),
        ("(?i)^/sync$", "flags"),
        ("^/(ab)+$", "repeated group"),
        ("^/a(?=b)", "assert"),
        ("^/é", "non-ASCII"),
        ("^/a b", "space"),
        ("^/a(x$|y)z", "anchor inside"),
        ("^/" + "(ab|cd)" * 10, "combinations"),
        ("^/a{1,40}", "too wide"),
        (r"^/(a)\1", "groupref"),
    ],
)
def test_regexes_without_an_exact_lua_pattern_are_refused(regex: str, reason: str) -> None:
    with pytest.raises(UntranslatableError, match="rule r") as caught:
        lua_patterns(regex, "rule r")
    assert reason in str(caught.value)


def test_every_bundled_policy_has_a_table_with_all_its_rules() -> None:
    for name in ("synapse-workers", "simple", "synapse-workers-mas"):
        policy = load_policy(str(ROOT / "policies" / f"{name}.yaml"))
        text = fallback_table(policy)
        lines = text.splitlines()
        assert lines[0] == FORMAT and lines[-1] == "end"
        assert table_version(text) == policy.version
        rules = [line.split(" ")[1] for line in lines if line.startswith("rule ")]
        assert rules == [rule.name for rule in policy.rules]
        assert f"default {policy.default.worker_class} {policy.default.key.value}" in lines


def test_a_conditional_rule_keeps_its_methods_and_query_conditions(tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(
        "version: 1\nname: p\nseed: 7\nclasses: {main: , a: }\ndefault: {class: main}\n"
        "rules:\n  - name: r\n    class: a\n    key: room\n    methods: [PUT, GET]\n"
        "    query: {present: [x], absent: [y, z]}\n    path: '^/r$'\n"
    )
    text = fallback_table(load_policy(str(policy)))
    assert "\nseed 7\n" in text
    assert "\nrule r a room GET,PUT x y,z\npath ^/r$\n" in text


def test_a_table_is_replaced_whole_and_not_rewritten_when_unchanged(tmp_path: Path) -> None:
    target = tmp_path / "t"
    assert write_table(target, "one\n")
    inode = target.stat().st_ino
    assert not write_table(target, "one\n")
    assert target.stat().st_ino == inode
    assert write_table(target, "two\n")
    assert target.read_text() == "two\n" and target.stat().st_ino != inode
    assert oct(target.stat().st_mode & 0o777) == "0o644"
    assert [p.name for p in tmp_path.iterdir()] == ["t"]  # no temporary file left


def test_table_version_tells_a_table_from_anything_else() -> None:
    good = fallback_table(load_policy(str(ROOT / "policies" / "simple.yaml")))
    assert table_version(good) is not None
    assert table_version(good.rsplit("end", 1)[0]) is None  # truncated
    assert table_version("policy: x\n") is None


def test_publish_leaves_the_last_table_when_a_policy_cannot_be_followed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    table = tmp_path / "t"
    good = load_policy(str(ROOT / "policies" / "simple.yaml"))
    assert publish(good, table)
    bad_file = tmp_path / "bad.yaml"
    bad_file.write_text(
        "version: 1\nclasses: {main: , a: }\ndefault: {class: main}\n"
        "rules:\n  - {name: n, class: a, path: '^/x/\\d+$'}\n"
    )
    with caplog.at_level(logging.ERROR, "spoa.fallback"):
        assert not publish(load_policy(str(bad_file)), table)
    assert table_version(table.read_text()) == good.version
    assert "cannot follow policy version" in caplog.text
    assert not publish(good, tmp_path / "missing-dir" / "t")


def _wait_for(predicate: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError("timed out")


def test_the_agent_writes_the_table_at_start_and_for_every_policy_it_loads(
    tmp_path: Path,
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text((ROOT / "policies" / "simple.yaml").read_text())
    table = tmp_path / "fallback.table"
    agent = subprocess.Popen(
        [
            *(sys.executable, "-m", "spoa", "serve", "--policy", str(policy)),
            *("--fallback-table", str(table), "--listen", f"127.0.0.1:{free_port()}"),
            *("--http", "off", "--poll-interval", "0.2"),
        ],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        simple = load_policy(str(policy)).version

        def version() -> str | None:
            return table_version(table.read_text()) if table.exists() else None

        _wait_for(lambda: version() == simple, 15)
        # A new policy, saved by rename as editors do.
        edited = tmp_path / "policy.new"
        edited.write_text((ROOT / "policies" / "synapse-workers.yaml").read_text())
        os.replace(edited, policy)
        workers = load_policy(str(policy)).version
        _wait_for(lambda: version() == workers, 15)
        assert table.read_text() == fallback_table(load_policy(str(policy)))
        # A broken edit is rejected by the agent: the table stays.
        edited.write_text("rules: [")
        os.replace(edited, policy)
        time.sleep(1.0)
        assert version() == workers
    finally:
        agent.terminate()
        _, err = agent.communicate(timeout=15)
    assert f"fallback table {table} written for policy version {workers}" in err
