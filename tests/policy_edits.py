"""An edit of the bundled synapse-workers policy, for the tests that a fallback follows edits."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: What the edit changes: a sync path moved to client_reader, a federation read added.
MOVED = ("/_matrix/client/v3/events", "client_reader", "events_moved")
ADDED = ("/_matrix/federation/v1/openid/userinfo", "federation_reader", "federation_reader")


def edited_synapse_policy(directory: Path) -> Path:
    """synapse-workers with one sync path moved to client_reader and one federation read added."""
    text = (ROOT / "policies" / "synapse-workers.yaml").read_text()
    moved = "      - '^/_matrix/client/(api/v1|r0|v3)/events$'\n"
    assert moved in text
    text = text.replace(moved, "")
    text = text.replace(
        "  - name: room_messages\n",
        "  - name: events_moved\n    class: client_reader\n    key: user\n    path:\n"
        "      - '^/_matrix/client/(api/v1|r0|v3)/events$'\n\n  - name: room_messages\n",
    )
    added = "      - '^/_matrix/federation/v1/query_auth/'\n"
    assert added in text
    text = text.replace(added, added + "      - '^/_matrix/federation/v1/openid/userinfo$'\n")
    policy = directory / "edited.yaml"
    policy.write_text(text)
    return policy
