"""The policy in effect: what ``spoa show`` prints.

After ``extends``, the rules a policy routes by come from several files:
the base's, the site's own, and the base's rules patched by the site. This
lays them out in the order they are tried, each with the file and line it
was written at and every patch made to it since.
"""

from __future__ import annotations

import os
from typing import Any

from .compiled import CompiledPolicy
from .schema import RuleSpec


def _where(source: str, line: int | None = None) -> str:
    """A file as the operator would type it: relative to here when it is below."""
    relative = os.path.relpath(source) if source else ""
    shown = relative if relative and not relative.startswith("..") else source
    return f"{shown}:{line}" if line is not None else shown


def _patch_where(patch: str) -> str:
    source, _, line = patch.rpartition(":")
    return _where(source, int(line)) if line.isdigit() else patch


def effective(policy: CompiledPolicy) -> dict[str, Any]:
    """The policy in effect as plain data (``spoa show --json``)."""
    spec = policy.spec
    rules = []
    for rule in policy.rules:
        assert rule.spec is not None
        rules.append(_rule(rule.spec))
    return {
        "source": spec.source,
        "version": policy.version,
        "name": spec.name,
        "extends": spec.extends or None,
        "seed": spec.seed,
        "classes": list(spec.classes),
        "default": {"class": spec.default_class, "key": spec.default_key.value},
        "whoami": spec.whoami.url if spec.whoami else None,
        "rules": rules,
    }


def _rule(rule: RuleSpec) -> dict[str, Any]:
    return {
        "name": rule.name,
        "class": rule.worker_class,
        "key": rule.key.value,
        "methods": sorted(rule.methods) if rule.methods is not None else None,
        "paths": list(rule.paths),
        "query": {"present": list(rule.query_present), "absent": list(rule.query_absent)},
        "description": rule.description,
        "source": rule.source,
        "line": rule.line,
        "patches": list(rule.patches),
    }


def format_text(policy: CompiledPolicy) -> str:
    """The policy in effect for a reader: rules in the order they are tried."""
    spec = policy.spec
    head = f"{_where(spec.source)}: policy {spec.name or '(unnamed)'} version {policy.version}"
    if spec.extends:
        head += f", extends {spec.extends}"
    lines = [
        head,
        f"seed {spec.seed}; classes {', '.join(spec.classes)}",
        f"whoami {spec.whoami.url}"
        if spec.whoami
        else "whoami: none (opaque tokens key as themselves)",
        "",
        "rules, the first that matches decides:",
    ]
    width = len(str(len(policy.rules)))
    for n, compiled in enumerate(policy.rules, 1):
        rule = compiled.spec
        assert rule is not None
        origin = _where(rule.source, rule.line)
        if rule.patches:
            origin += ", patched at " + ", ".join(_patch_where(p) for p in rule.patches)
        lines.append(
            f"{n:>{width}}. {rule.name} -> {rule.worker_class}, key {rule.key.value}  ({origin})"
        )
        indent = " " * (width + 4)
        conditions = []
        if rule.methods is not None:
            conditions.append("methods " + " ".join(sorted(rule.methods)))
        if rule.query_present:
            conditions.append("query has " + ", ".join(rule.query_present))
        if rule.query_absent:
            conditions.append("query without " + ", ".join(rule.query_absent))
        if conditions:
            lines.append(indent + "; ".join(conditions))
        lines += [indent + pattern for pattern in rule.paths]
    lines.append(f"{'':>{width}}  default -> {spec.default_class}, key {spec.default_key.value}")
    return "\n".join(lines) + "\n"
