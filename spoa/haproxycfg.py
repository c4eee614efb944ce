"""Cross-checks between a policy and an HAProxy configuration.

A class with no ``be_<class>`` backend silently lands on HAProxy's default
backend; a fallback map made from another policy routes by old rules exactly
when the agent is down, and fallback lines of another release compute other
keys. All are caught here, before deploying (``spoa check --haproxy``).
"""

from __future__ import annotations

import enum
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .fallback import entry_version, fallback_map, map_entries, map_version
from .findings import Finding, Level
from .matrix.keys import NATIVE_REGEXES
from .policy import CompiledPolicy

_BACKEND = re.compile(r"^\s*backend\s+(\S+)", re.MULTILINE)
_FALLBACK = re.compile(r'\bmap_reg\(("[^"]*"|[^,)]*)')
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:-([^}]*))?\}")


def expand_env(text: str, environ: Mapping[str, str]) -> str:
    """HAProxy's "${NAME}" and "${NAME-default}" in a quoted word, quotes removed."""
    text = text.strip('"')
    return _ENV.sub(lambda m: environ.get(m.group(1), m.group(2) or ""), text)


class Fallback(enum.Enum):
    """How the fallback's map compares with the policy."""

    AGREES = "agrees"
    STALE = "stale"  # a map of another policy version
    BROKEN = "broken"  # not a (whole) map of this release
    ABSENT = "absent"  # no file (yet: the agent writes it when it starts)
    NOT_CALLED = "not called"  # the configuration does not run the fallback


@dataclass
class Report:
    missing_backends: list[str] = field(default_factory=list)
    unused_backends: list[str] = field(default_factory=list)
    fallback: Fallback = Fallback.NOT_CALLED
    #: The map file compared (the one map_reg names, or the one given).
    map_path: str | None = None
    #: The policy version the file was made from, or what is wrong with it.
    detail: str = ""
    #: Key regexes of this release the configuration's fallback lines lack.
    missing_key_lines: list[str] = field(default_factory=list)
    #: The running HAProxy's map: None when not asked, else whether it agrees.
    running: bool | None = None
    running_detail: str = ""


def check_fallback(policy: CompiledPolicy, map_path: str | None, report: Report) -> None:
    """Compare the map HAProxy would load with the one the policy makes."""
    if map_path is None:
        return
    report.map_path = map_path
    try:
        with open(map_path, encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError:
        report.fallback = Fallback.ABSENT
        return
    except (OSError, UnicodeDecodeError) as exc:
        report.fallback, report.detail = Fallback.BROKEN, str(exc)
        return
    version = map_version(text)
    if text == fallback_map(policy):
        report.fallback = Fallback.AGREES
    elif version is None:
        report.fallback = Fallback.BROKEN
    elif version == policy.version:
        # This very policy's version, other content: not stale, but wrong.
        report.fallback = Fallback.BROKEN
        report.detail = (
            "of this policy's version, but with other entries: edited by hand, "
            "or made by another release of spoa"
        )
    else:
        report.fallback, report.detail = Fallback.STALE, version


def check_running(
    policy: CompiledPolicy, running: Sequence[tuple[str, str]] | str, report: Report
) -> None:
    """Compare the map the running HAProxy routes by (or why it could not be read)."""
    if isinstance(running, str):
        report.running, report.running_detail = False, running
        return
    report.running = list(running) == map_entries(policy)
    if not report.running:
        versions = {v for _, value in running if (v := entry_version(value)) is not None}
        report.running_detail = (
            f"policy version {', '.join(sorted(versions))}" if versions else "empty"
        )


def check_haproxy(
    config: str,
    policy: CompiledPolicy,
    map_path: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Report:
    """Compare a policy's classes and fallback with an HAProxy configuration.

    The fallback's map is ``map_path`` if given, else the file the
    configuration's ``map_reg`` names (with HAProxy's ``${NAME-default}``
    expanded from ``environ``, the process's by default).
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
    # The regexes hold "#", which the comment stripping above cut.
    report.missing_key_lines = [
        name for name, regex in NATIVE_REGEXES.items() if f'"{regex}"' not in config
    ]
    report.fallback = Fallback.ABSENT
    if map_path is None and calls[0]:
        map_path = expand_env(calls[0], os.environ if environ is None else environ)
    check_fallback(policy, map_path, report)
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
                Level.OK,
                f"{config_path} also has backends for classes {policy_path} does not use "
                "(nothing is wrong: no request reaches them): " + ", ".join(report.unused_backends),
            )
        )
    table = report.map_path
    regenerate = f"spoa fallback {policy_path} -o {table}"
    messages = {
        Fallback.NOT_CALLED: (
            Level.NOTE,
            f"{config_path} has no fallback (no map_reg lookup): with the agent down, every "
            "request goes to the default backend",
        ),
        Fallback.AGREES: (
            Level.OK,
            f"the fallback's map {table} agrees with {policy_path}",
        ),
        Fallback.STALE: (
            Level.ERROR,
            f"the fallback's map {table} is of policy version "
            f"{report.detail}, not of {policy_path}: with the agent down, requests would be "
            f"routed by the old rules; regenerate it ({regenerate}), or run the agent with "
            f"--fallback-map {table}",
        ),
        Fallback.BROKEN: (
            Level.ERROR,
            f"{table} is not a whole fallback map"
            + (f" ({report.detail})" if report.detail else "")
            + f"; regenerate it: {regenerate}",
        ),
        Fallback.ABSENT: (
            Level.NOTE,
            f"no fallback map at {table} yet (expected before the agent's first start): "
            f"HAProxy needs one to start; the agent writes it (--fallback-map), or: {regenerate}"
            if table
            else "the fallback's map_reg names no file",
        ),
    }
    findings.append(Finding(*messages[report.fallback]))
    if report.missing_key_lines:
        findings.append(
            Finding(
                Level.ERROR,
                f"the fallback's key lines of {config_path} are not this release's (no "
                f"{', '.join(report.missing_key_lines)} regex): with the agent down, keys "
                "would differ from the agent's; take them from haproxy/haproxy.cfg",
            )
        )
    if report.running is True:
        findings.append(
            Finding(Level.OK, f"the running HAProxy's fallback map agrees with {policy_path}")
        )
    elif report.running is False:
        findings.append(
            Finding(
                Level.ERROR,
                f"the running HAProxy's fallback map is not {policy_path}'s "
                f"({report.running_detail}): the agent pushes each policy it loads "
                "(spoa serve --haproxy-socket)",
            )
        )
    return findings
