"""The shadow policy: counted beside the running one, after the answer, never in its way."""

from __future__ import annotations

import asyncio
from pathlib import Path

from spoa import traffic
from spoa.metrics import AgentCollector
from spoa.policy import Request, load_policy
from spoa.policy.reload import PolicyHolder
from spoa.routing import RouteHandler
from spoa.shadow import Shadow
from spoa.spop import Notify
from spoa.stats import ServerStats

ROOT = Path(__file__).resolve().parent.parent
POLICY = ROOT / "policies" / "synapse-workers.yaml"
MOVED = (
    "version: 1\nname: c\nextends: synapse-workers\n"
    "rules:\n  patch:\n    - {name: profile, class: main}\n"
)


def feed(handler: RouteHandler, sent: list[traffic.TrafficRequest]) -> list[bytes]:
    """The requests through the handler in an event loop, its batches run after."""

    async def run() -> list[bytes]:
        answers = []
        for i, request in enumerate(sent):
            answer = handler(Notify(1, i, [request.route_message()]))
            assert isinstance(answer, bytes)
            answers.append(answer)
            if i % 100 == 0:
                await asyncio.sleep(0)
        await asyncio.sleep(0)
        return answers

    return asyncio.run(run())


def plain(t: traffic.TrafficRequest) -> Request:
    return Request(t.method, t.path, t.query, t.auth, t.src)


def profile_requests(sent: list[traffic.TrafficRequest]) -> int:
    base = load_policy(str(POLICY))
    return sum(1 for t in sent if base.decide(plain(t)).rule == "profile")


def test_the_shadow_counts_exactly_the_requests_the_candidate_moves(tmp_path: Path) -> None:
    candidate = tmp_path / "candidate.yaml"
    candidate.write_text(MOVED)
    shadow = Shadow(str(candidate))
    handler = RouteHandler(PolicyHolder(str(POLICY)), shadow=shadow)
    plain_handler = RouteHandler(PolicyHolder(str(POLICY)))
    sent = list(traffic.generate(4000))
    # The answers are the running policy's, shadow or not.
    assert feed(handler, sent) == feed(plain_handler, sent)
    profile = profile_requests(sent)
    stats = shadow.stats
    assert stats.decided == 4000
    assert stats.classes[("event_creator", "main")] == profile > 10
    assert stats.differing() == profile
    assert sum(n for (a, b), n in stats.classes.items() if a == b) == 4000 - profile
    collector = AgentCollector(ServerStats(), handler.stats, None, route=handler)
    families = {m.name: m for m in collector.collect()}
    samples = {
        (s.labels["class"], s.labels["shadow_class"]): s.value
        for s in families["spoa_shadow_decisions"].samples
        if s.name.endswith("_total")
    }
    assert samples[("event_creator", "main")] == profile
    (ok,) = families["spoa_shadow_policy_ok"].samples
    assert ok.value == 1 and ok.labels["version"] == shadow.policy.version  # type: ignore[union-attr]


def test_a_sample_of_one_in_n(tmp_path: Path) -> None:
    candidate = tmp_path / "candidate.yaml"
    candidate.write_text(MOVED)
    shadow = Shadow(str(candidate), every=4)
    feed(RouteHandler(PolicyHolder(str(POLICY)), shadow=shadow), list(traffic.generate(1000)))
    assert (shadow.stats.decided, shadow.stats.skipped) == (250, 750)


def test_a_broken_candidate_is_reported_ignored_and_picked_up_once_fixed(
    tmp_path: Path,
) -> None:
    candidate = tmp_path / "candidate.yaml"
    candidate.write_text("version: 1\nname: c\nextends: synapse-workers\nrules: [oops\n")
    shadow = Shadow(str(candidate), settle=0)
    assert shadow.policy is None and shadow.error and "candidate.yaml" in shadow.error
    handler = RouteHandler(PolicyHolder(str(POLICY)), shadow=shadow)
    sent = list(traffic.generate(300))
    assert feed(handler, sent) == feed(RouteHandler(PolicyHolder(str(POLICY))), sent)
    assert shadow.stats.decided == 0
    collector = AgentCollector(ServerStats(), handler.stats, None, route=handler)
    (ok,) = {m.name: m for m in collector.collect()}["spoa_shadow_policy_ok"].samples
    assert ok.value == 0
    candidate.write_text(MOVED)
    shadow.reload()
    assert shadow.error is None and shadow.policy is not None
    feed(handler, sent)
    assert shadow.stats.decided == 300
    # A broken edit later keeps the last good candidate, and says so.
    version = shadow.policy.version
    candidate.write_text("version: 1\nname: c\nrules: 3\n")
    shadow.reload()
    assert shadow.error and shadow.policy.version == version


def test_a_new_candidate_starts_its_counts_afresh(tmp_path: Path) -> None:
    candidate = tmp_path / "candidate.yaml"
    candidate.write_text(MOVED)
    shadow = Shadow(str(candidate), settle=0)
    handler = RouteHandler(PolicyHolder(str(POLICY)), shadow=shadow)
    feed(handler, list(traffic.generate(200)))
    assert shadow.stats.decided == 200
    candidate.write_text(MOVED + "seed: 9\n")
    shadow.reload()
    assert shadow.stats.decided == 0
    feed(handler, list(traffic.generate(200)))
    # Another seed: every keyed request of an unmoved class changes its key.
    assert sum(shadow.stats.changed_keys.values()) > 100
