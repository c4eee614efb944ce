"""Realistic Matrix request mixes, for the demo, the tests and the benchmarks.

A deployment is modelled as users (each with a ``syt_`` token and a device,
or an opaque ``mat_`` token as the Matrix Authentication Service issues
them), rooms, remote servers and media; :func:`generate` draws requests from
it in the proportions a busy homeserver sees: mostly long-polling
incremental syncs (v2 and native sliding sync), then event sending, inbound
federation, media, receipts and typing, pagination, and a tail of everything
else. Deterministic for a given seed.
"""

from __future__ import annotations

import base64
import random
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from ipaddress import ip_address

from .matrix import syt_localpart
from .routing import route_message
from .spop import Message


@dataclass(frozen=True, slots=True)
class TrafficRequest:
    """One request as a client sends it."""

    kind: str
    method: str
    path: str
    query: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    src: str = "192.0.2.1"

    @property
    def target(self) -> str:
        return f"{self.path}?{self.query}" if self.query else self.path

    @property
    def auth(self) -> str | None:
        return self.headers.get("Authorization")

    def route_message(self) -> Message:
        """The SPOE ``route`` message HAProxy sends for this request."""
        return route_message(self.method, self.path, self.query, self.auth, ip_address(self.src))

    def as_json(self) -> dict[str, object]:
        """The shape ``spoa explain --jsonl`` reads."""
        return {
            "method": self.method,
            "path": self.target,
            "headers": self.headers,
            "src": self.src,
        }


def syt_token(localpart: str, rng: random.Random) -> str:
    """A token shaped like Synapse's: syt_<base64 localpart>_<random>_<crc>."""
    encoded = base64.b64encode(localpart.encode()).decode().rstrip("=")
    letters = "".join(rng.choices(string.ascii_letters, k=20))
    crc = "".join(rng.choices(string.ascii_letters + string.digits, k=6))
    return f"syt_{encoded}_{letters}_{crc}"


def mas_token(localpart: str, rng: random.Random) -> str:
    """An opaque token shaped like MAS's (``mat_<random>``).

    The router cannot read a user out of it; the demo homeserver, which
    issued it, can (:func:`demo_token_user`): its random part starts with
    the URL-safe base64 of the localpart and a ``.``, a letter base64 never
    writes.
    """
    encoded = base64.urlsafe_b64encode(localpart.encode()).decode().rstrip("=")
    letters = "".join(rng.choices(string.ascii_letters + string.digits, k=24))
    return f"mat_{encoded}.{letters}"


def demo_token_user(token: str) -> str | None:
    """The localpart a token of this module names (what the demo's whoami answers)."""
    if not token.startswith("mat_"):
        return syt_localpart(token)
    encoded, dot, _ = token[4:].partition(".")
    if not dot:
        return None
    try:
        raw = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
        return raw.decode("utf-8") or None
    except (ValueError, UnicodeDecodeError):
        return None


@dataclass
class Deployment:
    """The population requests are drawn from."""

    server_name: str = "example.org"
    users: int = 500
    rooms: int = 200
    remotes: int = 50
    seed: int = 1
    #: The share of users holding opaque (MAS) tokens instead of syt_ ones.
    opaque_share: float = 0.0
    rng: random.Random = field(init=False)
    tokens: list[tuple[str, str]] = field(init=False)
    room_ids: list[str] = field(init=False)
    origins: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.tokens = [
            (
                f"user{i}",
                mas_token(f"user{i}", self.rng)
                if self.opaque_share and self.rng.random() < self.opaque_share
                else syt_token(f"user{i}", self.rng),
            )
            for i in range(self.users)
        ]
        self.room_ids = [
            "!" + "".join(self.rng.choices(string.ascii_letters, k=18)) + ":" + self.server_name
            for _ in range(self.rooms)
        ]
        origins = [f"remote{i}.example" for i in range(self.remotes)]
        # Real server names include ports and IPv6 literals.
        if self.remotes > 2:
            origins[1] = "matrix.remote1.example:8448"
            origins[2] = "[2001:db8::2]:8448"
        self.origins = origins


def _encode_room(room: str, rng: random.Random) -> str:
    # Clients send room IDs raw or percent-encoded; both are legal.
    if rng.random() < 0.5:
        return room
    return room.replace("!", "%21").replace(":", "%3A")


#: (kind, weight): what share of requests each family takes.
MIX: list[tuple[str, int]] = [
    ("sync", 35),
    ("sliding_sync", 10),
    ("initial_sync", 2),
    ("send", 10),
    ("federation_send", 8),
    ("federation_read", 4),
    ("media", 7),
    ("receipt", 5),
    ("typing", 4),
    ("messages", 4),
    ("keys", 3),
    ("profile", 1),
    ("versions", 2),
    ("other", 5),
]


@dataclass(frozen=True, slots=True)
class _Draw:
    """What every request draws first, whatever its kind (the order keeps runs alike)."""

    deployment: Deployment
    rng: random.Random
    user: str
    token: str
    bearer: dict[str, str]
    src: str
    room: str
    txn: int


#: method, path, query, headers, client address
_Parts = tuple[str, str, str | None, dict[str, str], str]


def _sync(x: _Draw) -> _Parts:
    since = f"s{x.rng.randrange(10**6)}_{x.rng.randrange(10**4)}"
    if x.rng.random() < 0.1:  # old clients still put the token in the query
        query = f"since={since}&timeout=30000&access_token={x.token}"
        return "GET", "/_matrix/client/v3/sync", query, {}, x.src
    query = f"filter=0&since={since}&timeout=30000"
    return "GET", "/_matrix/client/v3/sync", query, x.bearer, x.src


def _sliding_sync(x: _Draw) -> _Parts:
    # Element X: POST with a position (none on the first request).
    position = f"&pos={x.rng.randrange(10**6)}" if x.rng.random() < 0.95 else ""
    path = "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync"
    return "POST", path, "timeout=30000" + position, x.bearer, x.src


def _federation_send(x: _Draw) -> _Parts:
    d, rng = x.deployment, x.rng
    origin = rng.choice(d.origins)
    auth = (
        f'X-Matrix origin="{origin}",destination="{d.server_name}",'
        f'key="ed25519:a_{x.txn % 97}",sig="{base64.b64encode(rng.randbytes(64)).decode()}"'
    )
    src = f"203.0.113.{rng.randrange(1, 255)}"
    return "PUT", f"/_matrix/federation/v1/send/{x.txn}", None, {"Authorization": auth}, src


def _federation_read(x: _Draw) -> _Parts:
    origin = x.rng.choice(x.deployment.origins)
    headers = {"Authorization": f'X-Matrix origin="{origin}",key="ed25519:a",sig="c2ln"'}
    path = f"/_matrix/federation/v1/state_ids/{x.room}"
    return "GET", path, f"event_id=%24{x.txn}", headers, x.src


def _media(x: _Draw) -> _Parts:
    media = "".join(x.rng.choices(string.ascii_letters, k=24))
    path = f"/_matrix/client/v1/media/download/{x.deployment.server_name}/{media}"
    return "GET", path, None, x.bearer, x.src


def _client(method: str, path: str, query: str | None = None) -> Callable[[_Draw], _Parts]:
    """A request with the user's bearer token; ``path`` may name {room}, {txn}, {user}."""

    def build(x: _Draw) -> _Parts:
        user = f"@{x.user}:{x.deployment.server_name}"
        return method, path.format(room=x.room, txn=x.txn, user=user), query, x.bearer, x.src

    return build


def _versions(x: _Draw) -> _Parts:
    return "GET", "/_matrix/client/versions", None, {}, x.src


_KINDS: dict[str, Callable[[_Draw], _Parts]] = {
    "sync": _sync,
    "sliding_sync": _sliding_sync,
    "initial_sync": _client("GET", "/_matrix/client/v3/sync", "filter=0&timeout=0"),
    "send": _client("PUT", "/_matrix/client/v3/rooms/{room}/send/m.room.message/m{txn}"),
    "federation_send": _federation_send,
    "federation_read": _federation_read,
    "media": _media,
    "receipt": _client("POST", "/_matrix/client/v3/rooms/{room}/receipt/m.read/%24{txn}"),
    "typing": _client("PUT", "/_matrix/client/v3/rooms/{room}/typing/{user}"),
    "messages": _client("GET", "/_matrix/client/v3/rooms/{room}/messages", "dir=b&limit=30"),
    "keys": _client("POST", "/_matrix/client/v3/keys/query"),
    "profile": _client("GET", "/_matrix/client/v3/profile/{user}"),
    "versions": _versions,
    "other": _client("POST", "/_matrix/client/v3/pushers/set"),
}


def generate(count: int, deployment: Deployment | None = None) -> Iterator[TrafficRequest]:
    """``count`` requests in the proportions of :data:`MIX`."""
    d = deployment or Deployment()
    rng = d.rng
    kinds = [k for k, _ in MIX]
    weights = [w for _, w in MIX]
    for _ in range(count):
        kind = rng.choices(kinds, weights)[0]
        user, token = rng.choice(d.tokens)
        src = f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
        room = _encode_room(rng.choice(d.room_ids), rng)
        txn = rng.randrange(10**9)
        bearer = {"Authorization": f"Bearer {token}"}
        yield TrafficRequest(
            kind, *_KINDS[kind](_Draw(d, rng, user, token, bearer, src, room, txn))
        )


#: The kinds of key :func:`one_per_key` makes requests for.
KEYED_KINDS = ("user", "room", "origin")


def one_per_key(key_kind: str, count: int, seed: int = 1) -> list[TrafficRequest]:
    """``count`` requests, each with a key of its own: users' incremental syncs (``user``),
    messages sent into rooms (``room``) or inbound transactions from remote servers
    (``origin``). The same requests for the same seed."""
    if key_kind not in KEYED_KINDS:
        raise ValueError(f"no requests for key kind {key_kind!r}; one of {KEYED_KINDS}")
    d = Deployment(
        users=count if key_kind == "user" else 1,
        rooms=count if key_kind == "room" else 0,
        remotes=0,
        seed=seed,
    )
    src = "192.0.2.1"
    if key_kind == "user":
        return [
            TrafficRequest(
                "sync",
                "GET",
                "/_matrix/client/v3/sync",
                f"since=s{n}_1&timeout=30000",
                {"Authorization": f"Bearer {token}"},
                src,
            )
            for n, (_, token) in enumerate(d.tokens)
        ]
    bearer = {"Authorization": f"Bearer {d.tokens[0][1]}"}
    if key_kind == "room":
        return [
            TrafficRequest(
                "send",
                "PUT",
                f"/_matrix/client/v3/rooms/{_encode_room(room, d.rng)}/send/m.room.message/m{n}",
                None,
                bearer,
                src,
            )
            for n, room in enumerate(d.room_ids)
        ]
    # Server names as federation sees them: most bare, some with a port,
    # a few IPv6 literals.
    origins = []
    for n in range(count):
        label = f"hs{d.rng.getrandbits(40):010x}"
        if n % 50 == 7:
            origins.append(f"[2001:db8::{label[2:6]}:{label[6:10]}]:8448")
        elif n % 10 == 3:
            origins.append(f"matrix.{label}.example:8448")
        else:
            origins.append(f"{label}.example")
    return [
        TrafficRequest(
            "federation_send",
            "PUT",
            f"/_matrix/federation/v1/send/{n}",
            None,
            {
                "Authorization": f'X-Matrix origin="{origin}",destination="{d.server_name}",'
                'key="ed25519:a",sig="c2ln"'
            },
            f"203.0.113.{1 + n % 254}",
        )
        for n, origin in enumerate(origins)
    ]
