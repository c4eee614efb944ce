"""A tiny authoritative DNS server for the demo: SRV and A records over UDP.

It lets the shipped HAProxy configuration discover demo workers exactly as it
discovers Kubernetes pods behind a headless service: ``server-template`` with
``resolvers`` asking for ``_http._tcp.<class>.<zone>`` SRV records, whose
targets resolve to addresses (sent along as additional records). Only what
HAProxy asks is answered; everything else gets NXDOMAIN. A name may also hold
several A records, as a compose service with replicas does.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Iterable
from typing import Final

_HEADER: Final = struct.Struct(">HHHHHH")
_TYPE_A: Final = 1
_TYPE_SRV: Final = 33
_CLASS_IN: Final = 1
_TTL: Final = 5


def _encode_name(name: str) -> bytes:
    return (
        b"".join(
            bytes((len(label),)) + label.encode("ascii") for label in name.strip(".").split(".")
        )
        + b"\x00"
    )


def _read_name(data: bytes, pos: int) -> tuple[str, int]:
    labels: list[str] = []
    while True:
        length = data[pos]
        pos += 1
        if length == 0:
            return ".".join(labels).lower(), pos
        if length & 0xC0:
            raise ValueError("compressed names are not expected in questions")
        labels.append(data[pos : pos + length].decode("ascii"))
        pos += length


class Zone:
    """SRV names -> (target, port) lists; names -> IPv4 addresses.

    Records are answered in the order they were set: a test gives each
    router's DNS its own order.
    """

    def __init__(self) -> None:
        self.srv: dict[str, list[tuple[str, int]]] = {}
        self.a: dict[str, list[str]] = {}

    def set_service(self, name: str, endpoints: Iterable[tuple[str, str, int]]) -> None:
        """Publish ``name`` as SRV records of ``(target, address, port)``."""
        records = []
        for target, address, port in endpoints:
            records.append((target.lower(), port))
            self.a[target.lower()] = [address]
        self.srv[name.lower()] = records

    def set_addresses(self, name: str, addresses: Iterable[str]) -> None:
        """Publish ``name`` as A records, one per address (none: no records, not NXDOMAIN)."""
        self.a[name.lower()] = list(addresses)

    def answer(self, query: bytes) -> bytes | None:
        """The response to one query packet, or None for garbage."""
        try:
            ident, _flags, qdcount, _an, _ns, _ar = _HEADER.unpack_from(query, 0)
            if qdcount != 1:
                return None
            name, pos = _read_name(query, _HEADER.size)
            qtype, _qclass = struct.unpack_from(">HH", query, pos)
        except (struct.error, ValueError, IndexError, UnicodeDecodeError):
            return None
        question = query[_HEADER.size : pos + 4]
        answers: list[bytes] = []
        extra: list[bytes] = []
        if qtype == _TYPE_SRV and name in self.srv:
            for target, port in self.srv[name]:
                rdata = struct.pack(">HHH", 0, 10, port) + _encode_name(target)
                answers.append(self._record(name, _TYPE_SRV, rdata))
                for address in self.a.get(target, []):
                    extra.append(self._record(target, _TYPE_A, socket.inet_aton(address)))
        elif qtype == _TYPE_A and name in self.a:
            for address in self.a[name]:
                answers.append(self._record(name, _TYPE_A, socket.inet_aton(address)))
        known = name in self.srv or name in self.a
        rcode = 0 if known else 3  # NXDOMAIN for names we do not serve
        flags = 0x8400 | rcode  # response, authoritative
        header = _HEADER.pack(ident, flags, 1, len(answers), 0, len(extra))
        return header + question + b"".join(answers) + b"".join(extra)

    @staticmethod
    def _record(name: str, rtype: int, rdata: bytes) -> bytes:
        return _encode_name(name) + struct.pack(">HHIH", rtype, _CLASS_IN, _TTL, len(rdata)) + rdata


class _DnsProtocol(asyncio.DatagramProtocol):
    def __init__(self, zone: Zone) -> None:
        self.zone = zone
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        response = self.zone.answer(data)
        if response is not None and self.transport is not None:
            self.transport.sendto(response, addr)


async def serve_dns(
    zone: Zone, host: str = "127.0.0.1", port: int = 0
) -> tuple[asyncio.DatagramTransport, int]:
    """Serve ``zone`` on UDP; return the transport and the bound port."""
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: _DnsProtocol(zone), local_addr=(host, port)
    )
    bound: int = transport.get_extra_info("sockname")[1]
    return transport, bound
