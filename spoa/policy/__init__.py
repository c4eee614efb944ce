"""Routing policies: YAML schema -> compiled policy -> decide(); reload."""

from .compiled import (
    DEFAULT_RULE,
    ERROR_RULE,
    CompiledPolicy,
    CompiledRule,
    Decision,
    Request,
    policy_version,
)
from .errors import LocatedError, PolicyError
from .loader import compile_policy, load_policy
from .schema import KeyKind, PolicySpec, Resolve, RuleSpec, WhoamiSpec, parse_policy

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
    "Resolve",
    "RuleSpec",
    "WhoamiSpec",
    "compile_policy",
    "load_policy",
    "parse_policy",
    "policy_version",
]
