"""The request mix of spoa.traffic: every kind drawn, deterministic for a seed."""

from __future__ import annotations

from collections import Counter
from ipaddress import ip_address
from pathlib import Path

import pytest

from spoa.policy import Request, load_policy
from spoa.traffic import MIX, Deployment, generate, one_per_key

SYNAPSE_WORKERS = Path(__file__).resolve().parents[1] / "policies" / "synapse-workers.yaml"


def test_the_same_seed_draws_the_same_requests() -> None:
    first = list(generate(2000, Deployment(seed=3)))
    again = list(generate(2000, Deployment(seed=3)))
    other = list(generate(2000, Deployment(seed=4)))
    assert first == again
    assert first != other


def test_every_kind_of_the_mix_is_drawn_near_its_weight() -> None:
    count = 20000
    kinds = Counter(r.kind for r in generate(count, Deployment()))
    total = sum(weight for _, weight in MIX)
    assert set(kinds) == {kind for kind, _ in MIX}
    for kind, weight in MIX:
        assert abs(kinds[kind] / count - weight / total) < 0.02, kind


def test_requests_are_shaped_as_clients_send_them() -> None:
    for request in generate(3000, Deployment(opaque_share=0.5)):
        assert request.path.startswith(("/_matrix/", "/_synapse/")), request
        assert request.method in {"GET", "POST", "PUT"}
        if request.kind == "federation_send":
            assert request.auth is not None and request.auth.startswith("X-Matrix origin=")
        elif request.kind in {"versions"}:
            assert request.auth is None
        elif request.auth is None:
            assert request.query is not None and "access_token=" in request.query
        else:
            assert request.auth.startswith(("Bearer syt_", "Bearer mat_", "X-Matrix"))
        assert request.route_message().args["path"] == request.path


@pytest.mark.parametrize(
    ("key_kind", "worker_class"),
    [("user", "synchrotron"), ("room", "event_creator"), ("origin", "federation_inbound")],
)
def test_one_request_per_key_gives_each_request_a_key_of_its_own(
    key_kind: str, worker_class: str
) -> None:
    policy = load_policy(str(SYNAPSE_WORKERS))
    requests = one_per_key(key_kind, 500, seed=9)
    decisions = [
        policy.decide(Request(r.method, r.path, r.query, r.auth, ip_address(r.src)))
        for r in requests
    ]
    assert {(d.worker_class, d.key_kind) for d in decisions} == {(worker_class, key_kind)}
    assert len({d.key_source for d in decisions}) == len({d.key for d in decisions}) == 500
    assert one_per_key(key_kind, 500, seed=9) == requests
    assert one_per_key(key_kind, 500, seed=10) != requests


def test_one_request_per_key_knows_only_the_hashed_kinds() -> None:
    with pytest.raises(ValueError, match="key kind 'token'"):
        one_per_key("token", 1)
