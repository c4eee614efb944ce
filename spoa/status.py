"""The agent's HTTP endpoint: /metrics, /healthz, a live status page, /status.json.

The status page is plain HTML with no external assets: rendered on the
server (so it reads without JavaScript), then refreshed every two seconds
from /status.json by a few lines of inline script.
"""

from __future__ import annotations

import asyncio
import html
import json
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from . import __version__
from .haproxyapi import MapStats
from .httpd import HttpRequest, HttpResponse
from .policy import DEFAULT_RULE
from .policy.reload import PolicyHolder
from .record import Recorder
from .server import SpopServer
from .shadow import Shadow
from .stats import DecisionStats
from .whoami import WhoamiStats

#: Rates on the status page are over this window (seconds).
WINDOW: Final = 60.0
#: How often the counters are sampled for those rates (seconds).
SAMPLE_EVERY: Final = 2.0


@dataclass(frozen=True, slots=True)
class _Sample:
    at: float
    counts: dict[tuple[str, str, str], int]


class DecisionRates:
    """Samples of the decision counters, to compute rates over the last minute."""

    def __init__(self, stats: DecisionStats) -> None:
        self.stats = stats
        self._samples: deque[_Sample] = deque()
        self.sample()

    def sample(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._samples.append(_Sample(now, dict(self.stats.counts)))
        while len(self._samples) > 2 and now - self._samples[1].at >= WINDOW:
            self._samples.popleft()

    def rates(self, now: float | None = None) -> tuple[float, dict[str, float], dict[str, float]]:
        """(window seconds, per-second rate by class, by rule) from the oldest sample."""
        now = time.monotonic() if now is None else now
        oldest = self._samples[0]
        span = max(now - oldest.at, 1e-9)
        by_class: dict[str, float] = {}
        by_rule: dict[str, float] = {}
        for (worker_class, rule, kind), value in list(self.stats.counts.items()):
            delta = value - oldest.counts.get((worker_class, rule, kind), 0)
            if delta:
                by_class[worker_class] = by_class.get(worker_class, 0.0) + delta / span
                by_rule[rule] = by_rule.get(rule, 0.0) + delta / span
        return span, by_class, by_rule

    async def run(self) -> None:
        while True:
            await asyncio.sleep(SAMPLE_EVERY)
            self.sample()


class StatusApp:
    """Answers the agent's HTTP requests."""

    def __init__(
        self,
        server: SpopServer,
        decisions: DecisionStats,
        holder: PolicyHolder | None,
        registry: CollectorRegistry,
        whoami: WhoamiStats | None = None,
        fallback_map: MapStats | None = None,
        shadow: Shadow | None = None,
        recorder: Recorder | None = None,
    ) -> None:
        self.server = server
        self.shadow = shadow
        self.recorder = recorder
        self.whoami = whoami
        self.fallback_map = fallback_map
        self.decisions = decisions
        self.holder = holder
        self.registry = registry
        self.rates = DecisionRates(decisions)
        self.started = time.time()

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if request.method not in ("GET", "HEAD"):
            return HttpResponse(405, b"method not allowed\n")
        path = request.path
        if path == "/metrics":
            return HttpResponse(200, generate_latest(self.registry), CONTENT_TYPE_LATEST)
        if path == "/healthz":
            ready, why = self.ready()
            return HttpResponse(200 if ready else 503, (why + "\n").encode())
        if path == "/status.json":
            return HttpResponse(200, json.dumps(self.snapshot()).encode(), "application/json")
        if path == "/shadow.html":  # the page's shadow section, refreshed by its script
            return HttpResponse(
                200, _shadow_html(self._shadow()).encode(), "text/html; charset=utf-8"
            )
        if path == "/":
            return HttpResponse(
                200, render_page(self.snapshot()).encode(), "text/html; charset=utf-8"
            )
        return HttpResponse(404, b"not found\n")

    def ready(self) -> tuple[bool, str]:
        if self.holder is None:
            return False, "no policy loaded"
        if not self.server.listening:
            return False, "SPOP listener not up"
        return True, f"ok: policy {self.holder.current.version}"

    def snapshot(self) -> dict[str, Any]:
        """Everything the status page shows, as plain data."""
        span, by_class, by_rule = self.rates.rates()
        total_rate = sum(by_class.values())
        default_rate = by_rule.get(DEFAULT_RULE, 0.0)
        totals_by_class: dict[str, int] = {}
        for (worker_class, _rule, _kind), value in list(self.decisions.counts.items()):
            totals_by_class[worker_class] = totals_by_class.get(worker_class, 0) + value
        stats = self.server.stats
        policy: dict[str, Any] | None = None
        if self.holder is not None:
            current = self.holder.current
            policy = {
                "file": self.holder.path,
                "version": current.version,
                "name": current.spec.name,
                "rules": len(current.rules),
                "classes": list(current.classes),
                "loaded_at": self.holder.loaded_at,
                "reloads_ok": self.holder.reloads_ok,
                "reloads_failed": self.holder.reloads_failed,
                "last_reload_ok": self.holder.last_reload_ok,
                "last_error": self.holder.last_error,
            }
        count = sum(self.decisions.buckets)
        return {
            "agent": {
                "version": __version__,
                "started_at": self.started,
                "addresses": list(self.server.addresses),
            },
            "now": time.time(),
            "policy": policy,
            "window_seconds": round(span, 1),
            "decisions_per_second": round(total_rate, 2),
            "default_share": round(default_rate / total_rate, 4) if total_rate else 0.0,
            "by_class": {k: round(v, 2) for k, v in sorted(by_class.items())},
            "by_rule": {k: round(v, 2) for k, v in sorted(by_rule.items())},
            # Shares of the unrounded rates: at low traffic, shares of rates
            # rounded to 0.01/s disagree with each other and with the total.
            "class_shares": _shares(by_class, total_rate),
            "rule_shares": _shares(by_rule, total_rate),
            "totals_by_class": dict(sorted(totals_by_class.items())),
            "decisions_total": sum(totals_by_class.values()),
            "mean_decision_us": round(self.decisions.latency_sum_ns / count / 1000, 2)
            if count
            else None,
            "connections": {
                "open": stats.connections_open,
                "accepted": stats.connections_accepted,
                "refused": stats.connections_refused,
                "healthchecks": stats.healthchecks,
            },
            "protocol_errors": {str(k): v for k, v in sorted(stats.protocol_errors.items())},
            "handler_errors": stats.handler_errors,
            "whoami": self._whoami(),
            "fallback_map": self._fallback_map(),
            "shadow": self._shadow(),
            "record": self._record(),
        }

    def _shadow(self) -> dict[str, Any] | None:
        """Where the candidate policy would send requests, or None without one."""
        shadow = self.shadow
        if shadow is None:
            return None
        stats = shadow.stats
        candidate = shadow.policy
        return {
            "file": shadow.path,
            "version": candidate.version if candidate is not None else None,
            "error": shadow.error,
            "every": shadow.every,
            "decided": stats.decided,
            "differing": stats.differing(),
            "classes": [
                {"class": a, "shadow_class": b, "requests": n}
                for (a, b), n in sorted(stats.classes.items(), key=lambda item: -item[1])
            ],
            "changed_keys": dict(sorted(stats.changed_keys.items())),
        }

    def _record(self) -> dict[str, Any] | None:
        recorder = self.recorder
        if recorder is None:
            return None
        stats = recorder.stats
        return {
            "file": recorder.path,
            "active": recorder.active,
            "written": stats.written,
            "skipped": stats.skipped,
            "rotations": stats.rotations,
            "errors": stats.errors,
        }

    def _fallback_map(self) -> dict[str, Any] | None:
        """The running HAProxy's fallback map, or None when the agent does not keep it."""
        stats = self.fallback_map
        if stats is None:
            return None
        return {"in_sync": stats.in_sync, "pushes": dict(stats.pushes), "error": stats.last_error}

    def _whoami(self) -> dict[str, Any] | None:
        """The whoami cache in numbers (never a token), or None when off."""
        stats = self.whoami
        resolver = stats.resolver if stats is not None else None
        if stats is None or resolver is None:
            return None
        users, rejected = resolver.entries()
        return {
            "url": resolver.spec.url,
            "resolve": resolver.spec.resolve.value,
            "users_cached": users,
            "rejected_cached": rejected,
            "in_flight": resolver.in_flight,
            "hits": stats.hits,
            "misses": stats.misses,
            "lookups": dict(stats.lookups),
            "skipped": dict(stats.skipped),
        }


def _shares(rates: Mapping[str, float], total: float) -> dict[str, float]:
    return {k: round(v / total, 4) if total else 0.0 for k, v in sorted(rates.items())}


def _ago(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s ago"
    if seconds < 7200:
        return f"{seconds // 60} min ago"
    return f"{seconds // 3600} h ago"


def _rows(rates: Mapping[str, float], shares: Mapping[str, float]) -> str:
    if not rates:
        return '<tr><td colspan="3" class="muted">no decisions in the window</td></tr>'
    return "".join(
        f"<tr><td>{html.escape(name)}</td><td class=num>{rate:.2f}</td>"
        f"<td class=num>{100 * shares.get(name, 0.0):.1f}%</td></tr>"
        for name, rate in sorted(rates.items(), key=lambda kv: -shares.get(kv[0], 0.0))
    )


def _whoami_text(whoami: Mapping[str, Any]) -> str:
    lookups = ", ".join(f"{k} {v}" for k, v in whoami["lookups"].items())
    skipped = ", ".join(f"{k} {v}" for k, v in whoami["skipped"].items())
    return html.escape(
        f"whoami at {whoami['url']} ({whoami['resolve']} tokens): {whoami['users_cached']} "
        f"users and {whoami['rejected_cached']} rejected tokens cached, "
        f"{whoami['in_flight']} lookups in flight; {whoami['hits']} hits, "
        f"{whoami['misses']} misses; lookups: {lookups}; not started: {skipped}."
    )


def _shadow_html(shadow: Mapping[str, Any] | None) -> str:
    if shadow is None:
        return ""
    title = "<h2>Shadow policy</h2>"
    where = f"<code>{html.escape(shadow['file'])}</code>"
    if shadow["version"] is None:
        return (
            f"{title}<div class=error><b>The candidate {where} does not load; it is ignored:"
            f"</b><pre>{html.escape(shadow['error'] or '')}</pre></div>"
        )
    sample = "every request" if shadow["every"] == 1 else f"one request in {shadow['every']}"
    text = (
        f"{title}<p>Candidate <b>{html.escape(shadow['version'])}</b> from {where}, deciding "
        f"{sample} after the answer: {shadow['decided']} decided, {shadow['differing']} would "
        "go elsewhere (another class or another key).</p>"
    )
    if shadow["error"]:
        text += (
            "<div class=error><b>The candidate's last edit was rejected; the version above "
            f"still shadows:</b><pre>{html.escape(shadow['error'])}</pre></div>"
        )
    rows = "".join(
        f"<tr><td>{html.escape(c['class'])}</td><td>{html.escape(c['shadow_class'])}</td>"
        f"<td class=num>{c['requests']}</td><td class=num>"
        f"{shadow['changed_keys'].get(c['class'], 0) if c['class'] == c['shadow_class'] else ''}"
        "</td></tr>"
        for c in shadow["classes"]
    )
    return (
        text + "<table><thead><tr><th>class</th><th>candidate's class</th>"
        "<th class=num>requests</th><th class=num>of them, another key</th></tr></thead>"
        f"<tbody id=shadow>{rows or '<tr><td colspan=4 class=muted>none yet</td></tr>'}"
        "</tbody></table>"
    )


def render_page(snap: Mapping[str, Any]) -> str:
    """The status page for one snapshot (the script re-renders it from JSON)."""
    policy = snap["policy"]
    total = snap["decisions_per_second"]
    if policy:
        loaded = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(policy["loaded_at"]))
        policy_html = (
            f"<p>Policy <b id=version>{html.escape(policy['version'])}</b> "
            f"({html.escape(policy['name'] or '')}, {policy['rules']} rules) from "
            f"<code>{html.escape(policy['file'])}</code>, loaded {loaded} "
            f"({_ago(snap['now'] - policy['loaded_at'])}); reloads: {policy['reloads_ok']} ok, "
            f"{policy['reloads_failed']} rejected.</p>"
        )
        if policy["last_error"]:
            policy_html += (
                "<div class=error><b>The last edit was rejected; the policy above still "
                f"decides:</b><pre>{html.escape(policy['last_error'])}</pre></div>"
            )
    else:
        policy_html = "<p>No policy: a constant answer (--static-class).</p>"
    conns = snap["connections"]
    whoami = snap.get("whoami")
    whoami_html = (
        f"<h2>Users of opaque tokens</h2><p id=whoami>{_whoami_text(whoami)}</p>" if whoami else ""
    )
    errors = ", ".join(f"status {k}: {v}" for k, v in snap["protocol_errors"].items()) or "none"
    mean = snap["mean_decision_us"]
    fallback = snap.get("fallback_map")
    fallback_html = ""
    if fallback:
        state = {True: "in step with the policy", False: "NOT in step with the policy"}.get(
            fallback["in_sync"], "not seen yet"
        )
        fallback_html = html.escape(
            f" The fallback map in HAProxy (its routing without the agent): {state}; pushes: "
            f"{fallback['pushes']['success']} ok, {fallback['pushes']['failure']} failed"
            + (f"; {fallback['error']}" if fallback["error"] else "")
            + "."
        )
    return f"""<!doctype html>
<html lang=en><head><meta charset=utf-8>
<title>matrix-spoa: {html.escape(policy["version"] if policy else "static")}</title>
<noscript><meta http-equiv=refresh content=5></noscript>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; max-width: 60em; }}
h1 {{ font-size: 1.4em; }} h2 {{ font-size: 1.1em; margin-top: 1.5em; }}
table {{ border-collapse: collapse; min-width: 28em; }}
td, th {{ border-bottom: 1px solid #ddd; padding: .25em .8em; text-align: left; }}
.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
.muted {{ color: #888; }} .error {{ background: #fee; border: 1px solid #c00; padding: .5em; }}
.error pre {{ white-space: pre-wrap; overflow-wrap: anywhere; margin: .5em 0 0; }}
.big {{ font-size: 1.6em; font-weight: bold; }}
</style></head>
<body>
<h1>matrix-spoa <span class=muted>{html.escape(snap["agent"]["version"])}</span></h1>
<div id=policy>{policy_html}</div>
<p><span class=big id=rate>{total:.2f}</span> decisions/s over the last
<span id=window>{snap["window_seconds"]:.0f}</span> s;
<span id=default>{100 * snap["default_share"]:.1f}%</span> fell to the default;
<span id=total>{snap["decisions_total"]}</span> since start{
        f"; {mean:.1f} us per decision on average" if mean is not None else ""
    }.</p>
<h2>By class</h2>
<table><thead><tr><th>class</th><th class=num>per second</th><th class=num>share</th></tr></thead>
<tbody id=classes>{_rows(snap["by_class"], snap["class_shares"])}</tbody></table>
<h2>By rule</h2>
<table><thead><tr><th>rule</th><th class=num>per second</th><th class=num>share</th></tr></thead>
<tbody id=rules>{_rows(snap["by_rule"], snap["rule_shares"])}</tbody></table>
<h2>HAProxy</h2>
<p id=connections>{conns["open"]} connections open, {conns["accepted"]} accepted since start,
{conns["healthchecks"]} health checks, {conns["refused"]} refused; protocol errors: {errors};
handler errors: {snap["handler_errors"]}.<span id=fallback>{fallback_html}</span></p>
{whoami_html}
<div id=shadow-section>{_shadow_html(snap.get("shadow"))}</div>
<p class=muted><a href="/metrics">/metrics</a> · <a href="/healthz">/healthz</a> ·
<a href="/status.json">/status.json</a> · updated <span id=updated>now</span></p>
<script>
"use strict";
function rows(rates, shares) {{
  const names = Object.keys(rates).sort((a, b) => shares[b] - shares[a]);
  if (!names.length) {{
    return '<tr><td colspan="3" class="muted">no decisions in the window</td></tr>';
  }}
  const entities = {{"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}};
  const esc = s => s.replace(/[&<>"]/g, c => entities[c]);
  return names.map(n => `<tr><td>${{esc(n)}}</td><td class=num>${{rates[n].toFixed(2)}}</td>` +
    `<td class=num>${{(100 * shares[n]).toFixed(1)}}%</td></tr>`).join("");
}}
const shown = {json.dumps([policy["version"], policy["last_error"]] if policy else None)};
async function refresh() {{
  try {{
    const snap = await (await fetch("/status.json", {{cache: "no-store"}})).json();
    if (snap.policy && shown &&
        (snap.policy.version !== shown[0] || snap.policy.last_error !== shown[1])) {{
      location.reload();  // a reload or a rejected edit: show the new policy section
      return;
    }}
    const total = snap.decisions_per_second;
    document.getElementById("rate").textContent = total.toFixed(2);
    document.getElementById("window").textContent = snap.window_seconds.toFixed(0);
    document.getElementById("default").textContent = (100 * snap.default_share).toFixed(1) + "%";
    document.getElementById("total").textContent = snap.decisions_total;
    document.getElementById("classes").innerHTML = rows(snap.by_class, snap.class_shares);
    document.getElementById("rules").innerHTML = rows(snap.by_rule, snap.rule_shares);
    if (snap.policy) document.getElementById("version").textContent = snap.policy.version;
    if (snap.shadow) {{
      const section = await fetch("/shadow.html", {{cache: "no-store"}});
      document.getElementById("shadow-section").innerHTML = await section.text();
    }}
    document.getElementById("updated").textContent = new Date().toLocaleTimeString();
  }} catch (e) {{
    document.getElementById("updated").textContent = "failed: " + e;
  }}
}}
setInterval(refresh, 2000);
</script>
</body></html>
"""
