"""Hypothesis strategies shared by the codec's tests."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address

from hypothesis import strategies as st

from spoa.spop import Int32, Int64, UInt32, UInt64, Value

#: Every TYPED-DATA value but strings and binaries, over each type's whole range.
SCALARS: st.SearchStrategy[Value] = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**31), max_value=2**31 - 1).map(Int32),
    st.integers(min_value=0, max_value=2**32 - 1).map(UInt32),
    st.integers(min_value=-(2**63), max_value=2**63 - 1).map(Int64),
    st.integers(min_value=0, max_value=2**64 - 1).map(UInt64),
    st.integers(min_value=0, max_value=2**32 - 1).map(IPv4Address),
    st.integers(min_value=0, max_value=2**128 - 1).map(IPv6Address),
)
