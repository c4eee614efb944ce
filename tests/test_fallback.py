"""The fallback's map: the policy compiled for HAProxy, the map file, the agent writing it."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time
from ipaddress import ip_address
from pathlib import Path

import pytest

from spoa.demo.ports import free_port
from spoa.fallback import (
    FORMAT,
    KIND_CODES,
    entry_version,
    fallback_map,
    map_entries,
    map_version,
    publish,
    write_map,
)
from spoa.policy import CompiledPolicy, KeyKind, Request, load_policy
from spoa.traffic import Deployment, generate

ROOT = Path(__file__).resolve().parent.parent
POLICIES = ("synapse-workers", "simple", "synapse-workers-mas")


_COMPILED: dict[str, list[tuple[re.Pattern[str], str]]] = {}


def lookup(policy: CompiledPolicy, request: Request) -> tuple[str, str]:
    """The (class, rule) of the first map entry that matches ``request``'s lookup string, as
    HAProxy's map_reg finds it (Python's re in ASCII mode reads the entries as PCRE does)."""
    if policy.version not in _COMPILED:
        _COMPILED[policy.version] = [
            (re.compile(regex, re.ASCII), value) for regex, value in map_entries(policy)
        ]
    query = request.query if request.query is not None else "-"
    target = f"{request.path} {request.method} {query}"
    for regex, value in _COMPILED[policy.version]:
        if regex.match(target):
            worker_class, _kind, _salt, _version, rule = value.split(" ")
            return worker_class, rule
    raise AssertionError(f"no entry for {target!r}")


@pytest.mark.parametrize("name", POLICIES)
def test_the_map_routes_every_request_to_the_class_and_rule_the_policy_does(name: str) -> None:
    policy = load_policy(str(ROOT / "policies" / f"{name}.yaml"))
    for r in generate(3000, Deployment(seed=5)):
        request = Request(r.method, r.path, r.query, r.auth, ip_address(r.src))
        decision = policy.decide(request)
        assert lookup(policy, request) == (decision.worker_class, decision.rule), r


@pytest.mark.parametrize("name", POLICIES)
def test_every_path_pattern_of_every_rule_has_an_entry_in_order(name: str) -> None:
    policy = load_policy(str(ROOT / "policies" / f"{name}.yaml"))
    entries = map_entries(policy)
    rules = [value.split(" ")[-1] for _, value in entries]
    expected = [r.name for r in policy.rules for _ in (r.spec.paths if r.spec else ())]
    assert rules == [*expected, "default"]
    assert entries[-1] == (
        "^",
        f"{policy.default.worker_class} {KIND_CODES[policy.default.key]} #{policy.seed} "
        f"{policy.version} default",
    )
    for regex, value in entries:
        assert " " not in regex and "\t" not in regex and not regex.startswith("#")
        assert len(value.split(" ")) == 5


def test_a_conditional_rule_keeps_its_methods_and_query_conditions(tmp_path: Path) -> None:
    policy_file = tmp_path / "p.yaml"
    policy_file.write_text(
        "version: 1\nname: p\nseed: 7\nclasses: {main: , a: }\ndefault: {class: main}\n"
        "rules:\n  - name: r\n    class: a\n    key: room\n    methods: [PUT, GET]\n"
        "    query: {present: [x], absent: [y]}\n    path: '^/r$'\n"
    )
    policy = load_policy(str(policy_file))
    (regex, value), _ = map_entries(policy)
    assert value == f"a 3 #7 {policy.version} r"
    assert entry_version(value) == policy.version
    for method, query, rule in (
        ("PUT", "x=1", "r"),
        ("GET", "a&x=1&b", "r"),
        ("POST", "x=1", "default"),  # method
        ("PUT", "x=", "default"),  # present, but empty
        ("PUT", "x&x=1", "default"),  # the first x is empty
        ("PUT", "x=1&y=2", "default"),  # y present
        ("PUT", "x=1&y=", "r"),  # y empty: absent
        ("PUT", "x=1&yy=2", "r"),
        ("PUT", None, "default"),
    ):
        request = Request(method, "/r", query)
        assert policy.decide(request).rule == rule, (method, query)
        assert lookup(policy, request)[1] == rule, (method, query)
    assert not re.match(regex, "/rx PUT x=1")  # "$": the end of the path, not of the string


def test_every_key_kind_has_the_number_haproxy_cfg_tests_it_by() -> None:
    """haproxy.cfg's key lines test the kind by number; its comment lists them."""
    config = (ROOT / "haproxy" / "haproxy.cfg").read_text()
    listed = re.search(r"is a number \(spoa/fallback.py KIND_CODES\): ((?:.|\n)*?);", config)
    assert listed is not None
    text = re.sub(r"\s*#\s*", " ", listed.group(1))
    pairs = dict(re.findall(r"(\d+) (\w+)", text))
    assert {KeyKind(kind): int(code) for code, kind in pairs.items()} == KIND_CODES
    assert set(KIND_CODES) == set(KeyKind) and len(set(KIND_CODES.values())) == len(KeyKind)
    # Each kind's lines test its own number: a line, by what it reads, and the
    # kinds it serves (neighbours, one range).
    code = KIND_CODES
    served = {
        "set-var(txn.fb_tok) 'req.fhdr(authorization)": (KeyKind.TOKEN, KeyKind.USER),
        "set-var(txn.fb_qtok) 'query,": (KeyKind.TOKEN, KeyKind.USER),
        "field(2,_),ub64dec": (KeyKind.USER,),
        "set-var(txn.fb_room) 'path,": (KeyKind.ROOM,),
        "set-var(txn.fb_origin) 'req.fhdr(authorization)": (KeyKind.ORIGIN,),
        "set-var(txn.route.key) 'src,": (KeyKind.ORIGIN, KeyKind.SRC),
        "set-var(txn.route.key) pathq,": (KeyKind.URI,),
    }
    tests = re.findall(r"^\s*http-request (.*fb_kind\) -m int [\d:]+.*)$", config, re.MULTILINE)
    assert len(tests) == len(served)
    for marker, kinds in served.items():
        (line,) = [line for line in tests if marker in line]
        low, high = code[kinds[0]], code[kinds[-1]]
        assert high - low == len(kinds) - 1, kinds  # a range holds no other kind
        wanted = f"{low}:{high}" if high > low else f"{low}"
        assert f"{{ var(txn.fb_kind) -m int {wanted} }}" in line, (marker, line)


def test_a_map_is_replaced_whole_and_not_rewritten_when_unchanged(tmp_path: Path) -> None:
    target = tmp_path / "t"
    assert write_map(target, "one\n")
    inode = target.stat().st_ino
    assert not write_map(target, "one\n")
    assert target.stat().st_ino == inode
    assert write_map(target, "two\n")
    assert target.read_text() == "two\n" and target.stat().st_ino != inode
    assert oct(target.stat().st_mode & 0o777) == "0o644"
    assert [p.name for p in tmp_path.iterdir()] == ["t"]  # no temporary file left


def test_map_version_tells_a_map_from_anything_else() -> None:
    policy = load_policy(str(ROOT / "policies" / "simple.yaml"))
    text = fallback_map(policy)
    assert text.startswith(f"# {FORMAT}: policy simple {policy.version}\n")
    assert map_version(text) == policy.version
    assert map_version("^/x a r none v #0\n") is None
    assert entry_version("a 0 #0 v r") == "v" and entry_version("a r none v #0 x") is None
    assert map_version("policy: x\n") is None


def test_publish_says_when_the_map_cannot_be_written(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = load_policy(str(ROOT / "policies" / "simple.yaml"))
    with caplog.at_level(logging.INFO, "spoa.fallback"):
        assert publish(good, tmp_path / "m")
        assert not publish(good, tmp_path / "missing-dir" / "m")
    assert f"fallback map {tmp_path / 'm'} written for policy version {good.version}" in (
        caplog.text
    )
    assert "not updated" in caplog.text


def _wait_for(predicate: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError("timed out")


def test_the_agent_writes_the_map_at_start_and_for_every_policy_it_loads(
    tmp_path: Path,
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text((ROOT / "policies" / "simple.yaml").read_text())
    written = tmp_path / "fallback.map"
    agent = subprocess.Popen(
        [
            *(sys.executable, "-m", "spoa", "serve", "--policy", str(policy)),
            *("--fallback-map", str(written), "--listen", f"127.0.0.1:{free_port()}"),
            *("--http", "off", "--poll-interval", "0.2"),
        ],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        simple = load_policy(str(policy)).version

        def version() -> str | None:
            return map_version(written.read_text()) if written.exists() else None

        _wait_for(lambda: version() == simple, 15)
        # A new policy, saved by rename as editors do.
        edited = tmp_path / "policy.new"
        edited.write_text((ROOT / "policies" / "synapse-workers.yaml").read_text())
        os.replace(edited, policy)
        workers = load_policy(str(policy)).version
        _wait_for(lambda: version() == workers, 15)
        assert written.read_text() == fallback_map(load_policy(str(policy)))
        # A broken edit is rejected by the agent: the map stays.
        edited.write_text("rules: [")
        os.replace(edited, policy)
        time.sleep(1.0)
        assert version() == workers
    finally:
        agent.terminate()
        _, err = agent.communicate(timeout=15)
    assert f"fallback map {written} written for policy version {workers}" in err
