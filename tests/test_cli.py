"""The spoa command: check, explain, and serve's start-up errors, as a user runs them."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from dataclasses import fields, replace
from pathlib import Path

from spoa import cli
from spoa.policy import load_policy
from spoa.server import Limits
from tests.policy_edits import edited_synapse_policy

ROOT = Path(__file__).resolve().parent.parent
SYNAPSE = str(ROOT / "policies" / "synapse-workers.yaml")


def spoa(
    *args: str, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spoa", *args],
        cwd=ROOT,
        input=stdin,
        env={**os.environ, **env} if env else None,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_check_accepts_a_valid_policy_with_a_summary() -> None:
    result = spoa("check", SYNAPSE)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{SYNAPSE}: OK, version ")
    assert "24 rules" in result.stdout and "18 classes" in result.stdout


def test_check_lists_every_located_error_and_exits_1(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "version: 1\nclasses: {main: }\ndefault: {class: main}\n"
        "rules:\n  - {name: a, class: x, path: '('}\n"
    )
    result = spoa("check", str(bad))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"{bad}:5: rules[0].class: unknown class 'x' (declared: main)",
        f"{bad}:5: rules[0].path: bad regex '(': missing ), unterminated subpattern at position 0",
        f"{bad}: 2 errors",
    ]


def test_check_of_a_missing_file_exits_1() -> None:
    result = spoa("check", "/nonexistent/policy.yaml")
    assert result.returncode == 1
    assert "cannot read" in result.stderr


def test_explain_prints_the_decision_as_json() -> None:
    result = spoa(
        "explain",
        SYNAPSE,
        "put",
        "/_matrix/client/v3/rooms/%21abc%3Aexample.org/send/m.room.message/t1?x=1",
        "-H",
        "authorization: Bearer syt_YWxpY2U_a_b",
        "-H",
        "X-Other: 1",
        "--src",
        "192.0.2.1",
    )
    assert result.returncode == 0, result.stderr
    decision = json.loads(result.stdout)
    assert decision == {
        "class": "event_creator",
        "key_kind": "room",
        "key_source": "!abc:example.org",
        "key": decision["key"],
        "rule": "event_sending",
        "policy": decision["policy"],
    }
    assert isinstance(decision["key"], int) and 0 <= decision["key"] < 2**32


def test_explain_reads_the_token_from_the_query_of_the_target() -> None:
    header = json.loads(
        spoa(
            "explain",
            SYNAPSE,
            "GET",
            "/_matrix/client/v3/sync?since=s1",
            "-H",
            "Authorization: Bearer syt_Ym9i_x_y",
        ).stdout
    )
    query = json.loads(
        spoa(
            "explain", SYNAPSE, "GET", "/_matrix/client/v3/sync?since=s1&access_token=syt_Ym9i_z_w"
        ).stdout
    )
    assert header["key_source"] == query["key_source"] == "bob"
    assert header["key"] == query["key"]


def test_explain_jsonl_answers_every_line_in_order() -> None:
    lines = [
        {
            "method": "GET",
            "path": "/_matrix/client/v3/sync",
            "headers": {"AUTHORIZATION": "Bearer syt_YWxpY2U_a_b"},
        },
        {
            "method": "PUT",
            "path": "/_matrix/federation/v1/send/1",
            "headers": {"Authorization": 'X-Matrix origin="o.example",key="k",sig="s"'},
            "src": "2001:db8::1",
        },
        {"method": "GET", "path": "/_matrix/media/v3/config"},
    ]
    stdin = "\n".join(json.dumps(x) for x in lines) + "\n\nnot json\n[1]\n"
    result = spoa("explain", SYNAPSE, "--jsonl", stdin=stdin)
    out = [json.loads(x) for x in result.stdout.splitlines()]
    assert [o.get("class") for o in out[:3]] == [
        "initial_sync",
        "federation_inbound",
        "media_repository",
    ]
    assert out[1]["key_source"] == "o.example"
    assert out[3]["error"].startswith("line 5: ")
    assert out[4] == {"error": "line 6: expected a JSON object"}
    assert result.returncode == 1


def test_explain_needs_a_request_or_jsonl() -> None:
    assert spoa("explain", SYNAPSE).returncode == 2
    assert spoa("explain", SYNAPSE, "GET", "/x", "--jsonl").returncode == 2
    assert spoa("explain", SYNAPSE, "GET", "/x", "-H", "no colon").returncode == 2


def test_serve_refuses_to_start_on_a_broken_policy(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\n")
    result = spoa("serve", "--policy", str(bad), "--listen", "127.0.0.1:0")
    assert result.returncode == 1
    assert "missing required key 'classes'" in result.stderr


def test_serve_needs_a_policy_or_a_static_class() -> None:
    result = spoa("serve")
    assert result.returncode == 2
    assert "--policy" in result.stderr


HAPROXY_CFG = str(ROOT / "haproxy" / "haproxy.cfg")
SIMPLE = str(ROOT / "policies" / "simple.yaml")


def test_check_haproxy_accepts_the_shipped_config_for_the_bundled_policies(
    tmp_path: Path,
) -> None:
    for policy in (SYNAPSE, SIMPLE, str(ROOT / "policies" / "synapse-workers-mas.yaml")):
        written = tmp_path / "fallback.map"
        assert spoa("fallback", policy, "-o", str(written)).returncode == 0
        env = {"SPOA_FALLBACK_MAP": str(written)}
        result = spoa("check", policy, "--haproxy", HAPROXY_CFG, env=env)
        assert result.returncode == 0, result.stderr
        assert f"ok: the fallback's map {written} agrees with {policy}" in result.stdout
    simple = spoa("check", SIMPLE, "--haproxy", HAPROXY_CFG).stdout
    assert (
        "ok: " in simple and "does not use (nothing is wrong: no request reaches them): " in simple
    )
    assert "be_account_data" in simple


def test_check_haproxy_reports_a_class_without_backend(tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(
        "version: 1\nclasses: {main: , synchrotron: , search: }\ndefault: {class: main}\n"
        "rules:\n  - {name: s, class: search, path: '^/_matrix/client/v3/search$'}\n"
    )
    result = spoa("check", str(policy), "--haproxy", HAPROXY_CFG)
    assert result.returncode == 1
    assert (
        f"error: class 'search' of {policy} has no backend be_search in {HAPROXY_CFG}"
        in result.stderr
    )


def test_check_haproxy_fails_on_a_map_of_another_policy_version(tmp_path: Path) -> None:
    written = tmp_path / "fallback.map"
    assert spoa("fallback", SYNAPSE, "-o", str(written)).returncode == 0
    agrees = spoa("check", SYNAPSE, "--haproxy", HAPROXY_CFG, "--fallback-map", str(written))
    assert agrees.returncode == 0, agrees.stderr
    assert f"ok: the fallback's map {written} agrees with {SYNAPSE}" in agrees.stdout
    policy = edited_synapse_policy(tmp_path)
    stale = spoa("check", str(policy), "--haproxy", HAPROXY_CFG, "--fallback-map", str(written))
    assert stale.returncode == 1
    version = load_policy(SYNAPSE).version
    assert f"error: the fallback's map {written} is of policy version {version}" in stale.stderr
    assert f"spoa fallback {policy} -o {written}" in stale.stderr
    # Regenerated, it agrees again.
    assert spoa("fallback", str(policy), "-o", str(written)).returncode == 0
    fresh = spoa("check", str(policy), "--haproxy", HAPROXY_CFG, "--fallback-map", str(written))
    assert fresh.returncode == 0, fresh.stderr


def test_check_haproxy_reads_the_map_the_configuration_names(tmp_path: Path) -> None:
    """The configuration's ${SPOA_FALLBACK_MAP-...}, from the environment."""
    written = tmp_path / "fallback.map"
    env = {"SPOA_FALLBACK_MAP": str(written)}
    absent = spoa("check", SYNAPSE, "--haproxy", HAPROXY_CFG, env=env)
    assert absent.returncode == 0
    assert f"note: no fallback map at {written} yet (expected before" in absent.stdout
    assert "HAProxy needs one to start" in absent.stdout
    written.write_text((ROOT / "policies" / "simple.yaml").read_text())
    broken = spoa("check", SYNAPSE, "--haproxy", HAPROXY_CFG, env=env)
    assert broken.returncode == 1
    assert f"error: {written} is not a whole fallback map" in broken.stderr
    spoa("fallback", str(ROOT / "policies" / "simple.yaml"), "-o", str(written))
    stale = spoa("check", SYNAPSE, "--haproxy", HAPROXY_CFG, env=env)
    assert stale.returncode == 1 and "is of policy version" in stale.stderr


def test_check_haproxy_fails_on_a_map_of_this_version_with_other_entries(
    tmp_path: Path,
) -> None:
    written = tmp_path / "fallback.map"
    assert spoa("fallback", SYNAPSE, "-o", str(written)).returncode == 0
    text = written.read_text()
    assert " typing 0 #0 " in text
    written.write_text(text.replace(" typing 0 #0 ", " main 0 #0 ", 1))
    result = spoa("check", SYNAPSE, "--haproxy", HAPROXY_CFG, "--fallback-map", str(written))
    assert result.returncode == 1
    assert f"error: {written} is not a whole fallback map (of this policy's version" in (
        result.stderr
    )
    assert "is of policy version" not in result.stderr


def test_check_haproxy_finds_fallback_lines_of_another_release(tmp_path: Path) -> None:
    config = tmp_path / "haproxy.cfg"
    text = Path(HAPROXY_CFG).read_text()
    config.write_text(text.replace("(?:rooms|join|knock)", "(?:rooms|join)", 1))
    result = spoa("check", SYNAPSE, "--haproxy", str(config))
    assert result.returncode == 1
    assert "are not this release's (no room regex)" in result.stderr


def test_a_policy_the_fallback_cannot_follow_is_refused_where_it_is_written(
    tmp_path: Path,
) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(
        "version: 1\nclasses: {main: , reader: }\ndefault: {class: main}\n"
        "rules:\n  - {name: spaced, class: reader, path: '^/_matrix/client/v3/a\\s'}\n"
    )
    result = spoa("check", str(policy))
    assert result.returncode == 1
    assert f"{policy}:5: rules[0].path" in result.stderr
    assert "HAProxy's fallback would not read it as the agent does" in result.stderr
    assert spoa("fallback", str(policy)).returncode == 1


def test_check_haproxy_of_a_missing_config_exits_1() -> None:
    result = spoa("check", SYNAPSE, "--haproxy", "/nonexistent/haproxy.cfg")
    assert result.returncode == 1
    assert "cannot read" in result.stderr


def test_traffic_lines_replay_through_explain_in_order() -> None:
    traffic = spoa("traffic", "--count", "200", "--seed", "5")
    assert traffic.returncode == 0
    lines = traffic.stdout.splitlines()
    assert len(lines) == 200
    assert spoa("traffic", "--count", "200", "--seed", "5").stdout == traffic.stdout
    explained = spoa("explain", SYNAPSE, "--jsonl", stdin=traffic.stdout)
    assert explained.returncode == 0, explained.stdout[-500:]
    decisions = [json.loads(x) for x in explained.stdout.splitlines()]
    assert len(decisions) == 200
    classes = {d["class"] for d in decisions}
    assert {"synchrotron", "event_creator", "federation_inbound", "media_repository"} <= classes


class _Whoami(http.server.BaseHTTPRequestHandler):
    """A homeserver's whoami that knows one opaque token."""

    def do_GET(self) -> None:
        known = self.headers.get("Authorization") == "Bearer mat_known_device_token"
        body = b'{"user_id": "@alice:example.org"}' if known else b'{"errcode": "M_UNKNOWN_TOKEN"}'
        self.send_response(200 if known else 401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_explain_asks_whoami_and_says_where_the_key_came_from(tmp_path: Path) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Whoami)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    site = tmp_path / "site.yaml"
    site.write_text(
        "version: 1\nextends: synapse-workers\nwhoami:\n"
        f"  url: http://127.0.0.1:{server.server_address[1]}/_matrix/client/v3/account/whoami\n"
    )
    lines = [
        {
            "method": "GET",
            "path": "/_matrix/client/v3/sync?since=s1",
            "headers": {"Authorization": f"Bearer {token}"},
        }
        for token in ("mat_known_device_token", "mat_unknown", "syt_YWxpY2U_x_y")
    ]
    try:
        result = spoa(
            "explain", str(site), "--jsonl", stdin="".join(json.dumps(x) + "\n" for x in lines)
        )
        offline = spoa(
            "explain",
            str(site),
            "GET",
            "/_matrix/client/v3/sync?since=s1",
            "-H",
            "Authorization: Bearer mat_known_device_token",
            "--no-whoami",
        )
    finally:
        server.shutdown()
    assert result.returncode == 0, result.stderr
    known, unknown, syt = (json.loads(x) for x in result.stdout.splitlines())
    assert (known["key_kind"], known["key_source"], known["key_via"], known["whoami"]) == (
        "user",
        "alice",
        "whoami",
        "user",
    )
    assert "mat_known" not in result.stdout.splitlines()[0]
    assert known["key"] == syt["key"] and "whoami" not in syt  # syt_ names its user itself
    assert (unknown["key_kind"], unknown["whoami"]) == ("token", "unknown_token")
    assert "key_via" not in unknown
    assert json.loads(offline.stdout)["key_kind"] == "token"


def test_every_limit_of_the_server_is_a_serve_flag_with_its_default() -> None:
    parser = cli._build_parser()
    argv = ["serve", "--static-class", "main"]
    assert cli._limits(parser.parse_args(argv)) == Limits()
    given = parser.parse_args([*argv, "--max-in-flight", "7", "--drain-timeout", "2.5"])
    assert cli._limits(given) == replace(Limits(), max_in_flight=7, drain_timeout=2.5)
    helped = spoa("serve", "--help").stdout
    for limit in fields(Limits):
        assert "--" + limit.name.replace("_", "-") in helped


def test_a_limit_out_of_range_is_refused_by_its_flag_s_name() -> None:
    refused = spoa("serve", "--static-class", "main", "--max-frame-size", "10")
    assert refused.returncode == 2
    assert "--max-frame-size must be within 256..16777216" in refused.stderr


def test_the_agent_s_commands_load_none_of_the_demo_s_modules() -> None:
    probe = (
        "import sys, spoa.cli; "
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('spoa.'))))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert "spoa.demo.commands" in loaded
    demo = {"spoa.traffic", *(m for m in loaded if m.startswith("spoa.demo."))}
    assert demo & set(loaded) == {"spoa.demo.commands"}, loaded


def test_show_lists_the_rules_in_effect_with_their_origin_and_patches(tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    site.write_text(
        "version: 1\nextends: synapse-workers\nrules:\n"
        "  patch: [{name: typing, class: main}]\n"
        "  before: [{name: bridge, class: main, key: user, path: '^/bridge/', methods: [PUT]}]\n"
    )
    result = spoa("show", str(site))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"{site}: policy synapse-workers version ")
    assert lines[0].endswith(", extends synapse-workers")
    rules = [line for line in lines if line[:3].strip().rstrip(".").isdigit()]
    policy = load_policy(str(site))
    assert len(rules) == len(policy.rules) == 25
    assert rules[0] == f" 1. bridge -> main, key user  ({site}:5)"
    typing = next(line for line in rules if ". typing ->" in line)
    assert typing.startswith(" 2. typing -> main, key none  (policies/synapse-workers.yaml:")
    assert typing.endswith(f", patched at {site}:4)")
    assert "methods PUT" in lines[lines.index(rules[0]) + 1]
    assert lines[-1].strip() == "default -> main, key none"
    # In the order decide() tries them, all of them.
    assert [line.split(". ", 1)[1].split(" ->")[0] for line in rules] == [
        r.name for r in policy.rules
    ]


def test_show_json_is_the_effective_policy(tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    site.write_text(
        "version: 1\nextends: synapse-workers\nrules:\n  patch: [{name: typing, class: main}]\n"
    )
    result = spoa("show", str(site), "--json")
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    policy = load_policy(str(site))
    assert shown["version"] == policy.version
    assert shown["extends"] == "synapse-workers"
    assert [r["name"] for r in shown["rules"]] == [r.name for r in policy.rules]
    typing = next(r for r in shown["rules"] if r["name"] == "typing")
    assert typing["class"] == "main"
    assert typing["source"].endswith("policies/synapse-workers.yaml")
    assert typing["patches"] == [f"{site}:4"]
    sync = next(r for r in shown["rules"] if r["name"] == "initial_sync")
    assert sync["query"] == {"present": [], "absent": ["since"]}
    assert sync["methods"] is None and sync["patches"] == []


def test_show_of_a_broken_policy_lists_the_errors_and_exits_1(tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    site.write_text(
        "version: 1\nextends: synapse-workers\nrules:\n  patch: [{name: nope, key: user}]\n"
    )
    result = spoa("show", str(site))
    assert result.returncode == 1
    assert f"{site}:4: rules.patch[0].name: no rule 'nope' to patch in" in result.stderr
    assert result.stdout == ""
