"""The SPOE contract: route message arguments in, txn.route.* variables out."""

from __future__ import annotations

import logging
import re
from ipaddress import IPv4Address
from pathlib import Path

import pytest
import xxhash

from spoa import routing
from spoa.policy.reload import PolicyHolder
from spoa.routing import RouteHandler
from spoa.spop import Message, Notify, Scope, SetVar, Value
from spoa.spop.testing import decode_actions

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "syt_YWxpY2U_secretsecretsecret_1a2b3c"


@pytest.fixture
def handler() -> RouteHandler:
    return RouteHandler(PolicyHolder(str(ROOT / "policies" / "synapse-workers.yaml")))


def at_once(handler: RouteHandler, event: Notify) -> bytes:
    """The handler's answer, which must not wait for anything."""
    payload = handler(event)
    assert isinstance(payload, bytes), payload
    return payload


def answer(handler: RouteHandler, **args: Value) -> list[SetVar]:
    payload = at_once(handler, Notify(1, 1, [Message("route", dict(args))]))
    actions = decode_actions(payload, 0, len(payload))
    assert all(isinstance(a, SetVar) and a.scope == Scope.TXN for a in actions)
    return actions  # type: ignore[return-value]


def test_a_keyed_request_sets_backend_key_rule_and_policy(handler: RouteHandler) -> None:
    actions = answer(
        handler,
        method="GET",
        path="/_matrix/client/v3/sync",
        query="since=s1_2&timeout=30000",
        auth=f"Bearer {TOKEN}",
        src=IPv4Address("192.0.2.7"),
    )
    version = handler.holder.current.version
    key = xxhash.xxh32_intdigest(b"alice#0")
    assert actions == [
        SetVar(Scope.TXN, "backend", "synchrotron"),
        SetVar(Scope.TXN, "key", key),
        SetVar(Scope.TXN, "rule", "sync"),
        SetVar(Scope.TXN, "policy", version),
    ]


def test_a_request_without_key_sets_no_key_variable(handler: RouteHandler) -> None:
    actions = answer(handler, method="GET", path="/_matrix/media/v3/download/x/y")
    assert [a.name for a in actions] == ["backend", "rule", "policy"]
    assert actions[0].value == "media_repository"


def test_the_default_rule_is_reported_as_default(handler: RouteHandler) -> None:
    actions = answer(handler, method="POST", path="/_matrix/client/v3/logout")
    assert (actions[0].value, actions[-2].value) == ("main", "default")


def test_a_raw_token_never_appears_in_any_variable(handler: RouteHandler) -> None:
    for kind_path in ("/_matrix/client/v3/sync", "/_matrix/client/v3/profile/@a:x"):
        for auth, query in ((f"Bearer {TOKEN}", None), (None, f"access_token={TOKEN}")):
            payload = at_once(
                handler,
                Notify(
                    1,
                    1,
                    [
                        Message(
                            "route",
                            {"method": "GET", "path": kind_path, "auth": auth, "query": query},
                        )
                    ],
                ),
            )
            assert b"secret" not in payload
            assert TOKEN.encode() not in payload


def test_null_and_odd_argument_types_are_tolerated(handler: RouteHandler) -> None:
    actions = answer(handler, method=None, path=None, query=5, auth=b"bin", src="not-an-ip")
    assert actions[0] == SetVar(Scope.TXN, "backend", "main")


def test_without_a_route_message_nothing_is_set(handler: RouteHandler) -> None:
    assert handler(Notify(1, 1, [Message("other", {"path": "/x"})])) == b""
    assert handler.stats.unrouted == 1


def test_the_route_message_is_found_among_others(handler: RouteHandler) -> None:
    event = Notify(
        1, 1, [Message("other", {}), Message("route", {"method": "GET", "path": "/_matrix/media/"})]
    )
    payload = at_once(handler, event)
    assert decode_actions(payload, 0, len(payload))[0].value == "media_repository"  # type: ignore[union-attr]


def test_a_reload_changes_the_answer_at_once(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    text = (
        "version: 1\nclasses: {main: , a: , b: }\ndefault: {class: main}\n"
        "rules:\n  - {name: r, class: CLASS, path: '^/x'}\n"
    )
    path.write_text(text.replace("CLASS", "a"))
    handler = RouteHandler(PolicyHolder(str(path), settle=0))
    assert answer(handler, method="GET", path="/x")[0].value == "a"
    path.write_text(text.replace("CLASS", "b"))
    handler.holder.reload()
    actions = answer(handler, method="GET", path="/x")
    assert actions[0].value == "b"
    assert actions[-1].value == handler.holder.current.version


def test_debug_logging_of_decisions_is_off_by_default_and_never_logs_the_key_source(
    caplog: pytest.LogCaptureFixture,
) -> None:
    holder = PolicyHolder(str(ROOT / "policies" / "synapse-workers.yaml"))
    event = Notify(
        1,
        1,
        [
            Message(
                "route",
                {
                    "method": "GET",
                    "path": "/_matrix/client/v3/sync",
                    "auth": f"Bearer {TOKEN}",
                    "query": "since=1",
                },
            )
        ],
    )
    with caplog.at_level(logging.INFO, logger="spoa.routing"):
        RouteHandler(holder)(event)
    assert not [r for r in caplog.records if r.name == "spoa.routing"]
    with caplog.at_level(logging.DEBUG, logger="spoa.routing"):
        RouteHandler(holder)(event)
    (record,) = [r for r in caplog.records if r.name == "spoa.routing"]
    message = record.getMessage()
    assert "synchrotron" in message and "rule=sync" in message and "key_kind=user" in message
    assert TOKEN not in message and "secret" not in message and "alice" not in message


def test_the_shipped_spoe_configuration_sends_and_registers_the_contract_s_names() -> None:
    text = (ROOT / "haproxy" / "spoe-router.conf").read_text()
    (message,) = re.findall(r"^spoe-message (\S+)", text, re.M)
    (args,) = re.findall(r"^\s+args (.+)$", text, re.M)
    (registered,) = re.findall(r"^\s+register-var-names (.+)$", text, re.M)
    assert message == routing.MESSAGE
    sent = [arg.split("=", 1)[0] for arg in args.split()]
    assert sent == [*routing.route_message("GET", "/").args]
    assert set(registered.split()) == {
        routing.VAR_BACKEND,
        routing.VAR_KEY,
        routing.VAR_RULE,
        routing.VAR_POLICY,
    }


def test_a_built_route_message_is_decided_like_haproxy_s() -> None:
    holder = PolicyHolder(str(ROOT / "policies" / "synapse-workers.yaml"))
    message = routing.route_message(
        "GET", "/_matrix/client/v3/sync", "since=s1", f"Bearer {TOKEN}", IPv4Address("10.0.0.1")
    )
    payload = at_once(RouteHandler(holder), Notify(1, 1, [message]))
    names = {a.name: a.value for a in decode_actions(payload, 0, len(payload))}  # type: ignore[union-attr]
    assert names[routing.VAR_BACKEND] == "synchrotron"
    assert names[routing.VAR_KEY] == xxhash.xxh32_intdigest(b"alice#0")


def test_static_actions_send_everything_to_one_class() -> None:
    assert [(a.name, a.value) for a in routing.static_actions("main")] == [
        ("backend", "main"),
        ("rule", "static"),
        ("policy", "static"),
    ]
