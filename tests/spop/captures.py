"""Frames captured from a real HAProxy 2.6.12 (tests/fixtures/haproxy-2.6.12-frames.txt)."""

from __future__ import annotations

from pathlib import Path

_FILE = Path(__file__).resolve().parent.parent / "fixtures" / "haproxy-2.6.12-frames.txt"


def _load() -> dict[str, bytes]:
    frames: dict[str, bytes] = {}
    for line in _FILE.read_text().splitlines():
        if line and not line.startswith("#"):
            name, hex_bytes = line.split()
            frames[name] = bytes.fromhex(hex_bytes)
    return frames


CAPTURED = _load()
