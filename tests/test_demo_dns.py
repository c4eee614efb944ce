"""The demo's DNS zone answers SRV and A records as HAProxy's resolvers ask for them."""

from __future__ import annotations

import socket
import struct

from spoa.demo.dns import Zone


def query(name: str, qtype: int) -> bytes:
    labels = b"".join(bytes((len(p),)) + p.encode() for p in name.split("."))
    return (
        struct.pack(">HHHHHH", 7, 0x0100, 1, 0, 0, 0)
        + labels
        + b"\x00"
        + struct.pack(">HH", qtype, 1)
    )


def _name(data: bytes, pos: int) -> tuple[str, int]:
    labels = []
    while data[pos]:
        labels.append(data[pos + 1 : pos + 1 + data[pos]].decode())
        pos += 1 + data[pos]
    return ".".join(labels), pos + 1


def records(response: bytes) -> tuple[int, list[tuple[str, int, str]]]:
    """The response code and every record (answers, then additional): name, type, data."""
    _, flags, qdcount, ancount, nscount, arcount = struct.unpack_from(">HHHHHH", response)
    assert qdcount == 1 and nscount == 0
    _, pos = _name(response, 12)
    pos += 4
    found = []
    for _ in range(ancount + arcount):
        name, pos = _name(response, pos)
        rtype, _, _, length = struct.unpack_from(">HHIH", response, pos)
        pos += 10
        rdata = response[pos : pos + length]
        pos += length
        if rtype == 1:
            found.append((name, rtype, socket.inet_ntoa(rdata)))
        else:
            port = struct.unpack_from(">H", rdata, 4)[0]
            found.append((name, rtype, f"{_name(rdata, 6)[0]}:{port}"))
    return flags & 0xF, found


def test_srv_records_come_in_the_order_they_were_published_with_their_addresses() -> None:
    zone = Zone()
    pods = [("b.x.test", "127.0.1.2", 8008), ("a.x.test", "127.0.1.1", 8008)]
    zone.set_service("_http._tcp.x.test", pods)
    rcode, found = records(zone.answer(query("_http._tcp.x.test", 33)) or b"")
    assert rcode == 0
    assert found == [
        ("_http._tcp.x.test", 33, "b.x.test:8008"),
        ("_http._tcp.x.test", 33, "a.x.test:8008"),
        ("b.x.test", 1, "127.0.1.2"),
        ("a.x.test", 1, "127.0.1.1"),
    ]
    zone.set_service("_http._tcp.x.test", list(reversed(pods)))
    _, again = records(zone.answer(query("_http._tcp.x.test", 33)) or b"")
    assert [r[2] for r in again[:2]] == ["a.x.test:8008", "b.x.test:8008"]


def test_a_name_may_hold_several_a_records_or_none() -> None:
    zone = Zone()
    zone.set_addresses("synchrotron.x.test", ["127.0.1.7", "127.0.1.3"])
    rcode, found = records(zone.answer(query("synchrotron.x.test", 1)) or b"")
    assert (rcode, [r[2] for r in found]) == (0, ["127.0.1.7", "127.0.1.3"])
    zone.set_addresses("synchrotron.x.test", [])
    assert records(zone.answer(query("synchrotron.x.test", 1)) or b"") == (0, [])


def test_names_the_zone_does_not_hold_are_nxdomain_and_garbage_gets_no_answer() -> None:
    zone = Zone()
    assert records(zone.answer(query("nothing.x.test", 1)) or b"") == (3, [])
    assert zone.answer(b"\x00\x01") is None
