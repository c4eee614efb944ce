"""A sample of the requests the agent decides, safe to keep (spoa serve --record).

Each line is a request in the format ``spoa explain --jsonl`` and ``spoa diff
--requests`` read (``method``, ``path`` with its query, ``headers``, ``src``),
plus what the agent decided (``recorded``: class, rule, key kind, policy,
time). No secret is written:

- an access token (``Authorization: Bearer``, ``?access_token=``) becomes a
  stand-in that keeps what routing reads: a ``syt_`` token keeps its user's
  part (so a replay keys it by the same user), any other token becomes
  ``rec_`` and a pseudonym, the same for the same token while the agent
  runs (so a replay gives each token one key, if not the original's);
- ``Authorization: X-Matrix`` keeps its origin only: key and signature go;
- any other Authorization header goes (routing reads nothing of it);
- the values of the query parameters that carry secrets (``token``,
  ``client_secret``, ``sid``, ``loginToken``, ``password``, ...) become
  ``redacted``.

The client address is kept: the ``src`` key kind routes by it.

Writing is rate-limited (a token bucket of ``rate`` lines a second) and
rotated by size (``FILE`` -> ``FILE.1``); a write error stops the recording
(logged, counted), never the routing.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Final, TextIO

from .matrix.tokens import access_token
from .matrix.xmatrix import xmatrix_origin
from .policy import Decision, Request

log = logging.getLogger(__name__)

#: Query parameters whose values are secrets in some Matrix or Synapse API.
SECRET_PARAMETERS: Final = frozenset(
    {
        "client_secret",
        "code",
        "login_token",
        "loginToken",
        "password",
        "refresh_token",
        "sid",
        "token",
    }
)


class Scrubber:
    """Stand-ins for the secrets of requests, stable for one secret key."""

    def __init__(self, secret: bytes | None = None) -> None:
        self._secret = secret if secret is not None else os.urandom(32)

    def _pseudonym(self, token: str, length: int) -> str:
        digest = hmac.new(self._secret, token.encode("utf-8", "surrogatepass"), hashlib.sha256)
        return digest.hexdigest()[:length]

    def token(self, token: str) -> str:
        """A token's stand-in: a ``syt_`` token keeps its user part, any other a pseudonym."""
        if token.startswith("syt_") and token.count("_") >= 2:
            user = token.split("_", 2)[1]
            return f"syt_{user}_{self._pseudonym(token, 20)}_{self._pseudonym('crc' + token, 6)}"
        return f"rec_{self._pseudonym(token, 24)}"

    def authorization(self, auth: str | None) -> str | None:
        if not auth:
            return None
        if auth[:8].lower() == "x-matrix":
            origin = xmatrix_origin(auth)
            if origin is None:
                return None
            quoted = origin.replace("\\", "\\\\").replace('"', '\\"')
            return f'X-Matrix origin="{quoted}"'
        token = access_token(auth, None)
        return f"Bearer {self.token(token)}" if token else None

    def query(self, query: str) -> str:
        parts = []
        for part in query.split("&"):
            name, sep, value = part.partition("=")
            if sep and name == "access_token":
                found = access_token(None, part)
                value = self.token(found) if found else ""
            elif sep and name in SECRET_PARAMETERS:
                value = "redacted"
            parts.append(f"{name}{sep}{value}")
        return "&".join(parts)

    def request(self, request: Request) -> dict[str, Any]:
        """The request as ``spoa explain --jsonl`` reads it, with its secrets replaced."""
        target = request.path
        if request.query is not None:
            target = f"{request.path}?{self.query(request.query)}"
        headers = {}
        auth = self.authorization(request.auth)
        if auth is not None:
            headers["Authorization"] = auth
        line: dict[str, Any] = {"method": request.method, "path": target, "headers": headers}
        if request.src is not None:
            line["src"] = str(request.src)
        return line


@dataclass
class RecordStats:
    written: int = 0
    #: Requests the rate limit left out.
    skipped: int = 0
    rotations: int = 0
    errors: int = 0


class Recorder:
    """Writes a rate-limited sample of decided requests to ``path``, rotated by size."""

    def __init__(
        self,
        path: str,
        rate: float = 10.0,
        max_bytes: int = 64 * 1024 * 1024,
        scrubber: Scrubber | None = None,
        clock: Any = time.monotonic,
    ) -> None:
        if rate <= 0:
            raise ValueError("the record rate must be above 0 requests a second")
        if max_bytes < 4096:
            raise ValueError("the record size limit must be at least 4096 bytes")
        self.path = path
        self.rate = rate
        self.max_bytes = max_bytes
        self.scrubber = scrubber or Scrubber()
        self.stats = RecordStats()
        self._clock = clock
        self._allowance = rate
        self._last = clock()
        self._file: TextIO | None = self._open()
        self._size = self._file.tell()

    def _open(self) -> TextIO:
        # Raises OSError at start (the agent refuses to start); later, stops recording.
        # Only the agent's user reads it: paths name users and rooms, src their addresses.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        return os.fdopen(fd, "a", encoding="utf-8", buffering=1)

    @property
    def active(self) -> bool:
        return self._file is not None

    def wants(self) -> bool:
        """Whether this request is in the sample (the token bucket): cheap, on the hot path."""
        if self._file is None:
            return False
        now = self._clock()
        allowance = min(self.rate, self._allowance + (now - self._last) * self.rate)
        self._last = now
        if allowance < 1.0:
            self._allowance = allowance
            self.stats.skipped += 1
            return False
        self._allowance = allowance - 1.0
        return True

    def write(self, request: Request, decision: Decision) -> None:
        if self._file is None:
            return
        line = self.scrubber.request(request)
        line["recorded"] = {
            "class": decision.worker_class,
            "rule": decision.rule,
            "key_kind": decision.key_kind,
            "policy": decision.policy,
            "at": round(time.time(), 3),
        }
        # ASCII: a path's undecodable bytes (surrogate escapes) stay writable.
        text = json.dumps(line, separators=(",", ":")) + "\n"
        size = len(text)
        try:
            if self._size and self._size + size > self.max_bytes:
                self._file.close()
                os.replace(self.path, self.path + ".1")
                self._file = self._open()
                self._size = 0
                self.stats.rotations += 1
            self._file.write(text)
        except OSError as exc:
            self.stats.errors += 1
            log.error("recording to %s stopped: %s", self.path, exc)
            self.close()
            return
        self._size += size
        self.stats.written += 1

    def close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
