"""spoa diff: what a policy edit moves, in text and JSON, with its exit codes."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from spoa import traffic
from spoa.cli import main
from spoa.policy import Request, load_policy
from spoa.policy.diff import diff, shown

ROOT = Path(__file__).resolve().parents[2]
BASE = str(ROOT / "policies" / "synapse-workers.yaml")


def site(tmp_path: Path, body: str, name: str = "site.yaml") -> str:
    path = tmp_path / name
    path.write_text(f"version: 1\nname: site\nextends: synapse-workers\n{body}")
    return str(path)


def requests(count: int = 10_000) -> list[Request]:
    return [Request(t.method, t.path, t.query, t.auth, t.src) for t in traffic.generate(count)]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["diff", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_moving_the_profile_routes_moves_exactly_the_profile_requests(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    moved = site(tmp_path, "rules:\n  patch:\n    - {name: profile, class: main}\n")
    base = load_policy(BASE)
    profile = sum(1 for r in requests() if base.decide(r).rule == "profile")
    assert profile > 50  # spoa.traffic has them (1% of its mix)
    code, out, _ = run(capsys, BASE, moved)
    assert code == 1
    assert f"changed: {profile} ({profile / 100:.2f}%): class {profile}, rule only 0" in out
    assert re.search(rf"^  event_creator -> main +{profile} +{profile / 100:.2f}%$", out, re.M)
    assert "GET /_matrix/client/v3/profile/@user" in out
    code, out, _ = run(capsys, BASE, moved, "--json")
    report = json.loads(out)
    assert code == 1
    assert report["requests"] == 10_000 and report["changed"] == profile
    assert report["classes"] == [
        {"old": "event_creator", "new": "main", "requests": profile, "share": profile / 10_000}
    ]
    (move,) = report["moves"]
    assert (move["old_rule"], move["new_rule"], move["requests"]) == ("profile", "profile", profile)
    assert all(e.startswith("GET /_matrix/client/v3/profile/") for e in move["examples"])


def test_the_same_routing_changes_nothing_and_exits_0(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Another file, another version, the same effective rules.
    same = site(tmp_path, "# nothing of my own yet\n")
    code, out, _ = run(capsys, BASE, same, "--count", "2000")
    assert code == 0
    assert "2000 requests (spoa.traffic)" in out
    assert "nothing changes" in out


def test_a_new_rule_takes_requests_from_the_rules_it_comes_before(tmp_path: Path) -> None:
    bridged = site(
        tmp_path,
        "classes:\n  bridges: {description: appservices}\nrules:\n  before:\n"
        "    - {name: bridge_sync, class: bridges, key: user, methods: [GET],"
        " path: '^/_matrix/client/v3/sync$'}\n",
    )
    sample, base = requests(5000), load_policy(BASE)
    report = diff(base, load_policy(bridged), sample)
    decided = [base.decide(r) for r in sample if r.path.endswith("/v3/sync") and r.method == "GET"]
    syncs = Counter(d.rule for d in decided)
    changes = {rule: (old, new) for rule, old, new in report.rule_changes()}
    assert changes["bridge_sync"] == (0, sum(syncs.values()))
    for rule, count in syncs.items():
        assert changes[rule][0] - changes[rule][1] == count
    classes = Counter(d.worker_class for d in decided)
    assert report.class_moves() == [(c, "bridges", n) for c, n in classes.most_common()]


def test_a_new_seed_changes_keys_only(tmp_path: Path) -> None:
    reseeded = site(tmp_path, "seed: 7\n")
    sample, base = requests(3000), load_policy(BASE)
    report = diff(base, load_policy(reseeded), sample)
    assert report.class_changed == 0 and report.rule_changed == 0
    keyed = sum(1 for r in sample if base.decide(r).key_kind != "none")
    assert report.key_changed == keyed > 0


def test_examples_never_show_a_token(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    moved = site(tmp_path, "rules:\n  patch:\n    - {name: sync, class: main}\n")
    code, out, _ = run(capsys, BASE, moved, "--count", "3000")
    assert code == 1
    tokens = {t.auth.split()[-1] for t in traffic.generate(3000) if t.auth}
    assert tokens and not any(token in out for token in tokens)
    assert shown(Request("GET", "/s", "since=1&access_token=syt_x&t=2")) == (
        "GET /s?since=1&access_token=<token>&t=2"
    )


def test_requests_from_a_jsonl_file_and_its_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    moved = site(tmp_path, "rules:\n  patch:\n    - {name: profile, class: main}\n")
    sample = tmp_path / "sample.jsonl"
    lines = [json.dumps(t.as_json()) for t in traffic.generate(500)]
    lines.append(json.dumps({"method": "GET", "path": "/_matrix/client/v3/profile/@a:x"}))
    sample.write_text("\n".join(lines) + "\n")
    code, out, _ = run(capsys, BASE, moved, "--requests", str(sample))
    assert code == 1 and f"501 requests ({sample})" in out
    sample.write_text(lines[0] + "\nnot json\n" + json.dumps({"method": 1}) + "\n")
    code, _, err = run(capsys, BASE, moved, "--requests", str(sample))
    assert code == 2
    assert "line 2:" in err and "line 3:" in err and "2 lines are not requests" in err
    code, _, err = run(capsys, BASE, moved, "--requests", str(tmp_path / "absent.jsonl"))
    assert code == 2 and "cannot read" in err
    sample.write_text("\n")
    code, _, err = run(capsys, BASE, moved, "--requests", str(sample))
    assert code == 2 and "no requests" in err


def test_a_broken_policy_is_an_error_not_a_change(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = site(tmp_path, "rules:\n  patch:\n    - {name: no_such_rule, class: main}\n")
    code, out, err = run(capsys, BASE, broken)
    assert code == 2 and out == ""
    assert "no_such_rule" in err
