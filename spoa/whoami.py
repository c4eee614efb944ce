"""Per-user keys for opaque access tokens: the homeserver says who a token is.

Theory of operation
-------------------
A ``user`` rule keys a request by the user its access token names. Synapse's
own ``syt_`` tokens carry the user; tokens of the Matrix Authentication
Service (``mat_``), appservices or older formats do not. For those, a policy
may name the homeserver's whoami URL (``GET
/_matrix/client/v3/account/whoami``, which Synapse answers for MAS tokens
too), and :class:`WhoamiResolver` is the policy's
:class:`~spoa.policy.compiled.Users`:

* ``user_for(token)`` answers at once from a cache: the user, or nothing.
  Deciding never waits for the network. A hit costs a dictionary look-up:
  expired users are swept out once a second (:meth:`WhoamiResolver.run`),
  oldest first, which is also the order they expire in.
* Nothing known: a lookup starts in the background (at most one per token),
  and the request keeps its token key. Later requests of the token get its
  user's key once the answer is in.
* Every cost is bounded: cache entries (oldest forgotten first), their TTLs
  (a rejected token, 401/403, is remembered as such for ``negative_ttl``, a
  failed lookup for ``error_ttl``), lookups in flight (``max_concurrent``:
  a new token finding none free keeps its token key) and lookups started per
  second (a token bucket of ``max_per_second``). A flood of random tokens
  then costs the homeserver at most ``max_per_second`` lookups a second.
* When the homeserver is down or slow, lookups fail within ``timeout`` and
  routing goes on with token keys: nothing is refused, nothing waits longer
  than the policy's ``wait`` (0 by default).

A token never leaves this module: not in a log line, a metric or an error.
Logs say which kind of failure happened, never for which token.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final, TypeVar

from . import __version__
from .policy import WhoamiSpec
from .server import RateLimitedLog

log = logging.getLogger("spoa.whoami")

#: The results of a lookup, the label values of spoa_whoami_lookups_total.
RESULTS: Final = ("user", "unknown_token", "bad_response", "error", "timeout")
#: Why a lookup was not started, the label values of spoa_whoami_lookups_skipped_total.
SKIPS: Final = ("rate_limited", "busy")
#: The most of a whoami answer that is read.
MAX_BODY: Final = 65536
_USER_ID: Final = re.compile(r"^@([^:]+):.+$", re.DOTALL)

_T = TypeVar("_T")

#: Performs one lookup: the token in, (HTTP status, body) out.
Fetch = Callable[[str], Awaitable[tuple[int, bytes]]]


@dataclass(slots=True)
class WhoamiStats:
    """Counters of every resolver a policy handler had, for the metrics."""

    lookups: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RESULTS, 0))
    skipped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SKIPS, 0))
    #: Hits of the resolvers replaced so far (the running one counts its own).
    hits_before: int = 0
    negative_hits: int = 0
    misses: int = 0
    #: The resolver of the running policy, if it has a whoami setting.
    resolver: WhoamiResolver | None = None

    @property
    def hits(self) -> int:
        """Decisions that found their token's user in a whoami cache."""
        return self.hits_before + (self.resolver.hits if self.resolver is not None else 0)

    def use(self, resolver: WhoamiResolver | None) -> None:
        """Make ``resolver`` the running one; the previous one's hits stay counted."""
        if self.resolver is not None:
            self.hits_before += self.resolver.hits
        self.resolver = resolver


def localpart_of(body: bytes) -> str | None:
    """The localpart of the ``user_id`` of a whoami answer, or None."""
    try:
        answer = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(answer, dict):
        return None
    user_id = answer.get("user_id")
    if not isinstance(user_id, str):
        return None
    found = _USER_ID.match(user_id)
    return found.group(1) if found else None


def _remember(memo: dict[str, _T], key: str, value: _T, limit: int) -> None:
    """Insert into a bounded cache, forgetting the oldest entry when full."""
    memo.pop(key, None)
    if len(memo) >= limit:
        del memo[next(iter(memo))]
    memo[key] = value


class WhoamiResolver:
    """The whoami cache and lookups of one policy's ``whoami`` setting."""

    __slots__ = (
        "_budget",
        "_budget_at",
        "_burst",
        "_clock",
        "_fetch",
        "_in_flight",
        "_log",
        "_rejected",
        "_session",
        "_users",
        "hits",
        "spec",
        "stats",
    )

    def __init__(
        self,
        spec: WhoamiSpec,
        stats: WhoamiStats | None = None,
        *,
        fetch: Fetch | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.spec = spec
        self.stats = stats if stats is not None else WhoamiStats()
        self._fetch = fetch or self._http_fetch
        self._clock = clock
        #: token -> (localpart, expiry), in the order they expire (all share one TTL).
        self._users: dict[str, tuple[str, float]] = {}
        self.hits = 0
        #: token -> expiry: rejected or failed tokens, which keep their token key.
        self._rejected: dict[str, float] = {}
        self._in_flight: dict[str, asyncio.Task[tuple[str, str | None]]] = {}
        self._burst = max(1.0, spec.max_per_second)
        self._budget = self._burst
        self._budget_at = clock()
        self._session: object | None = None
        self._log = RateLimitedLog(log)

    # -- the hot path ----------------------------------------------------------------------

    def user_for(self, token: str) -> str | None:
        """The user of ``token`` if known; else start finding out, and None."""
        # The hit path first and alone: it is most decisions of a warm cache.
        entry = self._users.get(token)
        if entry is not None:
            self.hits += 1
            return entry[0]
        self._not_known(token)
        return None

    def _not_known(self, token: str) -> None:
        now = self._clock()
        expiry = self._rejected.get(token)
        if expiry is not None:
            if expiry > now:
                self.stats.negative_hits += 1
                return
            del self._rejected[token]
        self.stats.misses += 1
        if token not in self._in_flight:
            self._start(token, now)

    def sweep(self) -> int:
        """Forget the users whose TTL is over; how many were."""
        now = self._clock()
        expired = []
        for token, (_, expiry) in self._users.items():
            if expiry > now:
                break
            expired.append(token)
        for token in expired:
            del self._users[token]
        return len(expired)

    async def run(self, interval: float = 1.0) -> None:
        """Sweep every ``interval`` seconds, until cancelled."""
        while True:
            await asyncio.sleep(interval)
            self.sweep()

    def pending(self, token: str) -> asyncio.Task[tuple[str, str | None]] | None:
        """The lookup in flight for ``token``, if any."""
        return self._in_flight.get(token)

    def entries(self) -> tuple[int, int]:
        """(tokens with a known user, rejected or failed tokens) in the cache."""
        return len(self._users), len(self._rejected)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    # -- lookups ---------------------------------------------------------------------------

    def _start(self, token: str, now: float) -> None:
        spec = self.spec
        if len(self._in_flight) >= spec.max_concurrent:
            self.stats.skipped["busy"] += 1
            return
        self._budget = min(
            self._burst, self._budget + (now - self._budget_at) * spec.max_per_second
        )
        self._budget_at = now
        if self._budget < 1.0:
            self.stats.skipped["rate_limited"] += 1
            return
        self._budget -= 1.0
        task = asyncio.get_running_loop().create_task(self.lookup(token))
        self._in_flight[token] = task
        task.add_done_callback(lambda _: self._in_flight.pop(token, None))

    async def lookup(self, token: str) -> tuple[str, str | None]:
        """Ask the homeserver; remember the token's user. (result, localpart or None).

        The result is one of :data:`RESULTS`. Never raises: a failure is
        counted, logged without the token, and remembered for ``error_ttl``.
        """
        spec = self.spec
        result = "error"
        localpart: str | None = None
        try:
            status, body = await asyncio.wait_for(self._fetch(token), spec.timeout)
        except TimeoutError:
            result = "timeout"
            self._log(logging.WARNING, "whoami lookup timed out after %.1fs", spec.timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # The exception's text may hold the URL, never the token; its
            # type says enough.
            self._log(logging.WARNING, "whoami lookup failed: %s", type(exc).__name__)
        else:
            if status == 200:
                localpart = localpart_of(body)
                result = "user" if localpart else "bad_response"
                if localpart is None:
                    self._log(logging.WARNING, "whoami answered 200 without a usable user_id")
            elif status in (401, 403):
                result = "unknown_token"
            else:
                self._log(logging.WARNING, "whoami lookup answered HTTP %d", status)
        self.stats.lookups[result] += 1
        now = self._clock()
        if localpart is not None:
            _remember(self._users, token, (localpart, now + spec.ttl), spec.max_entries)
        else:
            ttl = spec.negative_ttl if result == "unknown_token" else spec.error_ttl
            _remember(self._rejected, token, now + ttl, spec.max_negative_entries)
        return result, localpart

    async def _http_fetch(self, token: str) -> tuple[int, bytes]:
        import aiohttp

        session = self._session
        if not isinstance(session, aiohttp.ClientSession) or session.closed:
            session = self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.spec.max_concurrent),
                cookie_jar=aiohttp.DummyCookieJar(),
                headers={"User-Agent": f"matrix-spoa/{__version__}"},
                trust_env=False,
            )
        async with session.get(
            self.spec.url,
            headers={"Authorization": f"Bearer {token}"},
            allow_redirects=False,
        ) as response:
            return response.status, await response.content.read(MAX_BODY)

    async def close(self) -> None:
        """Cancel the lookups in flight and close the HTTP connections."""
        tasks = list(self._in_flight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._in_flight.clear()
        session = self._session
        self._session = None
        close = getattr(session, "close", None)
        if close is not None:
            await close()
