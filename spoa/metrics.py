"""Prometheus metrics of every decision, of SPOP and of policy reloads.

The hot path only bumps plain Python counters (a dict entry per decision, a
histogram bucket); :class:`AgentCollector` turns them into Prometheus metric
families when scraped. Labels come from closed sets only: classes and rules
of the policies loaded, key kinds, frame types, SPOE status names, reload
results. Never a path, token, user, room or key.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Iterable, Iterator
from typing import Final

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from . import __version__
from .haproxyapi import MapStats
from .policy import DEFAULT_RULE
from .policy.reload import PolicyHolder
from .routing import RouteHandler
from .spop import Status
from .stats import LATENCY_BOUNDS_NS, LATENCY_SAMPLE, DecisionStats, ServerStats
from .whoami import RESULTS, SKIPS, WhoamiStats

_STATUS_NAMES: Final = {int(s): s.name.lower() for s in Status}


class AgentCollector(Collector):
    """Everything the agent exports, read from its counters at scrape time."""

    def __init__(
        self,
        server: ServerStats,
        decisions: DecisionStats,
        holder: PolicyHolder | None,
        whoami: WhoamiStats | None = None,
        fallback_map: MapStats | None = None,
        route: RouteHandler | None = None,
    ) -> None:
        self.server = server
        #: The recorder and the shadow policy, when the handler has them.
        self.route = route
        self.decisions = decisions
        self.holder = holder
        self.whoami = whoami
        #: The running HAProxy's fallback map, when the agent keeps it (--haproxy-socket).
        self.fallback_map = fallback_map
        self.started = time.time()

    def collect(self) -> Iterator[Metric]:
        yield from self._decisions()
        yield from self._spop()
        yield from self._policy()
        yield from self._whoami()
        yield from self._fallback_map()
        yield from self._observed()
        build = InfoMetricFamily("spoa_build", "The agent's version and runtime.")
        build.add_metric([], {"version": __version__, "python": platform.python_version()})
        yield build
        yield GaugeMetricFamily(
            "spoa_start_time_seconds", "When the agent started (Unix).", value=self.started
        )

    def _observed(self) -> Iterator[Metric]:
        route = self.route
        if route is None:
            return
        if route.recorder is not None or route.shadow is not None:
            yield CounterMetricFamily(
                "spoa_observe_dropped",
                "Requests sampled for recording or the shadow policy but dropped: the "
                "agent's loop fell behind.",
                value=route.observe_dropped,
            )
        recorder = route.recorder
        if recorder is not None:
            stats = recorder.stats
            yield CounterMetricFamily(
                "spoa_recorded_requests",
                "Requests written to the --record file (scrubbed of secrets).",
                value=stats.written,
            )
            yield CounterMetricFamily(
                "spoa_record_skipped_requests",
                "Requests the --record-rate limit left out of the recording.",
                value=stats.skipped,
            )
            yield GaugeMetricFamily(
                "spoa_record_active",
                "1 while the agent records, 0 once a write error stopped it.",
                value=int(recorder.active),
            )
        shadow = route.shadow
        if shadow is None:
            return
        decided = CounterMetricFamily(
            "spoa_shadow_decisions",
            "Requests decided by the shadow (candidate) policy too, by the class the running "
            "policy chose and the class the candidate would.",
            labels=["class", "shadow_class"],
        )
        for (worker_class, shadow_class), value in sorted(shadow.stats.classes.items()):
            decided.add_metric([worker_class, shadow_class], value)
        yield decided
        changed = CounterMetricFamily(
            "spoa_shadow_changed_keys",
            "Requests the candidate would send to the same class with another key.",
            labels=["class"],
        )
        for worker_class, value in sorted(shadow.stats.changed_keys.items()):
            changed.add_metric([worker_class], value)
        yield changed
        candidate = shadow.policy
        info = GaugeMetricFamily(
            "spoa_shadow_policy_ok",
            "1 when the shadow policy file loads, 0 when it does not (ignored until fixed).",
            labels=["version"],
        )
        info.add_metric([candidate.version if candidate else ""], int(shadow.error is None))
        yield info

    def _decisions(self) -> Iterator[Metric]:
        counts = dict(self.decisions.counts)
        decided = CounterMetricFamily(
            "spoa_decisions",
            "Routing decisions, by worker class, rule and key kind used.",
            labels=["class", "rule", "key_kind"],
        )
        default = 0
        for (worker_class, rule, key_kind), value in sorted(counts.items()):
            decided.add_metric([worker_class, rule, key_kind], value)
            if rule == DEFAULT_RULE:
                default += value
        yield decided
        yield CounterMetricFamily(
            "spoa_default_decisions",
            "Decisions no rule took: the policy's default decided.",
            value=default,
        )
        buckets = list(self.decisions.buckets)
        cumulative = []
        running = 0
        for bound, count in zip((*LATENCY_BOUNDS_NS, None), buckets, strict=True):
            running += count
            cumulative.append(("+Inf" if bound is None else repr(bound / 1e9), running))
        latency = HistogramMetricFamily(
            "spoa_decision_duration_seconds",
            "Time to decide one request and build its answer, in seconds "
            f"(one decision in {LATENCY_SAMPLE} is timed).",
        )
        latency.add_metric([], cumulative, self.decisions.latency_sum_ns / 1e9)
        yield latency
        yield CounterMetricFamily(
            "spoa_unrouted_messages",
            "NOTIFY frames without a route message (check the SPOE configuration).",
            value=self.decisions.unrouted,
        )

    def _spop(self) -> Iterator[Metric]:
        s = self.server
        yield GaugeMetricFamily(
            "spoa_connections_open",
            "SPOP connections from HAProxy open now.",
            value=s.connections_open,
        )
        yield CounterMetricFamily(
            "spoa_connections_accepted", "SPOP connections accepted.", value=s.connections_accepted
        )
        yield CounterMetricFamily(
            "spoa_connections_refused",
            "HELLOs refused: over the connection limit.",
            value=s.connections_refused,
        )
        yield _by_label(
            CounterMetricFamily,
            "spoa_frames_received",
            "SPOP frames received, by frame type.",
            "type",
            (
                ("haproxy_hello", s.hello_frames),
                ("notify", s.notify_frames),
                ("haproxy_disconnect", s.disconnect_frames_received),
            ),
        )
        yield _by_label(
            CounterMetricFamily,
            "spoa_frames_sent",
            "SPOP frames sent, by frame type.",
            "type",
            (
                ("agent_hello", s.agent_hello_frames),
                ("ack", s.ack_frames),
                ("agent_disconnect", s.disconnect_frames_sent),
            ),
        )
        yield CounterMetricFamily(
            "spoa_healthchecks",
            "Health-check HELLOs answered (HAProxy's spop-check).",
            value=s.healthchecks,
        )
        # Every status, zeros included, so the series exist before the first error.
        counts = dict(s.protocol_errors)
        yield _by_label(
            CounterMetricFamily,
            "spoa_protocol_errors",
            "Connections closed for a protocol error, by SPOE status.",
            "status",
            (
                (_STATUS_NAMES.get(status, str(status)), counts.get(status, 0))
                for status in sorted(set(_STATUS_NAMES) | set(counts))
            ),
        )
        yield CounterMetricFamily(
            "spoa_stale_notifies",
            "NOTIFYs of a backlog left unanswered: HAProxy had already given up on them.",
            value=s.stale_notifies,
        )
        yield CounterMetricFamily(
            "spoa_handler_errors",
            "Requests whose handler failed; they were answered with a no-op (fail open).",
            value=s.handler_errors,
        )

    def _policy(self) -> Iterator[Metric]:
        holder = self.holder
        if holder is None:
            return
        yield _by_label(
            CounterMetricFamily,
            "spoa_policy_reloads",
            "Policy reload attempts, by result.",
            "result",
            (("success", holder.reloads_ok), ("failure", holder.reloads_failed)),
        )
        policy = holder.current
        info = InfoMetricFamily("spoa_policy", "The running policy.")
        info.add_metric([], {"version": policy.version, "name": policy.spec.name or ""})
        yield info
        yield GaugeMetricFamily(
            "spoa_policy_last_reload_success_timestamp_seconds",
            "When the running policy was loaded (Unix time).",
            value=holder.loaded_at,
        )
        yield GaugeMetricFamily(
            "spoa_policy_last_reload_successful",
            "1 if the last reload attempt succeeded (or none failed since start), else 0.",
            value=1.0 if holder.last_reload_ok else 0.0,
        )
        yield GaugeMetricFamily(
            "spoa_policy_rules", "Rules in the running policy.", value=len(policy.rules)
        )

    def _whoami(self) -> Iterator[Metric]:
        stats = self.whoami
        if stats is None:
            return
        yield _by_label(
            CounterMetricFamily,
            "spoa_whoami_lookups",
            "Lookups of the user of an opaque access token, by result.",
            "result",
            ((result, stats.lookups[result]) for result in RESULTS),
        )
        yield _by_label(
            CounterMetricFamily,
            "spoa_whoami_lookups_skipped",
            "Lookups not started for a new token (it kept its token key), by reason.",
            "reason",
            ((reason, stats.skipped[reason]) for reason in SKIPS),
        )
        yield _by_label(
            CounterMetricFamily,
            "spoa_whoami_cache_requests",
            "Decisions that asked the whoami cache for a token's user, by result.",
            "result",
            (("hit", stats.hits), ("rejected", stats.negative_hits), ("miss", stats.misses)),
        )
        resolver = stats.resolver
        users, rejected = resolver.entries() if resolver is not None else (0, 0)
        yield _by_label(
            GaugeMetricFamily,
            "spoa_whoami_cache_entries",
            "Tokens in the whoami cache: with a known user, or rejected/failed.",
            "kind",
            (("user", users), ("rejected", rejected)),
        )
        yield GaugeMetricFamily(
            "spoa_whoami_lookups_in_flight",
            "Whoami lookups waiting for the homeserver now.",
            value=resolver.in_flight if resolver is not None else 0,
        )

    def _fallback_map(self) -> Iterator[Metric]:
        stats = self.fallback_map
        if stats is None:
            return
        yield _by_label(
            CounterMetricFamily,
            "spoa_fallback_map_pushes",
            "Policies pushed into HAProxy's fallback map through its runtime API, by result.",
            "result",
            ((result, stats.pushes[result]) for result in ("success", "failure")),
        )
        yield GaugeMetricFamily(
            "spoa_fallback_map_in_sync",
            "1 if the map the running HAProxy routes by without the agent is the running "
            "policy's, 0 if it is not or HAProxy cannot be asked.",
            value=1.0 if stats.in_sync else 0.0,
        )


def _by_label(
    family: type[CounterMetricFamily | GaugeMetricFamily],
    name: str,
    documentation: str,
    label: str,
    values: Iterable[tuple[str, float]],
) -> Metric:
    """A metric family of one label, one sample per (label value, value)."""
    metric = family(name, documentation, labels=[label])
    for label_value, value in values:
        metric.add_metric([label_value], value)
    return metric


def build_registry(collector: AgentCollector) -> CollectorRegistry:
    """An isolated registry: the agent's collector and the process metrics."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(collector)
    ProcessCollector(registry=registry)
    return registry
