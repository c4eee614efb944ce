"""The request mix of spoa.traffic: every kind drawn, deterministic for a seed."""

from __future__ import annotations

from collections import Counter

from spoa.traffic import MIX, Deployment, generate


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
