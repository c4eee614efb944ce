"""The recorder: secrets replaced by stand-ins that route alike, rate, rotation, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spoa import traffic
from spoa.matrix.tokens import access_token
from spoa.policy import Decision, Request, load_policy
from spoa.policy.reload import PolicyHolder
from spoa.record import Recorder, Scrubber
from spoa.routing import RouteHandler
from spoa.spop import Notify
from tests.replay import assert_replays_as_recorded

ROOT = Path(__file__).resolve().parent.parent
POLICY = ROOT / "policies" / "synapse-workers.yaml"
SYT = "syt_YWxpY2U_abcdefghijklmnopqrst_1a2b3c"


def test_a_syt_token_keeps_its_user_and_routes_to_the_same_key() -> None:
    scrub = Scrubber(b"k" * 32)
    stand_in = scrub.token(SYT)
    assert stand_in.startswith("syt_YWxpY2U_") and "abcdefghijklmnopqrst" not in stand_in
    policy = load_policy(str(POLICY))
    sync = ("GET", "/_matrix/client/v3/sync", "since=s1")
    before = policy.decide(Request(*sync, f"Bearer {SYT}"))
    after = policy.decide(Request(*sync, scrub.authorization(f"Bearer {SYT}")))
    assert before.key_kind == "user" and (before.key, before.rule) == (after.key, after.rule)


def test_other_tokens_get_one_stable_pseudonym_each() -> None:
    scrub = Scrubber(b"k" * 32)
    assert scrub.token("mat_secret1") == scrub.token("mat_secret1")
    assert scrub.token("mat_secret1") != scrub.token("mat_secret2")
    assert scrub.token("mat_secret1").startswith("rec_")
    # Another recording (another key): other pseudonyms, nothing to correlate.
    assert Scrubber(b"j" * 32).token("mat_secret1") != scrub.token("mat_secret1")


def test_x_matrix_keeps_its_origin_and_loses_key_and_signature() -> None:
    scrub = Scrubber()
    header = 'X-Matrix origin="remote.example",destination="me",key="ed25519:a",sig="c2ln"'
    assert scrub.authorization(header) == 'X-Matrix origin="remote.example"'
    escaped = r'X-Matrix origin="we\"ird",sig="x"'
    policy = load_policy(str(POLICY))
    send = ("PUT", "/_matrix/federation/v1/send/1")
    for auth in (header, escaped):
        kept = scrub.authorization(auth)
        assert "sig" not in (kept or "")
        assert policy.decide(Request(*send, None, auth)).key == (
            policy.decide(Request(*send, None, kept)).key
        )
    assert scrub.authorization("X-Matrix garbage") is None
    assert scrub.authorization("Basic dXNlcjpwYXNz") is None


def test_queries_lose_tokens_and_secrets_and_keep_the_rest() -> None:
    scrub = Scrubber()
    query = scrub.query("since=s1&access_token=mat_x%2Fy&token=t&client_secret=c&sid=9&a")
    assert "mat_x" not in query and "=t&" not in query
    assert query.startswith("since=s1&access_token=rec_")
    assert query.endswith("&token=redacted&client_secret=redacted&sid=redacted&a")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_rate_limit_is_a_token_bucket(tmp_path: Path) -> None:
    clock = Clock()
    recorder = Recorder(str(tmp_path / "r.jsonl"), rate=5, clock=clock)
    assert sum(recorder.wants() for _ in range(100)) == 5
    clock.now = 0.4
    assert sum(recorder.wants() for _ in range(100)) == 2
    clock.now = 10.0  # a long pause fills the bucket to one second's worth, no more
    assert sum(recorder.wants() for _ in range(100)) == 5
    assert recorder.stats.skipped == 300 - 12


def decided(count: int) -> list[tuple[Request, Decision]]:
    policy = load_policy(str(POLICY))
    out = []
    for t in traffic.generate(count):
        request = Request(t.method, t.path, t.query, t.auth, t.src)
        out.append((request, policy.decide(request)))
    return out


def test_rotation_keeps_the_file_and_one_before_it_under_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    recorder = Recorder(str(path), rate=1e9, max_bytes=8192)
    for request, decision in decided(300):
        recorder.write(request, decision)
    recorder.close()
    assert recorder.stats.rotations >= 2
    for each in (path, Path(f"{path}.1")):
        assert 0 < each.stat().st_size <= 8192
        for line in each.read_text().splitlines():
            json.loads(line)
    assert recorder.stats.written == 300
    assert path.stat().st_mode & 0o777 == 0o600


def test_a_write_error_stops_recording_not_routing(tmp_path: Path) -> None:
    recorder = Recorder("/dev/full", rate=1e9)
    handler = RouteHandler(PolicyHolder(str(POLICY)), recorder=recorder)
    message = traffic.TrafficRequest("sync", "GET", "/_matrix/client/v3/sync").route_message()
    answers = [handler(Notify(1, i, [message])) for i in range(5)]
    assert all(isinstance(a, bytes) and a for a in answers)
    assert recorder.stats.errors == 1 and not recorder.active
    assert not recorder.wants()


def test_the_recorder_refuses_bad_settings(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="above 0"):
        Recorder(str(tmp_path / "r"), rate=0)
    with pytest.raises(ValueError, match="4096"):
        Recorder(str(tmp_path / "r"), max_bytes=10)
    with pytest.raises(OSError):
        Recorder(str(tmp_path / "no" / "such" / "dir"))


def test_a_recorded_flood_holds_no_secret_and_replays_to_the_recorded_classes(
    tmp_path: Path,
) -> None:
    path = tmp_path / "flood.jsonl"
    recorder = Recorder(str(path), rate=1e9)
    policy = load_policy(str(POLICY))
    secrets = set()
    for i, (sent, _) in enumerate(decided(3000)):
        # Every request a secret of its own: opaque tokens, signatures, query tokens.
        request = sent
        if sent.path.startswith("/_matrix/federation"):
            sig = f"signature{i:05d}"
            auth = f'X-Matrix origin="s{i % 7}.example",key="ed25519:k",sig="{sig}"'
            request = sent._replace(auth=auth)
            secrets.add(sig)
        elif i % 3 == 0:
            opaque = f"mat_opaque{i:05d}secret"
            request = sent._replace(auth=f"Bearer {opaque}")
            secrets.add(opaque)
        token = access_token(request.auth, request.query)
        if token:
            secrets.add(token.split("_", 2)[-1] if token.startswith("syt_") else token)
        recorder.write(request, policy.decide(request))
    recorder.close()
    text = path.read_text()
    assert len(text.splitlines()) == 3000
    assert_replays_as_recorded(text, POLICY, secrets)
