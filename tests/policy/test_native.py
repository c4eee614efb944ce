"""A rule's path regex as HAProxy's PCRE reads it in the fallback's lookup string."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spoa.policy.native import NativeRegexError, path_regex


@pytest.mark.parametrize(
    ("regex", "native"),
    [
        ("^/_matrix/media/", "^/_matrix/media/"),
        ("^/a/(r0|v3)/sync$", "^/a/(?:r0|v3)/sync(?=\\x20)"),
        ("^/x/[^/]+/typing", "^/x/[^/\\x20]+/typing"),
        ("^/d(/|$)", "^/d(?:/|(?=\\x20))"),
        ("^/a.b", "^/a[^\\x20]b"),
        ("/keys/", "^[^\\x20]*?(?:/keys/)"),  # not anchored: searched, as by the agent
        ("^/n{2,3}x{,2}", "^/n{2,3}x{0,2}"),
        ("(?i)^/shout", "^(?i:^/shout)"),
        ("^/v\\d+/\\w", "^/v[0-9]+/[A-Za-z0-9_]"),
        ("^/é", "^/\\xc3\\xa9"),  # the character's UTF-8 bytes, as in the path
    ],
)
def test_a_path_regex_becomes_pcre_that_stops_at_the_end_of_the_path(
    regex: str, native: str
) -> None:
    assert path_regex(regex) == native


@pytest.mark.parametrize(
    ("regex", "reason"),
    [
        ("^/a\\s", "\\s"),
        ("^/[\\s]", "\\s"),
        ("^/a b", "space"),
        ("^/[éa]x", "non-ASCII"),
        ("^/[ -~]", "holds a space"),
        ("^/(a)?(?(1)b|c)", "groupref_exists"),
    ],
)
def test_what_the_engines_would_read_differently_is_refused(regex: str, reason: str) -> None:
    with pytest.raises(NativeRegexError, match=re.escape(reason)):
        path_regex(regex)


PATTERNS = [
    "^/_matrix/client/(api/v1|r0|v3|unstable)/rooms/[^/]+/send",
    "^/_matrix/client/(r0|v3)/sync$",
    "/typing/",
    "^/a.b[a-c]*?$",
    "^/x(y|z)?(/|$)",
    "(?i)^/Shout/[0-9]{2,}",
    "^/w\\w+\\b",
    "^/(?!admin)[^/]+/x",
    "^/d\\D",
]
PATHS = st.text(alphabet="/_abcxyzADSHOUTmin0129é%.", max_size=24).map(lambda p: "/" + p)


@given(
    st.sampled_from(PATTERNS), PATHS, st.sampled_from(["GET", "PUT"]), st.text("a=&x", max_size=8)
)
def test_the_native_regex_matches_a_lookup_string_exactly_when_the_agent_matches_the_path(
    pattern: str, path: str, method: str, query: str
) -> None:
    agent = re.compile(pattern, re.ASCII).search(path) is not None
    if pattern.startswith(("^", "(?i)^")):
        agent = re.compile(pattern, re.ASCII).match(path) is not None
    native = re.compile(path_regex(pattern), re.ASCII).match(f"{path} {method} {query or '-'}")
    assert agent == (native is not None), (pattern, path)
