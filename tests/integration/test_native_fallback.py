"""The Lua fallback routes like the agent: same class, key and rule, through real HAProxy.

When the agent does not answer, ``lua/matrix_fallback.lua`` routes by the
table ``spoa fallback`` makes from the policy. For every request its class,
hash key and rule must be the ones the agent's policy would have given, so
stickiness survives an agent outage. Each test frontend runs the action on a
table generated here and answers with the variables it set; the same requests
go through :meth:`CompiledPolicy.decide` in Python.

Requests are sent as raw bytes over keep-alive sockets bound to 127.0.0.x
source addresses, so percent-escapes, odd header bytes and the client
address are exactly what the test says.
"""

from __future__ import annotations

import base64
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import mmh3
import pytest

from spoa.demo.ports import free_port
from spoa.demo.stack import haproxy_at_least
from spoa.fallback import fallback_table, write_table
from spoa.policy import DEFAULT_RULE, CompiledPolicy, Decision, Request, load_policy
from spoa.traffic import Deployment, generate
from tests.integration.harness import HAProxy, wait_until
from tests.policy_edits import ADDED, MOVED, edited_synapse_policy

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
LUA = ROOT / "lua" / "matrix_fallback.lua"
REFERENCE_CONFIG = ROOT / "haproxy" / "haproxy.cfg"

#: Every rule of a policy must be compared at least this often.
MIN_PER_RULE = 3
GENERATED = 2000
#: Client addresses the requests come from (all of 127/8 is loopback).
SOURCES = tuple(f"127.0.0.{n}" for n in range(2, 10))
POLICIES = ("synapse-workers", "simple", "synapse-workers-mas")

SEEDS = (0, 1, 42, 1234, 0x9747B28C, 2**31, 2**32 - 1)

#: Tables the fallback must refuse, each with the reason it logs.
BROKEN_TABLES = {
    "empty": "its first line is not",
    "truncated": 'no final "end" line',
    "badclass": 'bad class name "a/b"',
    "badkind": 'unknown key kind "bogus"',
    "badseed": "seed is not within 0..4294967295",
    "orphan": "a path before any rule",
    "unknown": "unknown record",
}


def table_text(policy: str, seed: int | None = None) -> str:
    text = fallback_table(load_policy(str(ROOT / "policies" / f"{policy}.yaml")))
    if seed is not None:
        text = text.replace("\nseed 0\n", f"\nseed {seed}\n", 1)
    return text


def broken_table(name: str) -> str:
    good = table_text("synapse-workers")
    lines = good.splitlines(keepends=True)
    rule = next(i for i, line in enumerate(lines) if line.startswith("rule "))
    if name == "empty":
        return ""
    if name == "truncated":
        return "".join(lines[: len(lines) // 2])
    if name == "badclass":
        return good.replace("\nrule typing typing ", "\nrule typing a/b ", 1)
    if name == "badkind":
        return good.replace("\nrule typing typing none ", "\nrule typing typing bogus ", 1)
    if name == "badseed":
        return good.replace("\nseed 0\n", "\nseed 4294967296\n", 1)
    if name == "orphan":
        return "".join([*lines[:rule], "path ^/x\n", *lines[rule:]])
    assert name == "unknown"
    return "".join([*lines[:rule], "frobnicate 1\n", *lines[rule:]])


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

#: Loaded before the fallback: registers, next to the matrix_fallback
#: converter, one that runs the same function on an input no request can
#: give (none at all). Only a test can make the converter fail inside.
FAILING_SHIM = """\
local register_converters = core.register_converters

core.register_converters = function(name, converter)
    register_converters(name, converter)
    register_converters(name .. "_failing", function(input, ...)
        return converter(nil, ...)
    end)
end
"""


def fallback_block(table: Path, converter: str = "matrix_fallback") -> str:
    """The fallback's lines of haproxy/haproxy.cfg, reading ``table``."""
    lines = REFERENCE_CONFIG.read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if "set-var(txn.fallback_src)" in line)
    key = "set-var(txn.route.key) var(txn.fallback)"
    last = next(i for i, line in enumerate(lines) if key in line)
    block = "\n".join(lines[first : last + 1])
    default = '"${SPOA_FALLBACK_TABLE-/run/matrix-spoa/fallback.table}"'
    assert block.count(default) == 1, block
    return block.replace(default, str(table)).replace("lua.matrix_fallback(", f"lua.{converter}(")


CONFIG = """\
global
    lua-load "{shim}"
    lua-load "{lua}"

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
    """The variables the Lua action set ("" when not set)."""

    backend: str
    key: str
    rule: str
    via: str
    policy: str

    @property
    def family(self) -> str:
        return self.rule.removeprefix("fallback_")


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
    tables: dict[str, Path]
    client: Client

    def send(self, frontend: str, case: Case) -> Answer:
        return self.client.send(self.ports[frontend], case)


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    workdir = tmp_path_factory.mktemp("lua-fallback")
    texts = {name: table_text(name) for name in POLICIES}
    texts |= {f"seed{seed}": table_text("synapse-workers", seed) for seed in SEEDS}
    texts |= {name: broken_table(name) for name in BROKEN_TABLES}
    texts["failing"] = texts["synapse-workers"]
    texts["swap"] = texts["synapse-workers"]
    texts["edited"] = texts["synapse-workers"]
    texts["vanishing"] = texts["synapse-workers"]
    tables = {name: workdir / f"{name}.table" for name in texts}
    for name, text in texts.items():
        tables[name].write_text(text)
    tables["missing"] = workdir / "missing.table"
    ports = {name: free_port() for name in tables}
    shim = workdir / "failing_shim.lua"
    shim.write_text(FAILING_SHIM)
    config = CONFIG.format(
        shim=shim,
        lua=LUA,
        frontends="\n".join(
            FRONTEND.format(
                name=name,
                port=ports[name],
                block=fallback_block(
                    tables[name],
                    "matrix_fallback_failing" if name == "failing" else "matrix_fallback",
                ),
                answer=ANSWER,
            )
            for name in tables
        ),
    )
    haproxy = HAProxy(workdir, config)
    haproxy.start(ports["synapse-workers"])
    client = Client()
    try:
        yield Proxy(haproxy, ports, tables, client)
    finally:
        client.close()
        haproxy.stop()
    # No error but the ones the failing frontend causes on purpose.
    errors = [line for line in haproxy.log().splitlines() if "error" in line.lower()]
    assert all("matrix_fallback: internal error" in line for line in errors), errors


# -- the shared request set -----------------------------------------------------------------


def generated_cases() -> list[Case]:
    """Realistic traffic, each generated client address mapped to a local one."""
    cases = []
    for request in generate(GENERATED, Deployment(seed=11)):
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


def sample_path(pattern: str) -> bytes:
    """A path one Lua pattern of a table matches: "x" wherever it allows anything."""
    out, i = [], 1 if pattern.startswith("^") else 0
    while i < len(pattern):
        char = pattern[i]
        if char == "$" and i == len(pattern) - 1:
            break
        if char == "%":
            item, i = pattern[i + 1], i + 2
        elif char == "[":
            end = pattern.index("]", i + 2)
            members = pattern[i + 1 : end]
            item = "x" if members.startswith("^") else members.lstrip("%")[0]
            i = end + 1
        else:
            item, i = ("x" if char == "." else char), i + 1
        quantifier = pattern[i : i + 1]
        if quantifier in ("*", "?"):
            i += 1
            continue
        if quantifier == "+":
            i += 1
        out.append(item)
    path = "".join(out)
    return (path if path.startswith("/") else "/_matrix/" + path).encode()


def rule_cases() -> list[Case]:
    """Every path pattern of every policy's table, with each rule's methods and query."""
    alice = f"Bearer {ALICE}".encode()
    cases = []
    for name in POLICIES:
        policy = load_policy(str(ROOT / "policies" / f"{name}.yaml"))
        for line in fallback_table(policy).splitlines():
            if not line.startswith("path "):
                continue
            path = sample_path(line.removeprefix("path "))
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


_CASES: list[Case] = []


def rejects_nul_in_headers() -> bool:
    """HAProxy 3.x answers 400 to a NUL byte in a header, before any filter (2.6 lets it by)."""
    return haproxy_at_least(3, 0)


def shared_cases() -> list[Case]:
    """The request set both parity tests use (built once).

    Requests with a NUL byte in a header never reach the fallback on 3.x:
    test_a_nul_byte_in_a_header_is_refused_before_routing_on_3x covers them.
    """
    if not _CASES:
        cases = generated_cases() + edge_cases()
        if rejects_nul_in_headers():
            cases = [c for c in cases if b"\x00" not in (c.auth or b"")]
        _CASES.extend(cases)
    return _CASES


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
    """Lua and Python give every request the same class, key and rule.

    Returns how many requests each rule decided.
    """
    if policy is None:
        policy = load_policy(str(ROOT / "policies" / f"{name}.yaml"))
    counts: Counter[str] = Counter()
    mismatches: list[tuple[Case, Answer, Decision]] = []
    for case in cases:
        answer = proxy.send(name, case)
        decision = policy.decide(case.request())
        assert (answer.via, answer.policy) == ("fallback", policy.version), (case, answer)
        counts[decision.rule] += 1
        got = (answer.backend, answer.key or None, answer.rule)
        if got != (decision.worker_class, decision.key, decision.rule):
            mismatches.append((case, answer, decision))
    assert not mismatches, f"{len(mismatches)} of {len(cases)} differ:\n" + "\n".join(
        f"{case}: lua {answer.backend} {answer.key or '-'} {answer.rule}, "
        f"python {decision.worker_class} {decision.key or '-'} {decision.rule} "
        f"({decision.key_kind})"
        for case, answer, decision in mismatches[:20]
    )
    names = (*(r.name for r in policy.rules), DEFAULT_RULE)
    rare = {rule: counts[rule] for rule in names if counts[rule] < MIN_PER_RULE}
    assert not rare, f"rules compared fewer than {MIN_PER_RULE} times: {rare}"
    return counts


@pytest.mark.parametrize("name", POLICIES)
def test_fallback_gives_the_agents_class_key_and_rule(proxy: Proxy, name: str) -> None:
    counts = assert_parity(proxy, name, shared_cases())
    print(f"compared per rule ({name}):", dict(sorted(counts.items())))


def test_every_key_kind_falls_back_like_the_agent(proxy: Proxy) -> None:
    """Keys that were found, and each documented fallback, in both implementations."""
    policy = load_policy(str(ROOT / "policies" / "synapse-workers.yaml"))
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
        assert answer.key == (decision.key or ""), (case, answer, decision)
        if kind == "src":
            assert decision.key_source == SOURCES[3]


def test_more_users_rooms_and_headers_than_the_memos_hold_keep_their_keys(proxy: Proxy) -> None:
    """The memos (8,192 entries each) empty when full; the answers stay the agent's."""
    policy = load_policy(str(ROOT / "policies" / "synapse-workers.yaml"))
    cases = []
    for n in range(9_000):
        token = f"syt_{_b64(f'user{n}'.encode())}_AbCdEfGhIjKlMnOpQrSt_0a1B2c"
        cases.append(
            Case("GET", b"/_matrix/client/v3/sync?since=%d" % n, f"Bearer {token}".encode())
        )
        if n % 4 == 0:
            room = b"/_matrix/client/v3/rooms/%%21r%d%%3Ax/send/m.room.message/t%d" % (n, n)
            cases.append(Case("PUT", room, f"Bearer {token}".encode()))
    # The first ones again, once every memo has been emptied at least once.
    cases += cases[:500]
    wrong = []
    for case in cases:
        answer = proxy.send("synapse-workers", case)
        decision = policy.decide(case.request())
        if (answer.backend, answer.key, answer.rule) != (
            decision.worker_class,
            decision.key,
            decision.rule,
        ):
            wrong.append((case, answer, decision))
    assert not wrong, f"{len(wrong)} of {len(cases)} differ, first: {wrong[0]}"


# -- hashing ----------------------------------------------------------------------------------


def _percent_encode(data: bytes) -> bytes:
    return b"".join(b"%%%02X" % byte for byte in data)


#: Published MurmurHash3_x86_32 results: (data, seed, hash).
KNOWN_VECTORS = (
    (b"\x00\x00\x00\x00", 0, 0x2362F9DE),
    (b"abc", 0, 0xB3DD93FA),
    (b"a", 0x9747B28C, 0x7FA09EA6),
    (b"ab", 0x9747B28C, 0x74875592),
    (b"aaa", 0x9747B28C, 0x283E0130),
    (b"aaaa", 0x9747B28C, 0x5A97808A),
    (b"abcd", 0x9747B28C, 0xF0478627),
    (b"Hello, world!", 1234, 0xFAF6CDB3),
    (b"The quick brown fox jumps over the lazy dog", 0x9747B28C, 0x2FA826CD),
)


def test_murmur3_matches_known_vectors_through_haproxy(proxy: Proxy) -> None:
    for data, seed, expected in KNOWN_VECTORS:
        assert mmh3.hash(data, seed, signed=False) == expected
        # A room key is the percent-decoded segment after /join/: any bytes.
        case = Case("POST", b"/_matrix/client/v3/join/" + _percent_encode(data))
        answer = proxy.send(f"seed{seed}", case)
        assert answer.key == f"{expected:08x}", (data, seed, answer)


def test_murmur3_matches_mmh3_for_every_tail_length_and_seed(proxy: Proxy) -> None:
    samples = [b"abcdefghijklmnopqrstu"[:n] for n in range(1, 22)]
    samples += [b"\xff" * n for n in range(1, 9)]  # tail bytes with the high bit set
    samples += [b"\x80\x81\x82\x83\x84\x85\x86", b"\x00", b"\x00" * 5, bytes(range(256))]
    samples += [b"x" * 1000, b"!room:example.org", "é€😀".encode()]
    for seed in SEEDS:
        for data in samples:
            case = Case("POST", b"/_matrix/client/v3/join/" + _percent_encode(data))
            expected = int(mmh3.hash(data, seed, signed=False))
            answer = proxy.send(f"seed{seed}", case)
            assert answer.key == f"{expected:08x}", (data, seed, answer)
        # uri keys: the raw path and query, lengths around block boundaries.
        for extra in range(8):
            target = b"/_matrix/federation/v1/event/" + b"e" * extra + b"?q=" + b"%41" * extra
            answer = proxy.send(f"seed{seed}", Case("GET", target))
            expected = int(mmh3.hash(target, seed, signed=False))
            assert answer.key == f"{expected:08x}", (target, seed, answer)


# -- tables ---------------------------------------------------------------------------------


def _logged(proxy: Proxy, text: str) -> int:
    return proxy.haproxy.log().count(text)


# Class "-": no backend be_-, so default_backend takes the request.
NO_TABLE = Answer("-", "", "fallback_no_table", "fallback", "-")


@pytest.mark.parametrize("name", [*BROKEN_TABLES, "missing"])
def test_a_broken_or_missing_table_leaves_requests_to_the_default_backend(
    proxy: Proxy, name: str
) -> None:
    alice = f"Bearer {ALICE}".encode()
    for _ in range(3):
        for case in (
            Case("GET", b"/_matrix/client/v3/sync?since=1", alice),
            Case("GET", b"/_matrix/client/versions"),
        ):
            assert proxy.send(name, case) == NO_TABLE, case
    reason = BROKEN_TABLES.get(name, "No such file or directory")
    wait_until(lambda: _logged(proxy, reason) > 0, 5, f"{reason!r} in the log")
    # Logged once, not once per request (nor once per re-read).
    time.sleep(2.5)
    lines = [line for line in proxy.haproxy.log().splitlines() if str(proxy.tables[name]) in line]
    assert len(lines) == 1, lines


def test_a_new_table_is_followed_without_a_reload_and_a_broken_one_is_not(
    proxy: Proxy,
) -> None:
    """The agent rewrites the table for each policy: the fallback follows within seconds."""
    alice = f"Bearer {ALICE}".encode()
    sync = Case("GET", b"/_matrix/client/v3/sync?since=1", alice)
    path = proxy.tables["swap"]
    before = proxy.send("swap", sync)
    assert (before.backend, before.rule) == ("synchrotron", "sync")
    # Atomically replaced, as the agent writes it: the simple policy's table.
    write_table(path, table_text("simple"))
    simple = load_policy(str(ROOT / "policies" / "simple.yaml"))
    wait_until(lambda: proxy.send("swap", sync).policy == simple.version, 6, "the new table")
    after = proxy.send("swap", sync)
    assert (after.backend, after.rule) == ("sync", "sync")
    # A broken file (truncated) is refused; the last good table stays.
    path.write_text(broken_table("truncated"))
    wait_until(lambda: _logged(proxy, "the last good one stays in use") > 0, 6, "the refusal")
    assert proxy.send("swap", sync) == after
    # Back to the first table.
    write_table(path, table_text("synapse-workers"))
    wait_until(lambda: proxy.send("swap", sync) == before, 6, "the first table again")


def test_a_table_that_vanishes_again_after_coming_back_unchanged_is_logged_again(
    proxy: Proxy,
) -> None:
    """Each disappearance is worth a warning; the table read before stays in use throughout."""
    sync = Case("GET", b"/_matrix/client/v3/sync?since=1", f"Bearer {ALICE}".encode())
    path = proxy.tables["vanishing"]
    text = path.read_text()
    routed = proxy.send("vanishing", sync)
    assert routed.rule == "sync"
    gone = f"cannot read the table: {path}"
    back = f"table {path} readable again, unchanged"

    def logged(line: str, count: int) -> Callable[[], bool]:
        return lambda: _logged(proxy, line) == count

    for times in (1, 2):
        path.unlink()
        wait_until(logged(gone, times), 6, f"disappearance {times} logged")
        assert proxy.send("vanishing", sync) == routed
        write_table(path, text)
        wait_until(logged(back, times), 6, f"return {times} logged")
        assert proxy.send("vanishing", sync) == routed


def test_an_edited_policy_reaches_the_fallback_once_its_table_is_regenerated(
    proxy: Proxy, tmp_path: Path
) -> None:
    """A sync path moved to another class and a federation read added: the fallback follows."""
    alice = f"Bearer {ALICE}".encode()
    moved = Case("GET", MOVED[0].encode() + b"?since=1", alice)
    added = Case("GET", ADDED[0].encode() + b"?access_token=x")
    assert proxy.send("edited", moved).rule == "sync"
    assert proxy.send("edited", added).rule == "default"
    edited = load_policy(str(edited_synapse_policy(tmp_path)))
    write_table(proxy.tables["edited"], fallback_table(edited))
    wait_until(lambda: proxy.send("edited", moved).policy == edited.version, 6, "the new table")
    for case, (_, worker_class, rule) in ((moved, MOVED), (added, ADDED)):
        answer = proxy.send("edited", case)
        decision = edited.decide(case.request())
        assert (answer.backend, answer.rule) == (worker_class, rule)
        assert (answer.backend, answer.key or None, answer.rule) == (
            decision.worker_class,
            decision.key,
            decision.rule,
        )
    # And every request of the shared set agrees with the edited policy.
    assert_parity(proxy, "edited", shared_cases(), edited)


# -- internal errors ---------------------------------------------------------------------------


def test_an_internal_error_leaves_the_request_to_the_default_backend(proxy: Proxy) -> None:
    alice = f"Bearer {ALICE}".encode()
    for case in (
        Case("GET", b"/_matrix/client/v3/sync?since=1", alice),
        Case("PUT", b"/_matrix/client/v3/rooms/%21a%3Ax/send/m/1", alice),
        Case("GET", b"/_matrix/client/versions"),
    ):
        answer = proxy.send("failing", case)
        assert answer == Answer("-", "", "fallback_error", "fallback", "-"), case
    wait_until(
        lambda: "matrix_fallback: internal error" in proxy.haproxy.log(), 5, "the error logged"
    )


def test_ipv4_clients_of_a_dual_stack_listener_get_the_agents_src_key(
    tmp_path: Path,
) -> None:
    """HAProxy writes them ::ffff:a.b.c.d; both sides key them as a.b.c.d."""
    port = free_port()
    config = CONFIG.format(
        shim=tmp_path / "none.lua",
        lua=LUA,
        frontends=FRONTEND.format(
            name="dual",
            port=port,
            block=fallback_block(tmp_path / "workers.table"),
            answer=ANSWER,
        ).replace(f"bind 127.0.0.1:{port}", f"bind :::{port} v4v6"),
    )
    (tmp_path / "none.lua").write_text("-- nothing\n")
    (tmp_path / "workers.table").write_text(table_text("synapse-workers"))
    haproxy = HAProxy(tmp_path, config)
    haproxy.start(port)
    client = Client()
    try:
        case = Case("PUT", b"/_matrix/federation/v1/send/1", b"X-Matrix key=k", SOURCES[2])
        answer = client.send(port, case)
    finally:
        client.close()
        haproxy.stop()
    policy = load_policy(str(ROOT / "policies" / "synapse-workers.yaml"))
    mapped = IPv6Address(f"::ffff:{SOURCES[2]}")
    for src in (mapped, f"::ffff:{SOURCES[2]}", SOURCES[2]):
        decision = policy.decide(case.request()._replace(src=src))
        assert (decision.key_kind, decision.key_source) == ("src", SOURCES[2])
        assert answer.key == decision.key
