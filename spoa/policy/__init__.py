"""Routing policies: YAML schema -> compiled policy -> decide(); reload."""

from .compiled import (
    DEFAULT_RULE,
    ERROR_RULE,
    CompiledPolicy,
    CompiledRule,
    Decision,
    Request,
    compile_policy,
    load_policy,
    policy_version,
)
from .errors import LocatedError, PolicyError
from .schema import KeyKind, PolicySpec, RuleSpec, parse_policy

__all__ = [
    "DEFAULT_RULE",
    "ERROR_RULE",
    "CompiledPolicy",
    "CompiledRule",
    "Decision",
    "KeyKind",
    "LocatedError",
    "PolicyError",
    "PolicySpec",
    "Request",
    "RuleSpec",
    "compile_policy",
    "load_policy",
    "parse_policy",
    "policy_version",
]
