"""Cross-checks between a policy and an HAProxy configuration.

A class with no ``be_<class>`` backend silently lands on HAProxy's default
backend; a Lua fallback whose arguments disagree with the policy moves users
to other workers exactly when the agent is down. Both are caught here,
before deploying (``spoa check --haproxy``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from ipaddress import ip_address
from typing import Final

from .policy import CompiledPolicy, Request

FAMILIES: Final = (
    "sync",
    "initial_sync",
    "federation_inbound",
    "federation_reader",
    "media",
    "event_sending",
    "rest",
)

#: One request per family of the Lua fallback (but rest), to ask the policy what it does.
_SAMPLES: Final[dict[str, Request]] = {
    "sync": Request(
        "GET",
        "/_matrix/client/v3/sync",
        "since=s1",
        "Bearer syt_YWxpY2U_abcdefghijklmnopqrst_1a2b3c",
    ),
    "initial_sync": Request(
        "GET",
        "/_matrix/client/v3/sync",
        "timeout=0",
        "Bearer syt_YWxpY2U_abcdefghijklmnopqrst_1a2b3c",
    ),
    "federation_inbound": Request(
        "PUT",
        "/_matrix/federation/v1/send/1",
        None,
        'X-Matrix origin="remote.example",key="ed25519:a",sig="x"',
    ),
    "federation_reader": Request(
        "GET",
        "/_matrix/federation/v1/state_ids/!r:example.org",
        "event_id=%24e",
        'X-Matrix origin="remote.example",key="k"',
    ),
    "media": Request("GET", "/_matrix/media/v3/download/example.org/abc"),
    "event_sending": Request(
        "PUT",
        "/_matrix/client/v3/rooms/!r:example.org/send/m.room.message/1",
        None,
        "Bearer syt_YWxpY2U_abcdefghijklmnopqrst_1a2b3c",
    ),
}

_BACKEND = re.compile(r"^\s*backend\s+(\S+)", re.MULTILINE)
_FALLBACK = re.compile(r"^\s*http-request\s+lua\.matrix_fallback\s+(.*?)\s+(?:if|unless)\s", re.M)


def fallback_arguments(policy: CompiledPolicy) -> dict[str, str]:
    """What the Lua fallback's arguments must be for this policy."""
    args: dict[str, str] = {}
    for family in FAMILIES:
        if family == "rest":
            # Everything the fallback does not classify: the policy's default.
            args[family] = f"{policy.default.worker_class}:{policy.default.key.value}"
            continue
        decision = policy.decide(_SAMPLES[family]._replace(src=ip_address("192.0.2.1")))
        # The fallback keys by kind, not by the value a sample happened to have.
        rule = next((r for r in policy.rules if r.name == decision.rule), policy.default)
        args[family] = f"{decision.worker_class}:{rule.key.value}"
    args["seed"] = str(policy.seed)
    return args


def parse_fallback(line: str) -> dict[str, str]:
    args = {}
    for word in line.split():
        name, _, value = word.partition("=")
        args[name] = value
    return args


@dataclass
class Report:
    missing_backends: list[str] = field(default_factory=list)
    unused_backends: list[str] = field(default_factory=list)
    fallback_lines: list[dict[str, str]] = field(default_factory=list)
    fallback_expected: dict[str, str] = field(default_factory=dict)

    @property
    def fallback_agrees(self) -> bool:
        return any(line == self.fallback_expected for line in self.fallback_lines)

    @property
    def ok(self) -> bool:
        return not self.missing_backends and (not self.fallback_lines or self.fallback_agrees)


def check_haproxy(config: str, policy: CompiledPolicy) -> Report:
    """Compare a policy's classes and fallback with an HAProxy configuration."""
    # Ignore comments so commented-out sections do not count.
    text = "\n".join(line.split("#", 1)[0] for line in config.splitlines())
    backends = set(_BACKEND.findall(text))
    report = Report()
    report.missing_backends = [c for c in policy.classes if f"be_{c}" not in backends]
    classes = set(policy.classes)
    report.unused_backends = sorted(
        b for b in backends if b.startswith("be_") and b != "be_spoa" and b[3:] not in classes
    )
    report.fallback_lines = [parse_fallback(m) for m in _FALLBACK.findall(text)]
    report.fallback_expected = fallback_arguments(policy)
    return report


def format_report(report: Report, config_path: str, policy_path: str) -> list[str]:
    lines = []
    for name in report.missing_backends:
        lines.append(
            f"error: class {name!r} of {policy_path} has no backend be_{name} in {config_path}: "
            "its requests would go to the default backend"
        )
    if report.unused_backends:
        lines.append(
            f"note: backends in {config_path} that {policy_path} never routes to: "
            + ", ".join(report.unused_backends)
        )
    expected = " ".join(f"{k}={v}" for k, v in report.fallback_expected.items())
    if not report.fallback_lines:
        lines.append(f"note: {config_path} has no lua.matrix_fallback action")
    elif not report.fallback_agrees:
        lines.append(
            f"error: no lua.matrix_fallback line of {config_path} agrees with {policy_path}; "
            f"it should read: http-request lua.matrix_fallback {expected}"
        )
    else:
        lines.append(f"ok: the Lua fallback agrees with {policy_path}: {expected}")
    return lines
