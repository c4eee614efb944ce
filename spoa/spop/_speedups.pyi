"""Optional C fast path of :func:`spoa.spop.codec.decode_messages` (see _speedups.c)."""

from collections.abc import Callable

from .codec import DecodeError, Message, Value

def setup(
    message_class: type[Message],
    decode_typed: Callable[[bytes, int, int], tuple[Value, int]],
    decode_name: Callable[[bytes, int, int], tuple[str, int]],
    decode_error_class: type[DecodeError],
    name_cache: dict[bytes, str],
    name_cache_limit: int,
    /,
) -> None: ...
def decode_messages(buf: bytes, pos: int, end: int, /) -> list[Message]: ...
