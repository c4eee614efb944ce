"""HAProxy's converters in Python: what the C code of url_dec, ub64dec and the casts does."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spoa.matrix.converters import (
    Regsub,
    bin_to_str,
    to_bytes,
    to_text,
    ub64dec,
    url_dec,
    xxh32,
)


@pytest.mark.parametrize(
    ("text", "decoded"),
    [
        ("plain", "plain"),
        ("%21abc%3Aexample.org", "!abc:example.org"),
        ("%2521", "%21"),  # once
        ("a+b", "a+b"),  # "+" stays outside a query string
        ("a?b+c", "a?b c"),  # and is a space after a "?"
        ("a%3Fb+c", "a?b+c"),  # a decoded "?" is not one
        ("%E2%82%AC", "€"),
        ("%FF", "\udcff"),  # not UTF-8: a surrogate escape
        ("%00x", "\x00x"),  # NUL decoded inside
        ("%zz", None),
        ("%2", None),
        ("ab%", None),
        ("a\x00%zz", "a"),  # the C string ends at a NUL: the bad escape is never read
    ],
)
def test_url_dec_decodes_once_and_fails_on_a_bad_escape(text: str, decoded: str | None) -> None:
    assert url_dec(text) == decoded


@given(st.binary(max_size=64))
def test_ub64dec_decodes_what_base64url_encodes_without_padding(raw: bytes) -> None:
    text = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    assert ub64dec(text) == raw


@pytest.mark.parametrize(
    ("text", "raw"),
    [
        ("", b""),
        ("YQ", b"a"),
        ("YR", b"a"),  # trailing bits dropped
        ("YQ=", b"a\x0f"),  # "=" is 63, as "_", in HAProxy's table
        ("Y", None),  # 4n+1
        ("YWxpY", None),
        ("YW+p", None),  # the standard alphabet's "+" and "/" are not base64url
        ("YW/p", None),
        ("YQ!", None),
        ("é", None),
    ],
)
def test_ub64dec_follows_haproxys_table(text: str, raw: bytes | None) -> None:
    assert ub64dec(text) == raw


def test_the_binary_to_string_cast_stops_at_a_nul() -> None:
    assert bin_to_str(b"ab\x00cd") == b"ab"
    assert bin_to_str(b"abc") == b"abc"
    assert bin_to_str(b"\x00") == b""


@given(st.binary(max_size=64))
def test_text_and_bytes_round_trip_as_haproxy_sends_them(raw: bytes) -> None:
    assert to_bytes(to_text(raw)) == raw


#: Published XXH32 results, seed 0.
@pytest.mark.parametrize(
    ("data", "digest"),
    [(b"", 0x02CC5D05), (b"a", 0x550D7456), (b"abc", 0x32D153FF)],
)
def test_xxh32_gives_the_published_digests(data: bytes, digest: int) -> None:
    assert xxh32(data) == digest


def test_regsub_replaces_the_first_match_or_every_one() -> None:
    first, every = Regsub(r"\x5c(.)", r"\1"), Regsub(r"\x5c(.)", r"\1", every=True)
    assert first(r"a\bc\d") == r"abc\d"
    assert every(r"a\bc\d") == "abcd"
    assert first("none") == "none"


def test_regsub_of_a_whole_string_regex_gives_its_groups_or_the_input() -> None:
    # Anchored at both ends: the one match is the whole input (the fast path).
    both = Regsub(r"^(?:a(b)?(c)|.*)\Z", r"\1\2")
    assert both("abc") == "bc"
    assert both("ac") == "c"
    assert both("zzz") == ""
    assert Regsub(r"^x(y)\Z", r"\1")("nope") == "nope"
