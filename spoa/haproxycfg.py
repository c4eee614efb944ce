"""Cross-checks between a policy and an HAProxy configuration.

A class with no ``be_<class>`` backend silently lands on HAProxy's default
backend; a Lua fallback whose table is of another policy routes by old rules
exactly when the agent is down. Both are caught here,
before deploying (``spoa check --haproxy``).
"""

from __future__ import annotations

import enum
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from .fallback import UntranslatableError, fallback_table, table_version
from .findings import Finding, Level
from .policy import CompiledPolicy

_BACKEND = re.compile(r"^\s*backend\s+(\S+)", re.MULTILINE)
_FALLBACK = re.compile(r"\blua\.matrix_fallback\(([^)]*)\)")
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:-([^}]*))?\}")


def expand_env(text: str, environ: Mapping[str, str]) -> str:
    """HAProxy's "${NAME}" and "${NAME-default}" in a quoted word, quotes removed."""
    text = text.strip('"')
    return _ENV.sub(lambda m: environ.get(m.group(1), m.group(2) or ""), text)


class Fallback(enum.Enum):
    """How the fallback's table compares with the policy."""

    AGREES = "agrees"
    STALE = "stale"  # a table of another policy version
    BROKEN = "broken"  # not a (whole) table
    ABSENT = "absent"  # no file (yet: the agent writes it when it starts)
    UNTRANSLATABLE = "untranslatable"  # no table can follow this policy
    NOT_CALLED = "not called"  # the configuration does not run the fallback


@dataclass
class Report:
    missing_backends: list[str] = field(default_factory=list)
    unused_backends: list[str] = field(default_factory=list)
    fallback: Fallback = Fallback.NOT_CALLED
    #: The table file compared (the converter's argument, or the one given).
    table_path: str | None = None
    #: The policy version the file was made from, or why no table can be.
    detail: str = ""


def check_fallback(policy: CompiledPolicy, table_path: str | None, report: Report) -> None:
    """Compare the table HAProxy would load with the one the policy makes."""
    try:
        expected = fallback_table(policy)
    except UntranslatableError as exc:
        report.fallback, report.detail = Fallback.UNTRANSLATABLE, str(exc)
        return
    if table_path is None:
        return
    report.table_path = table_path
    try:
        with open(table_path, encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError:
        report.fallback = Fallback.ABSENT
        return
    except (OSError, UnicodeDecodeError) as exc:
        report.fallback, report.detail = Fallback.BROKEN, str(exc)
        return
    version = table_version(text)
    if text == expected:
        report.fallback = Fallback.AGREES
    elif version is None:
        report.fallback = Fallback.BROKEN
    elif version == policy.version:
        # This very policy's version, other content: not stale, but wrong.
        report.fallback = Fallback.BROKEN
        report.detail = (
            "of this policy's version, but with other rules: edited by hand, "
            "or made by another release of spoa"
        )
    else:
        report.fallback, report.detail = Fallback.STALE, version


def check_haproxy(
    config: str,
    policy: CompiledPolicy,
    table_path: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Report:
    """Compare a policy's classes and fallback with an HAProxy configuration.

    The fallback's table is ``table_path`` if given, else the file the
    configuration's ``lua.matrix_fallback`` converter names (with HAProxy's
    ``${NAME-default}`` expanded from ``environ``, the process's by default).
    """
    # Ignore comments so commented-out sections do not count.
    text = "\n".join(line.split("#", 1)[0] for line in config.splitlines())
    backends = set(_BACKEND.findall(text))
    report = Report()
    report.missing_backends = [c for c in policy.classes if f"be_{c}" not in backends]
    classes = set(policy.classes)
    report.unused_backends = sorted(
        b for b in backends if b.startswith("be_") and b != "be_spoa" and b[3:] not in classes
    )
    calls = _FALLBACK.findall(text)
    if not calls:
        return report
    report.fallback = Fallback.ABSENT
    if table_path is None and calls[0]:
        table_path = expand_env(calls[0], os.environ if environ is None else environ)
    check_fallback(policy, table_path, report)
    return report


def format_report(report: Report, config_path: str, policy_path: str) -> list[Finding]:
    """The report as findings: a missing backend or a fallback that disagrees is an error."""
    findings = [
        Finding(
            Level.ERROR,
            f"class {name!r} of {policy_path} has no backend be_{name} in {config_path}: "
            "its requests would go to the default backend",
        )
        for name in report.missing_backends
    ]
    if report.unused_backends:
        findings.append(
            Finding(
                Level.NOTE,
                f"backends in {config_path} that {policy_path} never routes to: "
                + ", ".join(report.unused_backends),
            )
        )
    table = report.table_path
    regenerate = f"spoa fallback {policy_path} -o {table}"
    messages = {
        Fallback.NOT_CALLED: (
            Level.NOTE,
            f"{config_path} never calls the lua.matrix_fallback converter",
        ),
        Fallback.AGREES: (
            Level.OK,
            f"the Lua fallback's table {table} agrees with {policy_path}",
        ),
        Fallback.STALE: (
            Level.ERROR,
            f"the Lua fallback's table {table} is of policy version "
            f"{report.detail}, not of {policy_path}: with the agent down, requests would be "
            f"routed by the old rules; regenerate it ({regenerate}), or run the agent with "
            f"--fallback-table {table}",
        ),
        Fallback.BROKEN: (
            Level.ERROR,
            f"{table} is not a whole fallback table"
            + (f" ({report.detail})" if report.detail else "")
            + f"; regenerate it: {regenerate}",
        ),
        Fallback.ABSENT: (
            Level.NOTE,
            f"no fallback table at {table} yet; the agent writes it "
            f"(--fallback-table), or: {regenerate}"
            if table
            else "the lua.matrix_fallback converter names no table",
        ),
        Fallback.UNTRANSLATABLE: (
            Level.ERROR,
            f"the Lua fallback cannot follow {policy_path}: {report.detail}",
        ),
    }
    findings.append(Finding(*messages[report.fallback]))
    return findings
