"""A recording (spoa serve --record) checked and replayed, for the recorder's tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def assert_replays_as_recorded(text: str, policy: Path, secrets: set[str]) -> None:
    """No secret and no signature in ``text``; spoa explain --jsonl of it gives, line by
    line, the class, rule and key kind the agent recorded."""
    assert secrets
    assert not [s for s in secrets if s in text]
    assert "sig=" not in text
    replay = subprocess.run(
        [sys.executable, "-m", "spoa", "explain", str(policy), "--jsonl"],
        input=text,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    answers = [json.loads(a) for a in replay.stdout.splitlines()]
    recorded = [json.loads(line)["recorded"] for line in text.splitlines()]
    # Syt tokens keep their user: the same key kinds as recorded.
    assert [(a["class"], a["rule"], a["key_kind"]) for a in answers] == [
        (r["class"], r["rule"], r["key_kind"]) for r in recorded
    ]
