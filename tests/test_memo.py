from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spoa.memo import Memo


def test_remember_keeps_and_returns_the_value() -> None:
    memo: Memo[str, int] = Memo(4)
    assert memo.remember("a", 1) == 1
    assert memo.get("a") == 1


def test_a_full_memo_empties_before_taking_a_new_key() -> None:
    memo: Memo[str, int] = Memo(3)
    for key in range(3):
        memo.remember(str(key), key)
    memo.remember("99", 99)
    assert dict(memo) == {"99": 99}


def test_replacing_a_known_key_does_not_empty_a_full_memo() -> None:
    memo: Memo[str, int] = Memo(2)
    memo.remember("1", 1)
    memo.remember("2", 2)
    memo.remember("2", 20)
    assert dict(memo) == {"1": 1, "2": 20}


def test_limit_zero_keeps_nothing() -> None:
    memo: Memo[str, str] = Memo(0)
    assert memo.remember("a", "b") == "b"
    assert len(memo) == 0


def test_a_negative_limit_is_refused() -> None:
    with pytest.raises(ValueError, match="0 or more"):
        Memo(-1)
    with pytest.raises(ValueError, match="1 or more"):
        Memo(4, max_key=0)


def test_a_key_longer_than_max_key_is_answered_but_not_kept() -> None:
    memo: Memo[str, str] = Memo(4, max_key=3)
    assert memo.remember("abcd", "long") == "long"
    assert memo.remember("abc", "short") == "short"
    assert dict(memo) == {"abc": "short"}


@given(st.integers(min_value=0, max_value=16), st.lists(st.integers(0, 40), max_size=200))
def test_never_holds_more_than_the_limit(limit: int, keys: list[int]) -> None:
    memo: Memo[bytes, int] = Memo(limit)
    for key in keys:
        assert memo.remember(bytes([key]), -key) == -key
        assert len(memo) <= limit
        if limit:
            assert memo[bytes([key])] == -key
