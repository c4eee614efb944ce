"""Matrix key extraction with ordinary and hostile inputs: never an exception."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address
from typing import NamedTuple

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spoa.matrix import access_token, query_value, room_from_path, syt_localpart, xmatrix_origin
from spoa.matrix.keys import KEY_EXTRACTORS
from spoa.matrix.query import has_value
from spoa.policy.schema import KeyKind

# -- tokens -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("auth", "query", "token"),
    [
        ("Bearer syt_YWxpY2U_abc_def", None, "syt_YWxpY2U_abc_def"),
        ("bearer   tok", None, "tok"),
        ("BEARER \t tok", None, "tok"),
        (None, "access_token=tok", "tok"),
        (None, "a=1&access_token=t%2Bo%3Dk&b=2", "t+o=k"),
        ("Bearer head", "access_token=query", "head"),
        ("Bearer ", "access_token=query", "query"),
        ("Basic dXNlcjpwYXNz", "access_token=query", "query"),
        ('X-Matrix origin="a"', None, None),
        (None, "access_token=", None),
        (None, "access_token", None),
        (None, "my_access_token=x", None),
        (None, "access_token&access_token=late", None),  # the first one counts
        (None, "access%5Ftoken=x", None),  # names as sent, undecoded
        (None, "access_token=bad%zz", "bad%zz"),  # a bad escape: raw
        (None, "access_token=a?b+c", "a?b c"),  # url_dec: "+" after "?" is a space
        ("", "", None),
        (None, None, None),
        ("Bearer", None, None),
    ],
)
def test_access_token_prefers_the_header_then_the_query(
    auth: str | None, query: str | None, token: str | None
) -> None:
    assert access_token(auth, query) == token


def test_query_token_is_decoded_exactly_once() -> None:
    assert access_token(None, "access_token=a%2525b") == "a%25b"


@pytest.mark.parametrize(
    ("token", "localpart"),
    [
        ("syt_YWxpY2U_GkqDPRyLvbBAfVZfOXAH_2dCzpZ", "alice"),
        ("syt_Ym9i_x_y", "bob"),
        ("syt_ZnJhbmsuYm9vbQ_x_y", "frank.boom"),  # unpadded base64
        ("syt_w6lsb8OvZQ_x_y", "\u00e9lo\u00efe"),
        ("syt__x_y", ""),  # empty field: empty localpart (HAProxy's ub64dec)
        ("syt_!!!_x_y", None),  # not base64url
        ("syt_YWxpY2U", "alice"),  # the field is there, with no underscore after it
        ("syt_/w_x_y", None),  # "/" is not base64url
        ("syt_-w_x_y", "\udcfb"),  # "-" is: a byte that is not UTF-8, escaped
        ("syt_YQ=_x_y", "a\x0f"),  # "=" is 63 to HAProxy's table, as "_"
        ("syt_AGE_x_y", ""),  # cut at a NUL byte, as HAProxy's BIN to STR cast
        ("syt_Y_x_y", None),  # impossible base64 length
        ("mat_abcdefghijklmnopqrstuvwxyz0123_abcdef", None),
        ("MDAxY2xvY2F0aW9uIGV4YW1wbGUub3Jn", None),  # a macaroon
        ("", None),
    ],
)
def test_syt_tokens_name_their_user_and_others_do_not(token: str, localpart: str | None) -> None:
    assert syt_localpart(token) == localpart


def test_syt_localpart_is_stable_across_calls() -> None:
    token = "syt_YWxpY2U_zzz_yyy"
    assert syt_localpart(token) == syt_localpart(token) == "alice"


# -- rooms ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "room"),
    [
        ("/_matrix/client/v3/rooms/!abc:example.org/send/m.room.message/1", "!abc:example.org"),
        ("/_matrix/client/v3/rooms/%21abc%3Aexample.org/send/m.room.message/1", "!abc:example.org"),
        ("/_matrix/client/v3/rooms/%21abc%3aexample.org/messages", "!abc:example.org"),
        ("/_matrix/client/v3/rooms/%23alias%3Aexample.org/state", "#alias:example.org"),
        ("/_matrix/client/v3/join/%23room%3Aexample.org", "#room:example.org"),
        ("/_matrix/client/v3/join/!abc:example.org", "!abc:example.org"),
        ("/_matrix/client/v3/knock/!abc:example.org", "!abc:example.org"),
        ("/_matrix/client/r0/rooms/!abc:[2001:db8::1]:8448/join", "!abc:[2001:db8::1]:8448"),
        (
            "/_matrix/client/v3/rooms/!Q7Lk_vhZXl5p-WwXsS2ZKGaT3T-5lR2c3l6k5XbFl-4/send/x/1",
            "!Q7Lk_vhZXl5p-WwXsS2ZKGaT3T-5lR2c3l6k5XbFl-4",
        ),
        ("/_matrix/client/v3/rooms/%2521double/send", "%21double"),  # decoded once only
        ("/_matrix/client/v3/rooms/%zz%2/send", "%zz%2"),  # a bad escape: raw
        ("/_matrix/client/v3/rooms/%21a%zz/send", "%21a%zz"),  # one is enough
        ("/_matrix/client/v3/rooms/%FF%FE/send", "\udcff\udcfe"),  # not UTF-8: kept apart
        ("/_matrix/client/v3/rooms//send", None),
        ("/_matrix/client/v3/rooms/", None),
        ("/_matrix/client/v3/sync", None),
        ("", None),
    ],
)
def test_room_is_the_segment_after_rooms_join_or_knock_decoded_once(
    path: str, room: str | None
) -> None:
    assert room_from_path(path) == room


def test_raw_and_encoded_room_ids_give_the_same_key() -> None:
    raw = room_from_path("/_matrix/client/v3/rooms/!x:y/send/m/1")
    encoded = room_from_path("/_matrix/client/v3/rooms/%21x%3Ay/send/m/1")
    assert raw == encoded == "!x:y"


def test_different_undecodable_rooms_stay_different() -> None:
    assert room_from_path("/rooms/%FF/x") != room_from_path("/rooms/%FE/x")


# -- X-Matrix ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("auth", "origin"),
    [
        (
            'X-Matrix origin="origin.example",destination="d.example",key="ed25519:1",sig="abc"',
            "origin.example",
        ),
        ('X-Matrix key="ed25519:1",sig="abc",origin="origin.example"', "origin.example"),
        ("X-Matrix origin=origin.example,key=ed25519:1,sig=abc", "origin.example"),
        ("X-Matrix origin=example.org:8448,key=k,sig=s", "example.org:8448"),
        ('X-Matrix origin="[2001:db8::1]:8448",key="k",sig="s"', "[2001:db8::1]:8448"),
        ("X-Matrix origin=[::1]:8448,key=k", "[::1]:8448"),
        ('X-Matrix origin="1.2.3.4",key="k"', "1.2.3.4"),
        ('x-matrix ORIGIN="upper.example" , Key="k"', "upper.example"),
        ('X-Matrix   key="k" ,\torigin="spaced.example"\t,sig="s"', "spaced.example"),
        ('X-Matrix origin="esc\\"aped\\\\.example",key="k"', 'esc"aped\\.example'),
        ("X-Matrix origin=bare\\x.example", "barex.example"),  # escapes undone in bare values too
        ('X-Matrix sig="a,origin=evil.example",origin="real.example"', "real.example"),
        ('X-Matrix origin="cut.example",key="ed', "cut.example"),  # truncated after origin
        ('X-Matrix key="ed', None),  # truncated before origin
        ('X-Matrix key="k",sig="s"', None),  # no origin
        ('X-Matrix origin="",key="k"', None),
        ("X-Matrix", None),
        ("X-Matrixorigin=a", None),
        ('Bearer origin="a"', None),
        ('X-Matrix origin="unterminated', None),
        ("X-Matrix ,,,", None),
        ("", None),
        (None, None),
    ],
)
def test_xmatrix_origin_is_parsed_per_the_spec(auth: str | None, origin: str | None) -> None:
    assert xmatrix_origin(auth) == origin


# -- queries ----------------------------------------------------------------------------


def test_query_parameters_are_found_by_name() -> None:
    assert query_value("a=1&since=s9&b", "since") == "s9"
    assert query_value("since", "since") == ""
    assert query_value("a%73ince=x", "asince") is None  # names as sent
    assert query_value("since&since=s1", "since") == ""  # the first one counts
    assert query_value("xsince=1", "since") is None
    assert query_value(None, "since") is None
    assert has_value("since=s1", "since")
    assert not has_value("since=", "since")
    assert not has_value("since", "since")
    assert not has_value("timeout=0", "since")


# -- nothing raises ---------------------------------------------------------------------

hostile = st.one_of(
    st.text(max_size=300),
    st.binary(max_size=300).map(lambda b: b.decode("utf-8", "surrogateescape")),
    st.just("/" + "a" * 8192),
    st.just("X-Matrix " + "origin=" * 2000),
    st.just("Bearer " + "\x00" * 100),
)


@given(hostile, hostile)
def test_extractors_never_raise(a: str, b: str) -> None:
    access_token(a, b)
    access_token(None, a)
    room_from_path(a)
    xmatrix_origin(a)
    xmatrix_origin("X-Matrix " + a)
    syt_localpart("syt_" + a)
    query_value(a, "since")


# -- key extractors -----------------------------------------------------------------------


class _Parts(NamedTuple):
    path: str = "/"
    query: str | None = None
    auth: str | None = None
    src: str | IPv4Address | IPv6Address | None = None


@pytest.mark.parametrize(
    ("kind", "request_parts", "key"),
    [
        ("token", _Parts(auth="Bearer syt_YWxpY2U_a_b"), ("token", "syt_YWxpY2U_a_b")),
        ("token", _Parts(), None),
        ("user", _Parts(auth="Bearer syt_YWxpY2U_a_b"), ("user", "alice")),
        ("user", _Parts(auth="Bearer mat_opaque"), ("token", "mat_opaque")),
        ("user", _Parts(query="access_token=syt_Ym9i_x_y"), ("user", "bob")),
        ("user", _Parts(), None),
        ("room", _Parts(path="/_matrix/client/v3/rooms/%21r%3Ahs/send"), ("room", "!r:hs")),
        ("room", _Parts(path="/_matrix/client/v3/sync"), None),
        (
            "origin",
            _Parts(auth='X-Matrix origin="remote.example",key="k",sig="s"'),
            ("origin", "remote.example"),
        ),
        (
            "origin",
            _Parts(auth="X-Matrix origin=remote.example,key=k,sig=s"),
            ("origin", "remote.example"),
        ),
        ("src", _Parts(src=IPv4Address("192.0.2.7")), ("src", "192.0.2.7")),
        ("src", _Parts(src=IPv6Address("::ffff:192.0.2.7")), ("src", "192.0.2.7")),
        ("src", _Parts(src="::FFFF:192.0.2.7"), ("src", "192.0.2.7")),
        ("src", _Parts(src=IPv6Address("2001:db8::1")), ("src", "2001:db8::1")),
        # HAProxy writes addresses with inet_ntop, as the agent does.
        ("src", _Parts(src=IPv6Address("::1.2.3.4")), ("src", "::1.2.3.4")),
        ("src", _Parts(src=""), None),
        ("src", _Parts(), None),
        ("uri", _Parts(path="/a/b", query="x=1"), ("uri", "/a/b?x=1")),
        ("uri", _Parts(path="/a/b", query=""), ("uri", "/a/b?")),  # HAProxy's pathq
        ("uri", _Parts(path="/a/b"), ("uri", "/a/b")),
        ("none", _Parts(auth="Bearer t", src="192.0.2.1"), None),
    ],
)
def test_each_kind_takes_its_documented_value(
    kind: str, request_parts: _Parts, key: tuple[str, str] | None
) -> None:
    assert KEY_EXTRACTORS[kind](request_parts) == key


def test_origin_without_x_matrix_keys_on_the_client_address() -> None:
    parts = _Parts(auth="Bearer syt_YWxpY2U_a_b", src=IPv4Address("198.51.100.2"))
    assert KEY_EXTRACTORS["origin"](parts) == ("src", "198.51.100.2")


def test_every_policy_key_kind_has_an_extractor() -> None:
    assert set(KEY_EXTRACTORS) == {kind.value for kind in KeyKind}


@given(
    st.sampled_from(sorted(KEY_EXTRACTORS)),
    st.text(max_size=60),
    st.none() | st.text(max_size=60),
    st.none() | st.text(max_size=60),
    st.none() | st.text(max_size=40),
)
def test_no_extractor_raises(
    kind: str, path: str, query: str | None, auth: str | None, src: str | None
) -> None:
    key = KEY_EXTRACTORS[kind](_Parts(path, query, auth, src))
    assert key is None or (isinstance(key[0], str) and isinstance(key[1], str))


def test_a_long_syt_token_is_decoded_every_time_and_not_memoised() -> None:
    from spoa.matrix.tokens import _SYT_LOCALPARTS

    token = "syt_YWxpY2U_" + "x" * 300 + "_crc"
    assert syt_localpart(token) == "alice"
    assert syt_localpart(token) == "alice"
    assert token not in _SYT_LOCALPARTS
    short = "syt_YWxpY2U_abc_def"
    assert syt_localpart(short) == "alice"
    assert short in _SYT_LOCALPARTS


def test_the_bearer_token_of_a_header_is_memoised_within_bounds() -> None:
    from spoa.matrix.tokens import _BEARER_TOKENS

    header = "Bearer syt_Ym9i_memo_test"
    assert access_token(header, None) == "syt_Ym9i_memo_test"
    assert _BEARER_TOKENS[header] == "syt_Ym9i_memo_test"
    # Remembered, the answer is the same; a header that is no Bearer one is
    # remembered as having none, and the query is still read.
    assert access_token(header, None) == "syt_Ym9i_memo_test"
    assert access_token("Basic abc", "access_token=q") == "q"
    assert access_token("Basic abc", "access_token=q") == "q"
    assert _BEARER_TOKENS["Basic abc"] == ""
    long_header = "Bearer " + "t" * 300
    assert access_token(long_header, None) == "t" * 300
    assert long_header not in _BEARER_TOKENS
