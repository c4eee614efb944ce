"""Errors in a policy file, each with its place: file, line and YAML path."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class LocatedError:
    """One problem in a policy file.

    ``line`` is 1-based; ``yaml_path`` reads like ``rules[3].path[1]``
    (``$`` for the document itself).
    """

    file: str
    line: int
    yaml_path: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.yaml_path}: {self.message}"


class PolicyError(Exception):
    """A policy file that cannot be used, with every problem found in it."""

    def __init__(self, errors: Sequence[LocatedError]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(str(e) for e in self.errors))
