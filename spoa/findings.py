"""What a check found: a level and a sentence, printed as ``level: sentence``.

``spoa check --haproxy`` and ``--synapse`` both answer with findings, so the
command prints them one way: errors to standard error, the rest to standard
output, and an error fails the check.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Level(StrEnum):
    OK = "ok"
    NOTE = "note"
    ERROR = "error"


@dataclass(frozen=True)
class Finding:
    level: Level
    text: str

    def __str__(self) -> str:
        return f"{self.level}: {self.text}"
