"""What a policy edit moves: two compiled policies over one set of requests.

:func:`diff` decides every request with both policies (their effective rules,
``extends`` resolved) and counts the requests whose class, rule or key
changes, the class moves (old class -> new class), the rules that gain or
lose requests, and keeps a few example requests of each move. Examples carry
the method and target only, with any ``access_token`` of the query replaced:
no Authorization header, no token reaches a report.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .compiled import CompiledPolicy, Request

#: Example requests kept per move.
EXAMPLES = 3

_ACCESS_TOKEN = re.compile(r"(^|&)(access_token=)[^&]*")


def shown(request: Request) -> str:
    """``METHOD target`` of a request, with any access token of its query hidden."""
    if request.query is None:
        return f"{request.method} {request.path}"
    query = _ACCESS_TOKEN.sub(r"\1\2<token>", request.query)
    return f"{request.method} {request.path}?{query}"


@dataclass
class Move:
    """Requests that went one way under the old policy and another under the new."""

    old_class: str
    new_class: str
    old_rule: str
    new_rule: str
    requests: int = 0
    examples: list[str] = field(default_factory=list)


@dataclass
class PolicyDiff:
    old_version: str
    new_version: str
    requests: int = 0
    class_changed: int = 0
    #: Same class, another rule.
    rule_changed: int = 0
    #: Same class and rule, another key (a key kind or the seed changed).
    key_changed: int = 0
    #: (old class, new class, old rule, new rule) -> the move, for every request that changed.
    moves: dict[tuple[str, str, str, str], Move] = field(default_factory=dict)
    old_rules: Counter[str] = field(default_factory=Counter)
    new_rules: Counter[str] = field(default_factory=Counter)

    @property
    def changed(self) -> int:
        return self.class_changed + self.rule_changed + self.key_changed

    def class_moves(self) -> list[tuple[str, str, int]]:
        """(old class, new class, requests) of the requests that changed class, most first."""
        totals: Counter[tuple[str, str]] = Counter()
        for move in self.moves.values():
            if move.old_class != move.new_class:
                totals[move.old_class, move.new_class] += move.requests
        return [(old, new, n) for (old, new), n in totals.most_common()]

    def rule_changes(self) -> list[tuple[str, int, int]]:
        """(rule, requests before, after) of every rule whose share changed, biggest first."""
        rules = set(self.old_rules) | set(self.new_rules)
        rows = [(r, self.old_rules[r], self.new_rules[r]) for r in rules]
        rows = [row for row in rows if row[1] != row[2]]
        return sorted(rows, key=lambda row: (-abs(row[2] - row[1]), row[0]))

    def share(self, count: int) -> float:
        return count / self.requests if self.requests else 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "old_policy": self.old_version,
            "new_policy": self.new_version,
            "requests": self.requests,
            "changed": self.changed,
            "class_changed": self.class_changed,
            "rule_changed": self.rule_changed,
            "key_changed": self.key_changed,
            "classes": [
                {"old": old, "new": new, "requests": n, "share": round(self.share(n), 6)}
                for old, new, n in self.class_moves()
            ],
            "rules": [
                {"rule": rule, "old": old, "new": new, "change": new - old}
                for rule, old, new in self.rule_changes()
            ],
            "moves": [
                {
                    "old_class": m.old_class,
                    "new_class": m.new_class,
                    "old_rule": m.old_rule,
                    "new_rule": m.new_rule,
                    "requests": m.requests,
                    "examples": m.examples,
                }
                for m in sorted(self.moves.values(), key=lambda m: -m.requests)
            ],
        }


def diff(old: CompiledPolicy, new: CompiledPolicy, requests: Iterable[Request]) -> PolicyDiff:
    """Every request decided by both policies (no whoami lookups: keys by token)."""
    report = PolicyDiff(old.version, new.version)
    for request in requests:
        report.requests += 1
        before, after = old.decide(request), new.decide(request)
        report.old_rules[before.rule] += 1
        report.new_rules[after.rule] += 1
        if before.worker_class != after.worker_class:
            report.class_changed += 1
        elif before.rule != after.rule:
            report.rule_changed += 1
        elif before.key != after.key:
            report.key_changed += 1
        else:
            continue
        where = (before.worker_class, after.worker_class, before.rule, after.rule)
        move = report.moves.get(where)
        if move is None:
            move = report.moves[where] = Move(*where)
        move.requests += 1
        if len(move.examples) < EXAMPLES:
            move.examples.append(shown(request))
    return report


def _table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        numbers = zip(row[1:], widths[1:], strict=True)
        cells = [row[0].ljust(widths[0]), *(c.rjust(w) for c, w in numbers)]
        lines.append("  " + "  ".join(cells).rstrip())
    return lines


def format_text(report: PolicyDiff, old_name: str, new_name: str, source: str) -> str:
    lines = [
        f"{old_name} ({report.old_version}) -> {new_name} ({report.new_version}): "
        f"{report.requests} requests ({source})"
    ]
    if not report.changed:
        lines.append("nothing changes: every request keeps its class, rule and key")
        return "\n".join(lines) + "\n"
    lines.append(
        f"changed: {report.changed} ({100 * report.share(report.changed):.2f}%): "
        f"class {report.class_changed}, rule only {report.rule_changed}, "
        f"key only {report.key_changed}"
    )
    moves = report.class_moves()
    if moves:
        lines.append("classes:")
        moved = [
            (f"{old} -> {new}", str(n), f"{100 * report.share(n):.2f}%") for old, new, n in moves
        ]
        lines += _table(("old class -> new class", "requests", "share"), moved)
    changes = report.rule_changes()
    if changes:
        lines.append("rules:")
        gained = [(rule, str(old), str(new), f"{new - old:+d}") for rule, old, new in changes]
        lines += _table(("rule", "old", "new", "change"), gained)
    else:
        lines.append("rules: every rule keeps as many requests")
    lines.append("examples:")
    for move in sorted(report.moves.values(), key=lambda m: -m.requests):
        if move.old_class != move.new_class:
            title = f"{move.old_class} -> {move.new_class} ({move.old_rule} -> {move.new_rule})"
        elif move.old_rule != move.new_rule:
            title = f"{move.old_class}, rule {move.old_rule} -> {move.new_rule}"
        else:
            title = f"{move.old_class}, rule {move.old_rule}, another key"
        lines.append(f"  {title}: {move.requests} requests, for example")
        lines += [f"    {example}" for example in move.examples]
    return "\n".join(lines) + "\n"
