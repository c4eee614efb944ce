"""The fallback routes like the agent: same class, key and rule, through real HAProxy.

When the agent does not answer, HAProxy routes by itself with the lines of
haproxy/haproxy.cfg, by the map ``spoa fallback`` makes from the policy. For
every request its class, hash key and rule must be the ones the agent's
policy gives, so stickiness survives an agent outage. Each test frontend runs
the shipped fallback lines on a map generated here and answers with the
variables they set; the same requests go through :meth:`CompiledPolicy.decide`
in Python.

Requests are sent as raw bytes over keep-alive sockets bound to 127.0.0.x
source addresses, so percent-escapes, odd header bytes and the client
address are exactly what the test says.
"""

from __future__ import annotations

import asyncio
import base64
import re
import re._constants as sre  # type: ignore[import-not-found]
import re._parser as sre_parse  # type: ignore[import-not-found]
import socket
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import Any

import pytest
import xxhash

from spoa.demo.ports import free_port
from spoa.demo.stack import haproxy_at_least
from spoa.fallback import fallback_map, map_entries, write_map
from spoa.haproxyapi import RuntimeApi
from spoa.matrix.keys import NATIVE_REGEXES
from spoa.policy import DEFAULT_RULE, CompiledPolicy, Decision, Request, load_policy
from spoa.policy.compiled import key_salt
from spoa.traffic import Deployment, generate
from tests.integration.harness import HAProxy
from tests.policy.test_synapse_workers_table import NEAR_MISSES, OVERLAPS, ROOM_KEYED, ROWS
from tests.policy_edits import ADDED, MOVED, edited_synapse_policy

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
REFERENCE_CONFIG = ROOT / "haproxy" / "haproxy.cfg"

#: Every rule of a policy must be compared at least this often.
MIN_PER_RULE = 3
#: Requests of spoa.traffic compared, for synapse-workers; fewer for the others.
GENERATED = 100_000
GENERATED_OTHERS = 5_000
#: Client addresses the requests come from (all of 127/8 is loopback).
SOURCES = tuple(f"127.0.0.{n}" for n in range(2, 10))
POLICIES = ("synapse-workers", "simple", "synapse-workers-mas")

SEEDS = (0, 1, 42, 1234, 0x9747B28C, 2**31, 2**32 - 1)


def policy_of(name: str) -> CompiledPolicy:
    return load_policy(str(ROOT / "policies" / f"{name}.yaml"))


def seeded(seed: int, directory: Path) -> CompiledPolicy:
    """synapse-workers with another seed."""
    text = (ROOT / "policies" / "synapse-workers.yaml").read_text()
    assert text.count("\nseed: 0\n") == 1
    path = directory / f"seed{seed}.yaml"
    path.write_text(text.replace("\nseed: 0\n", f"\nseed: {seed}\n"))
    return load_policy(str(path))


ANSWER = (
    "%[var(txn.route.backend)] %[var(txn.route.key)] %[var(txn.route.rule)] "
    "%[var(txn.route.via)]\\n"
)

FRONTEND = """\
frontend fe_{name}
    bind 127.0.0.1:{port}
{block}
    http-request return status 200 content-type text/plain lf-string "{answer}" \
hdr X-Route-Policy "%[var(txn.route.policy)]"
"""

MAP_DEFAULT = '"${SPOA_FALLBACK_MAP-/run/matrix-spoa/fallback.map}"'


def fallback_block(map_path: Path) -> str:
    """The fallback's lines of haproxy/haproxy.cfg, reading ``map_path``."""
    lines = REFERENCE_CONFIG.read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if "set-var-fmt(txn.fb)" in line)
    last = next(i for i, line in enumerate(lines) if " pathq," in line)
    block = "\n".join(lines[first : last + 1])
    assert block.count(MAP_DEFAULT) == 1, block
    return block.replace(MAP_DEFAULT, f'"{map_path}"')


CONFIG = """\
global
    stats socket {workdir}/admin.sock mode 600 level admin

defaults
    mode http
    timeout connect 1s
    timeout client 10s
    timeout server 10s
    timeout http-keep-alive 10s

{frontends}
"""


# -- requests and answers ---------------------------------------------------------------


def _agent_text(raw: bytes) -> str:
    # What the agent receives: SPOE strings decoded with surrogateescape.
    return raw.decode("utf-8", "surrogateescape")


@dataclass(frozen=True)
class Case:
    """One request, as bytes on the wire and as the agent would see it."""

    method: str
    target: bytes
    auth: bytes | None = None
    src: str = SOURCES[0]

    def wire(self) -> bytes:
        lines = [self.method.encode() + b" " + self.target + b" HTTP/1.1", b"Host: test"]
        if self.auth is not None:
            lines.append(b"Authorization: " + self.auth)
        return b"\r\n".join([*lines, b"", b""])

    def request(self) -> Request:
        path, question, query = self.target.partition(b"?")
        return Request(
            self.method,
            _agent_text(path),
            _agent_text(query) if question else None,
            # HAProxy drops the spaces and tabs around a header value.
            _agent_text(self.auth.strip(b" \t")) if self.auth is not None else None,
            self.src,
        )


@dataclass(frozen=True)
class Answer:
    """The variables the fallback set ("" when not set)."""

    backend: str
    key: str
    rule: str
    via: str
    policy: str


class Client:
    """Keep-alive HTTP/1.1 over raw sockets, one connection per port and source."""

    def __init__(self) -> None:
        self._sockets: dict[tuple[int, str], socket.socket] = {}

    def close(self) -> None:
        for sock in self._sockets.values():
            sock.close()
        self._sockets.clear()

    def _socket(self, port: int, source: str) -> socket.socket:
        sock = self._sockets.get((port, source))
        if sock is None:
            sock = socket.create_connection(("127.0.0.1", port), 5, source_address=(source, 0))
            self._sockets[(port, source)] = sock
        return sock

    def _exchange(self, sock: socket.socket, data: bytes) -> tuple[int, dict[str, str], bytes]:
        sock.sendall(data)
        buffer = b""
        while b"\r\n\r\n" not in buffer:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed before the response")
            buffer += chunk
        head, _, body = buffer.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed in the body")
            body += chunk
        return int(status_line.split()[1]), headers, body

    def exchange_raw(self, port: int, case: Case) -> tuple[int, dict[str, str], bytes]:
        """One exchange on a fresh connection (HAProxy may close it after an error)."""
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        try:
            return self._exchange(sock, case.wire())
        finally:
            sock.close()

    def send(self, port: int, case: Case) -> Answer:
        try:
            status, headers, body = self._exchange(self._socket(port, case.src), case.wire())
        except OSError:
            # A keep-alive connection HAProxy closed meanwhile: reconnect once.
            self._sockets.pop((port, case.src)).close()
            status, headers, body = self._exchange(self._socket(port, case.src), case.wire())
        assert status == 200, (case, status, body)
        backend, key, rule, via = body.decode().rstrip("\n").split(" ")
        return Answer(backend, key, rule, via, headers.get("x-route-policy", ""))


# -- HAProxy ------------------------------------------------------------------------------


@dataclass
class Proxy:
    haproxy: HAProxy
    ports: dict[str, int]
    maps: dict[str, Path]
    policies: dict[str, CompiledPolicy]
    client: Client

    def send(self, frontend: str, case: Case) -> Answer:
        return self.client.send(self.ports[frontend], case)

    def api(self) -> RuntimeApi:
        return RuntimeApi(str(self.haproxy.admin_socket))


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    workdir = tmp_path_factory.mktemp("native-fallback")
    policies = {name: policy_of(name) for name in POLICIES}
    policies |= {f"seed{seed}": seeded(seed, workdir) for seed in SEEDS}
    for name in ("edited", "pushed"):
        policies[name] = policies["synapse-workers"]
    maps = {name: workdir / f"{name}.map" for name in (*policies, "empty")}
    for name, policy in policies.items():
        write_map(maps[name], fallback_map(policy))
    maps["empty"].write_text("")
    ports = {name: free_port() for name in maps}
    config = CONFIG.format(
        workdir=workdir,
        frontends="\n".join(
            FRONTEND.format(
                name=name, port=ports[name], block=fallback_block(maps[name]), answer=ANSWER
            )
            for name in maps
        ),
    )
    haproxy = HAProxy(workdir, config)
    haproxy.start(ports["synapse-workers"])
    client = Client()
    try:
        yield Proxy(haproxy, ports, maps, policies, client)
    finally:
        client.close()
        haproxy.stop()
    errors = [line for line in haproxy.log().splitlines() if "error" in line.lower()]
    assert not errors, errors


# -- the shared request set -----------------------------------------------------------------


def generated_cases(count: int) -> list[Case]:
    """Realistic traffic, each generated client address mapped to a local one."""
    cases = []
    for request in generate(count, Deployment(users=2000, rooms=500, remotes=100, seed=11)):
        auth = request.auth
        source = SOURCES[int(IPv4Address(request.src)) % len(SOURCES)]
        cases.append(
            Case(
                request.method,
                request.target.encode(),
                auth.encode() if auth is not None else None,
                source,
            )
        )
    return cases


def table_cases() -> list[Case]:
    """The requests of the Synapse workers table: documented endpoints, overlaps, near misses
    and room-keyed requests (tests/policy/synapse_workers_table.yaml)."""
    alice = f"Bearer {ALICE}".encode()
    cases = [Case(r.method, r.target.encode(), alice) for r in ROWS]
    cases += [Case(o.method, o.path.encode(), alice) for o in OVERLAPS]
    for miss in NEAR_MISSES:
        target = miss.path + (f"?{miss.query}" if miss.query is not None else "")
        cases.append(Case(miss.method, target.encode(), alice))
    for method, template, _ in ROOM_KEYED:
        for room in ("!abc:example.org", "%21abc%3Aexample.org", "%2521x"):
            cases.append(Case(method, template.replace("{room}", room).encode(), alice))
    return cases


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode().rstrip("=")


ALICE = f"syt_{_b64(b'alice')}_AbCdEfGhIjKlMnOpQrSt_0a1B2c"

#: Tokens: syt_ ones that decode, and every way of not being one.
TOKENS = (
    ALICE,
    "syt_YWxpY2U_x",  # three parts is enough
    "syt_YWxpY2U_",  # and the last may be empty
    "syt_YWxpY2U",  # two parts: the whole token
    "syt__x_y",  # empty localpart field
    "syt_",
    "syt_YQ=_x_y",  # padding inside the field
    "syt_YQ==_x_y",
    "syt_YWJj===_x_y",  # padding after a complete quad (accepted)
    "syt_YQ===_x_y",  # data after the padding
    "syt_=YQ_x_y",  # leading padding
    "syt_YQ=Q_x_y",  # data between padding characters
    "syt_YR_x_y",  # non-canonical trailing bits: still "a"
    "syt_YWxpY_x_y",  # 5 characters: impossible length
    "syt_YW!pY2U_x_y",  # not base64
    "syt_YW-pY2U_x_y",  # urlsafe alphabet is not base64
    "syt_" + _b64(b"\xff\xfe") + "_x_y",  # not UTF-8
    "syt_" + _b64(b"\xed\xa0\x80") + "_x_y",  # an encoded surrogate: not UTF-8
    "syt_" + _b64(b"\xc0\xaf") + "_x_y",  # overlong
    "syt_" + _b64(b"\xf4\x90\x80\x80") + "_x_y",  # above U+10FFFF
    "syt_" + _b64("é".encode()) + "_x_y",
    "syt_" + _b64("😀".encode()) + "_x_y",  # "+" in the field
    "syt_" + _b64(b"\x00") + "_x_y",  # a NUL localpart is still a localpart
    "SYT_YWxpY2U_x_y",
    "mat_abcdefghijklmnopqrstuvwxyz_123456",
    "MDAxOGxvY2F0aW9uIGV4YW1wbGUub3JnCjAwMTNpZGVudGlmaWVyIGtleQo",
)


def _sync_cases() -> list[Case]:
    cases = []
    for token in TOKENS:
        bearer = f"Bearer {token}".encode()
        cases.append(Case("GET", b"/_matrix/client/v3/sync?since=s1_2&timeout=30000", bearer))
        cases.append(Case("GET", b"/_matrix/client/v3/sync", bearer))
        cases.append(
            Case("GET", b"/_matrix/client/r0/sync?since=s9&access_token=" + token.encode())
        )
        # Native sliding sync: with or without a position, the sync family.
        cases.append(Case("POST", SLIDING_SYNC + b"?pos=12&timeout=30000", bearer))
        cases.append(Case("POST", SLIDING_SYNC, bearer))
        cases.append(Case("POST", SLIDING_SYNC + b"?access_token=" + token.encode()))
    queries = (
        b"since=",
        b"since",
        b"timeout=0&since",
        b"since=&since=s2",  # the first one counts: empty
        b"since=s2&since=",
        b"%73ince=s1",  # percent-encoded name
        b"%73%69nce=s1",
        b"%73INCE=s1",
        b"since%3Ds1",
        b"since%=s1",
        b"xsince=s1",
        b"SINCE=s1",
        b"&&since=s1&&",
        b"filter=%7B%7D&since=s%20x",
        b"",
    )
    alice = f"Bearer {ALICE}".encode()
    for query in queries:
        cases.append(Case("GET", b"/_matrix/client/v3/sync?" + query, alice))
    headers = (
        b"bEaReR " + ALICE.encode(),
        b"Bearer \t " + ALICE.encode() + b" \t",
        b"Bearer",
        b"Bearer ",
        b"Bearer\t" + ALICE.encode(),
        b"Bearerx " + ALICE.encode(),
        b"Basic dXNlcjpwYXNz",
        b"",
    )
    for header in headers:
        cases.append(Case("GET", b"/_matrix/client/v3/sync?since=s1", header))
        cases.append(
            Case("GET", b"/_matrix/client/v3/sync?since=s1&access_token=syt_Ym9i_q_r", header)
        )
    for query in (
        b"access_token=syt%5FYm9i%5Fq%5Fr",  # decoded once: bob
        b"access_token=syt_Ym9i_q_r&access_token=syt_YWxpY2U_x_y",
        b"access_token=&access_token=syt_Ym9i_q_r",  # the first one counts: empty
        b"access_token",
        b"access%5Ftoken=syt_Ym9i_q_r",  # the agent ignores an encoded name alone
        b"access%5Ftoken=syt_Ym9i_q_r&access_token=syt_YWxpY2U_x_y",
        b"access_token=%ZZ",
        b"access_token=%FF%FE",
        b"access_token=syt_%FF_x",
        b"access_token=syt_Ym9i_q_r%2",
        b"access_token=a%2525b",
    ):
        cases.append(Case("GET", b"/_matrix/client/v3/sync?since=s1&" + query))
    for path in (
        b"/_matrix/client/api/v1/events",
        b"/_matrix/client/r0/events",
        b"/_matrix/client/v3/events?from=s1",
        b"/_matrix/client/api/v1/initialSync",
        b"/_matrix/client/r0/initialSync?limit=1",
        b"/_matrix/client/v3/rooms/%21abc%3Aexample.org/initialSync",
        b"/_matrix/client/api/v1/rooms/!abc:example.org/initialSync",
        b"/_matrix/client/r0/sync",
        # Near misses: rest.
        b"/_matrix/client/v3/sync/",
        b"/_matrix/client/v4/sync?since=s1",
        b"/_matrix/client/unstable/sync?since=s1",
        b"/_matrix/client/api/v1/sync",
        b"/_matrix/client/v3/syncx",
        b"/_MATRIX/client/v3/sync",
        b"//_matrix/client/v3/sync",
        b"/_matrix/client/v3/sync%2F",
        b"/_matrix/client/v3/events/",
        b"/_matrix/client/unstable/events",
        b"/_matrix/client/v3/initialSync/x",
        b"/_matrix/client/v3/rooms//initialSync",
        b"/_matrix/client/v3/rooms/a/b/initialSync",
        # Near misses of native sliding sync: rest.
        SLIDING_SYNC + b"/",
        b"/_matrix/client/unstable/org.matrix.msc3575/sync",
        b"/_matrix/client/v3/org.matrix.simplified_msc3575/sync",
        b"/_matrix/client/unstable/org.matrix.simplified_msc3575/syncx",
        b"/_matrix/client/unstable/org.matrix.simplified_msc3575",
    ):
        cases.append(Case("GET", path, alice))
        cases.append(Case("POST", path, alice))
    return cases


SLIDING_SYNC = b"/_matrix/client/unstable/org.matrix.simplified_msc3575/sync"


ROOMS = (
    b"!abc:example.org",
    b"%21abc%3Aexample.org",
    b"%21abc%3aexample.org",
    b"%2521abc%3Aexample.org",  # decoded once: %21abc:example.org
    b"%23alias%3Aexample.org",
    b"%2Calias",
    b"!abc%2Fdef:example.org",  # an encoded slash stays in the segment
    b"%E2%82%AC",  # UTF-8 for the euro sign
    b"%FF%FE",  # not UTF-8
    b"%e2%82",  # truncated UTF-8
    b"%2",  # bad escapes stay as they are
    b"%zz%",
    b"%%21",
    b"%G1abc",
    b"%00",
)


def _room_cases() -> list[Case]:
    cases = []
    alice = f"Bearer {ALICE}".encode()
    for room in ROOMS:
        for version in (b"api/v1", b"r0", b"v3", b"unstable"):
            prefix = b"/_matrix/client/" + version
            cases.append(
                Case("PUT", prefix + b"/rooms/" + room + b"/send/m.room.message/t1", alice)
            )
        prefix = b"/_matrix/client/v3"
        for suffix in (
            b"/redact/$ev/t2",
            b"/state/m.room.member/@alice:example.org",
            b"/state/m.room.name/",
            b"/state/",
            b"/join",
            b"/invite",
            b"/leave",
            b"/ban",
            b"/unban",
            b"/kick",
            b"/sendx",
            # Near misses: rest.
            b"/state",
            b"/join/",
            b"/joined_members",
            b"/forget",
            b"/kick/x",
            b"/messages",
            b"/typing/@alice:example.org",
            b"/receipt/m.read/$ev",
        ):
            cases.append(Case("POST", prefix + b"/rooms/" + room + suffix, alice))
        cases.append(Case("POST", prefix + b"/join/" + room + b"?server_name=example.org", alice))
        cases.append(Case("POST", b"/_matrix/client/r0/knock/" + room, alice))
    for path in (
        b"/_matrix/client/v3/join/",
        b"/_matrix/client/v3/join//x",
        b"/_matrix/client/v3/join/rooms/x",
        b"/_matrix/client/v3/knock/%21k%3Ax/rooms/%21r%3Ax",
        b"/_matrix/client/v3/rooms//send/x",
        b"/_matrix/client/v3/rooms/%21a%3Ax/join/%21b%3Ax",
        b"/_matrix/client/v4/rooms/!a:x/send/m.room.message/1",
        b"/_matrix/client/v3/room/!a:x/send/m.room.message/1",
        b"/_matrix/client/v3/rooms/!a:x",
    ):
        cases.append(Case("POST", path, alice))
    return cases


#: X-Matrix headers: (header, what the case is about).
XMATRIX = (
    b'X-Matrix origin="remote.example",destination="example.org",key="ed25519:a",sig="c2ln"',
    b'X-Matrix destination="example.org",key="ed25519:a",origin="late.example",sig="c2ln"',
    b"X-Matrix origin=remote.example:8448,key=ed25519:a,sig=c2ln",
    b"X-Matrix origin=[2001:db8::1]:8448,key=ed25519:a",
    b'X-Matrix origin="[2001:db8::1]",key="ed25519:a"',
    b"X-Matrix origin=[::1]",
    b"x-matrix origin=lower.example",
    b"X-MATRIX ORIGIN=upper.example",
    b"X-Matrix   oRiGiN=spaces.example",
    b'X-Matrix origin = "padded.example" , key = "k"',
    b'X-Matrix key="k"\t,\torigin=tabs.example',
    b'X-Matrix origin="a\\"b.example"',  # escaped quote
    b'X-Matrix origin="a\\\\b.example"',  # escaped backslash
    b'X-Matrix origin="a\\b.example"',  # an escaped ordinary character
    b'X-Matrix key="a,origin=b",sig="c"',  # a comma inside quotes: no origin
    b'X-Matrix origin="truncated.example',
    b'X-Matrix origin="a.example\\',
    b'X-Matrix key="k",origin',
    b'X-Matrix key="k",origin=',
    b"X-Matrix origin=,key=k",
    b'X-Matrix origin="",origin=second.example',
    b"X-Matrix origin=first.example,origin=second.example",
    b"X-Matrix origin=trailing.example,",
    b"X-Matrix ,origin=a.example",
    b"X-Matrix origin==a.example",
    b'X-Matrix origin="a.example"b',
    b"X-Matrix key=k origin=a.example",
    b"X-Matrix origin=a b",
    b"X-Matrix origin=a\x0bb",  # vertical tab: whitespace to the agent
    b"X-Matrix origin=a\x1cb",  # so is \x1c
    b"X-Matrix origin=a\xc2\xa0b",  # and a no-break space
    b"X-Matrix origin=a\xe2\x80\x8a",  # and a hair space
    b"X-Matrix origin=a\xe2\x80\x8bb",  # a zero-width space is not
    b"X-Matrix origin=a\x85b",  # nor a lone \x85 byte
    b"X-Matrix origin=a\xc2b",  # a broken UTF-8 sequence
    b'X-Matrix origin="q\xffq"',
    b"X-Matrix origin=nul\x00.example",
    b"X-Matrix origin=del\x7f.example",
    b"X-Matrix key=k,sig=s",  # no origin: the client address
    b"X-Matrix",
    b"X-Matrix ",
    b"X-Matrix\torigin=tab.example",
    b"X-Matrixorigin=a.example",
    b"X-Matrix-Ext origin=a.example",
    b"Bearer " + ALICE.encode(),
    b'Signature origin="a.example"',
)


def _federation_cases() -> list[Case]:
    cases = []
    for i, header in enumerate(XMATRIX):
        source = SOURCES[i % len(SOURCES)]
        cases.append(Case("PUT", b"/_matrix/federation/v1/send/txn%d" % i, header, source))
        cases.append(
            Case("GET", b"/_matrix/federation/v1/state_ids/%21r%3Ax?event_id=%24e", header)
        )
    for source in SOURCES:
        cases.append(Case("PUT", b"/_matrix/federation/v1/send/1", None, source))
    for path in (
        b"/_matrix/federation/v1/send/",
        b"/_matrix/federation/v1/version",
        b"/_matrix/federation/v1/version?",
        b"/_matrix/federation/v1/version?x=1",
        b"/_matrix/federation/v1/event/$ev?x=%41",
        b"/_matrix/federation/v1/state/%21r%3Ax?event_id=%24e",
        b"/_matrix/federation/v1/backfill/!r:x?v=%24e&limit=10",
        b"/_matrix/federation/v1/get_missing_events/!r:x",
        b"/_matrix/federation/v1/publicRooms",
        b"/_matrix/federation/v1/publicRoomsX?limit=5",
        b"/_matrix/federation/v1/query/profile?user_id=%40a%3Ax",
        b"/_matrix/federation/v1/make_join/!r:x/@u:y?ver=10",
        b"/_matrix/federation/v1/make_leave/!r:x/@u:y",
        b"/_matrix/federation/v1/send_join/!r:x/$e",
        b"/_matrix/federation/v2/send_join/!r:x/$e?omit_members=true",
        b"/_matrix/federation/v2/send_leave/!r:x/$e",
        b"/_matrix/federation/v1/make_knock/!r:x/@u:y",
        b"/_matrix/federation/v1/send_knock/!r:x/$e",
        b"/_matrix/federation/v1/invite/!r:x/$e",
        b"/_matrix/federation/v2/invite/!r:x/$e",
        b"/_matrix/federation/v1/event_auth/!r:x/$e",
        b"/_matrix/federation/v1/timestamp_to_event/!r:x?dir=f&ts=1",
        b"/_matrix/federation/v1/exchange_third_party_invite/!r:x",
        b"/_matrix/federation/v1/user/devices/@u:x",
        b"/_matrix/key/v2/query",
        b"/_matrix/key/v2/query/remote.example",
        b"/_matrix/federation/v1/hierarchy/!r:x?suggested_only=true",
        b"/_matrix/media/v3/download/example.org/abc",
        b"/_matrix/media/r0/thumbnail/example.org/abc?width=32",
        b"/_matrix/media/v3/config",
        b"/_matrix/client/v1/media/download/example.org/abc",
        b"/_matrix/federation/v1/media/download/abc",
        # Near misses: rest.
        b"/_matrix/federation/v1/send",
        b"/_matrix/federation/v2/send/1",
        b"/_matrix/federation/v1/sendx/1",
        b"/_matrix/federation/v1/versionx",
        b"/_matrix/federation/v1/version/",
        b"/_matrix/federation/v3/state/!r:x",
        b"/_matrix/federation/v2/make_join/!r:x/@u:y",
        b"/_matrix/federation/v1/user/keys/query",
        b"/_matrix/key/v2/server",
        b"/_matrix/media",
        b"/_matrix/client/v3/media/config",
        b"/_matrix/client/v1/media",
        b"/_matrix/federation/v2/media/download/abc",
        b"/_synapse/admin/v1/media/example.org/abc",
        b"/_synapse/admin/v1/purge_media_cache",
    ):
        cases.append(Case("GET", path, XMATRIX[0]))
    return cases


def _rest_cases() -> list[Case]:
    alice = f"Bearer {ALICE}".encode()
    return [
        Case(method, path, alice)
        for method, path in (
            ("GET", b"/"),
            ("GET", b"/_matrix/client/versions"),
            ("OPTIONS", b"/_matrix/client/v3/sync"),
            ("GET", b"/_matrix/client/v3/profile/@alice:example.org"),
            ("POST", b"/_matrix/client/v3/keys/query"),
            ("GET", b"/_synapse/admin/v2/users/@alice:example.org"),
            ("GET", b"/_matrix/client/v3/login/sso/redirect?redirectUrl=x"),
            ("GET", b"/_synapse/client/pick_idp"),
            ("PUT", b"/_matrix/client/v3/sendToDevice/m.x/1"),
            ("GET", b"/health?access_token=" + ALICE.encode()),
        )
    ]


def sample_path(regex: str) -> bytes:
    """A path ``regex`` matches: the first alternative, "x" wherever it allows anything."""
    parsed = sre_parse.parse(regex)

    def build(items: Any) -> str:
        out = []
        for op, value in items:
            if op is sre.LITERAL:
                out.append(chr(value))
            elif op in (sre.ANY, sre.NOT_LITERAL):
                out.append("x")
            elif op is sre.IN:
                first_op, first = value[0]
                if first_op is sre.NEGATE:
                    out.append("x")
                else:
                    out.append(chr(first[0] if first_op is sre.RANGE else first))
            elif op is sre.SUBPATTERN:
                out.append(build(value[3]))
            elif op is sre.BRANCH:
                out.append(build(value[1][0]))
            elif op in (sre.MAX_REPEAT, sre.MIN_REPEAT, sre.POSSESSIVE_REPEAT):
                out.append(build(value[2]) * max(value[0], 1))
        return "".join(out)

    path = build(parsed)
    path = path if path.startswith("/") else "/_matrix/" + path
    assert re.search(regex, path), (regex, path)
    return path.encode()


def rule_cases() -> list[Case]:
    """Every path pattern of every bundled policy, with methods and queries around its rule's."""
    alice = f"Bearer {ALICE}".encode()
    cases = []
    for name in POLICIES:
        for rule in policy_of(name).rules:
            assert rule.spec is not None
            for pattern in rule.spec.paths:
                path = sample_path(pattern)
                for method, query in (
                    ("GET", b""),
                    ("PUT", b"?since=s1"),
                    ("POST", b"?since="),
                    ("DELETE", b"?from=x&since=s2"),
                ):
                    cases.append(Case(method, path + query, alice))
    return cases


def edge_cases() -> list[Case]:
    return _sync_cases() + _room_cases() + _federation_cases() + _rest_cases() + rule_cases()


_CASES: dict[int, list[Case]] = {}


def rejects_nul_in_headers() -> bool:
    """HAProxy 3.x answers 400 to a NUL byte in a header, before any filter (2.6 lets it by)."""
    return haproxy_at_least(3, 0)


def shared_cases(generated: int = GENERATED_OTHERS) -> list[Case]:
    """The request set the parity tests use (built once per size).

    Requests with a NUL byte in a header never reach the fallback on 3.x:
    test_a_nul_byte_in_a_header_is_refused_before_routing_on_3x covers them.
    """
    if generated not in _CASES:
        cases = generated_cases(generated) + table_cases() + edge_cases()
        if rejects_nul_in_headers():
            cases = [c for c in cases if b"\x00" not in (c.auth or b"")]
        _CASES[generated] = cases
    return _CASES[generated]


def test_a_nul_byte_in_a_header_is_refused_before_routing_on_3x(proxy: Proxy) -> None:
    case = Case("PUT", b"/_matrix/federation/v1/send/t1", b"X-Matrix origin=nul\x00.example")
    if not rejects_nul_in_headers():
        assert proxy.send("synapse-workers", case).rule == "federation_inbound"
        return
    status, _, _ = proxy.client.exchange_raw(proxy.ports["synapse-workers"], case)
    assert status == 400


# -- parity ---------------------------------------------------------------------------------


def assert_parity(
    proxy: Proxy, name: str, cases: Sequence[Case], policy: CompiledPolicy | None = None
) -> Counter[str]:
    """The fallback and the agent give every request the same class, key and rule.

    Returns how many requests each rule decided.
    """
    if policy is None:
        policy = proxy.policies[name]
    counts: Counter[str] = Counter()
    mismatches: list[tuple[Case, Answer, Decision]] = []
    for case in cases:
        answer = proxy.send(name, case)
        decision = policy.decide(case.request())
        assert (answer.via, answer.policy) == ("fallback", policy.version), (case, answer)
        counts[decision.rule] += 1
        got = (answer.backend, answer.key or None, answer.rule)
        key = str(decision.key) if decision.key is not None else None
        if got != (decision.worker_class, key, decision.rule):
            mismatches.append((case, answer, decision))
    assert not mismatches, f"{len(mismatches)} of {len(cases)} differ:\n" + "\n".join(
        f"{case}: fallback {answer.backend} {answer.key or '-'} {answer.rule}, "
        f"agent {decision.worker_class} {decision.key or '-'} {decision.rule} "
        f"({decision.key_kind})"
        for case, answer, decision in mismatches[:20]
    )
    names = (*(r.name for r in policy.rules), DEFAULT_RULE)
    rare = {rule: counts[rule] for rule in names if counts[rule] < MIN_PER_RULE}
    assert not rare, f"rules compared fewer than {MIN_PER_RULE} times: {rare}"
    return counts


@pytest.mark.parametrize("name", POLICIES)
def test_fallback_gives_the_agents_class_key_and_rule(proxy: Proxy, name: str) -> None:
    cases = shared_cases(GENERATED if name == "synapse-workers" else GENERATED_OTHERS)
    counts = assert_parity(proxy, name, cases)
    print(f"compared {len(cases)} requests, per rule ({name}):", dict(sorted(counts.items())))


def test_every_key_kind_falls_back_like_the_agent(proxy: Proxy) -> None:
    """Keys that were found, and each documented fallback, in both engines."""
    policy = proxy.policies["synapse-workers"]
    alice = f"Bearer {ALICE}".encode()
    expectations = (
        (Case("GET", b"/_matrix/client/v3/sync?since=1", alice), "user"),
        (Case("GET", b"/_matrix/client/v3/sync?since=1", b"Bearer mat_x"), "token"),
        (Case("GET", b"/_matrix/client/v3/sync?since=1"), "none"),
        (Case("PUT", b"/_matrix/federation/v1/send/1", XMATRIX[0]), "origin"),
        (Case("PUT", b"/_matrix/federation/v1/send/1", b"X-Matrix key=k", SOURCES[3]), "src"),
        (Case("GET", b"/_matrix/federation/v1/version?a=b"), "uri"),
        (Case("PUT", b"/_matrix/client/v3/rooms/%21a%3Ax/send/m/1"), "room"),
        (Case("POST", b"/_matrix/client/v3/join/"), "none"),
        (Case("GET", b"/_matrix/media/v3/config", alice), "none"),
    )
    for case, kind in expectations:
        answer = proxy.send("synapse-workers", case)
        decision = policy.decide(case.request())
        assert decision.key_kind == kind, (case, decision)
        assert answer.key == (str(decision.key) if decision.key is not None else ""), case
        if kind == "src":
            assert decision.key_source == SOURCES[3]


def test_the_key_is_xxh32_of_the_source_and_the_salt(proxy: Proxy) -> None:
    """What both engines compute, from the published algorithm (the xxhash package)."""
    policy = proxy.policies["synapse-workers"]
    case = Case("PUT", b"/_matrix/client/v3/rooms/%21a%3Ax/send/m/1")
    expected = xxhash.xxh32_intdigest(b"!a:x" + key_salt(policy.seed).encode())
    assert proxy.send("synapse-workers", case).key == str(expected)
    assert policy.decide(case.request()).key == expected


# -- hashing ----------------------------------------------------------------------------------


def _percent_encode(data: bytes) -> bytes:
    return b"".join(b"%%%02X" % byte for byte in data)


#: Published XXH32 results (seed 0): (data, hash).
KNOWN_VECTORS = (
    (b"", 0x02CC5D05),
    (b"a", 0x550D7456),
    (b"abc", 0x32D153FF),
    (b"Nobody inspects the spammish repetition", 0xE2293B2F),
)


def test_xxh32_matches_known_vectors_in_haproxy_and_in_python(proxy: Proxy) -> None:
    for data, expected in KNOWN_VECTORS:
        assert xxhash.xxh32_intdigest(data) == expected
    # HAProxy's own xxh32, on a uri key (the path and query, as sent), salt "#0".
    for target in (b"/_matrix/federation/v1/version", b"/_matrix/federation/v1/version?a=1"):
        answer = proxy.send("synapse-workers", Case("GET", target))
        assert answer.key == str(xxhash.xxh32_intdigest(target + b"#0")), target


def test_keys_agree_for_any_bytes_every_length_and_seed(proxy: Proxy) -> None:
    samples = [b"abcdefghijklmnopqrstu"[:n] for n in range(1, 22)]
    samples += [b"\xff" * n for n in range(1, 9)]
    samples += [b"\x80\x81\x82\x83\x84\x85\x86", b"\x00", b"\x00" * 5, bytes(range(1, 256))]
    samples += [b"x" * 1000, b"!room:example.org", "é€😀".encode()]
    for seed in SEEDS:
        policy = proxy.policies[f"seed{seed}"]
        for data in samples:
            # A room key is the percent-decoded segment after /join/: any bytes.
            case = Case("POST", b"/_matrix/client/v3/join/" + _percent_encode(data))
            expected = xxhash.xxh32_intdigest(data + key_salt(seed).encode())
            assert policy.decide(case.request()).key == expected, (data, seed)
            assert proxy.send(f"seed{seed}", case).key == str(expected), (data, seed)


def test_the_configurations_key_regexes_are_the_agents(proxy: Proxy) -> None:
    """haproxy.cfg's fallback lines hold, verbatim, the regexes spoa/matrix/ runs."""
    text = REFERENCE_CONFIG.read_text()
    for what, regex in NATIVE_REGEXES.items():
        assert text.count(f'"{regex}"') == 1, what


# -- maps -------------------------------------------------------------------------------------


# Class "-": no backend be_-, so default_backend takes the request.
NO_MAP = Answer("-", "", "fallback_no_map", "fallback", "-")


def test_an_empty_map_leaves_requests_to_the_default_backend(proxy: Proxy) -> None:
    alice = f"Bearer {ALICE}".encode()
    for case in (
        Case("GET", b"/_matrix/client/v3/sync?since=1", alice),
        Case("GET", b"/_matrix/client/versions"),
    ):
        assert proxy.send("empty", case) == NO_MAP, case


def test_a_map_pushed_through_the_runtime_api_is_followed_at_once_without_a_reload(
    proxy: Proxy,
) -> None:
    """prepare map, add map @version, commit map: the running map is swapped in one go."""
    alice = f"Bearer {ALICE}".encode()
    sync = Case("GET", b"/_matrix/client/v3/sync?since=1", alice)
    name = str(proxy.maps["pushed"])
    api = proxy.api()
    before = proxy.send("pushed", sync)
    assert (before.backend, before.rule) == ("synchrotron", "sync")
    simple = proxy.policies["simple"]
    asyncio.run(api.replace_map(name, map_entries(simple)))
    after = proxy.send("pushed", sync)
    assert (after.backend, after.rule, after.policy) == ("sync", "sync", simple.version)
    assert asyncio.run(api.show_map(name)) == map_entries(simple)
    # The file HAProxy started with is untouched: the next start reads what
    # the agent wrote there.
    assert proxy.maps["pushed"].read_text() == fallback_map(proxy.policies["synapse-workers"])
    asyncio.run(api.replace_map(name, map_entries(proxy.policies["synapse-workers"])))
    assert proxy.send("pushed", sync) == before


def test_an_edited_policy_reaches_the_running_fallback_once_its_map_is_pushed(
    proxy: Proxy, tmp_path: Path
) -> None:
    """A sync path moved to another class and a federation read added: the fallback follows."""
    alice = f"Bearer {ALICE}".encode()
    moved = Case("GET", MOVED[0].encode() + b"?since=1", alice)
    added = Case("GET", ADDED[0].encode() + b"?access_token=x")
    assert proxy.send("edited", moved).rule == "sync"
    assert proxy.send("edited", added).rule == "default"
    edited = load_policy(str(edited_synapse_policy(tmp_path)))
    asyncio.run(proxy.api().replace_map(str(proxy.maps["edited"]), map_entries(edited)))
    for case, (_, worker_class, rule) in ((moved, MOVED), (added, ADDED)):
        answer = proxy.send("edited", case)
        assert (answer.backend, answer.rule) == (worker_class, rule)
    # And every request of the shared set agrees with the edited policy.
    assert_parity(proxy, "edited", shared_cases(), edited)


def test_ipv4_clients_of_a_dual_stack_listener_get_the_agents_src_key(
    tmp_path: Path,
) -> None:
    """HAProxy writes them ::ffff:a.b.c.d; both sides key them as a.b.c.d."""
    port = free_port()
    policy = policy_of("synapse-workers")
    write_map(tmp_path / "workers.map", fallback_map(policy))
    config = CONFIG.format(
        workdir=tmp_path,
        frontends=FRONTEND.format(
            name="dual", port=port, block=fallback_block(tmp_path / "workers.map"), answer=ANSWER
        ).replace(f"bind 127.0.0.1:{port}", f"bind :::{port} v4v6"),
    )
    haproxy = HAProxy(tmp_path, config)
    haproxy.start(port)
    client = Client()
    try:
        case = Case("PUT", b"/_matrix/federation/v1/send/1", b"X-Matrix key=k", SOURCES[2])
        answer = client.send(port, case)
    finally:
        client.close()
        haproxy.stop()
    mapped = IPv6Address(f"::ffff:{SOURCES[2]}")
    for src in (mapped, f"::ffff:{SOURCES[2]}", SOURCES[2]):
        decision = policy.decide(case.request()._replace(src=src))
        assert (decision.key_kind, decision.key_source) == ("src", SOURCES[2])
        assert answer.key == str(decision.key)
