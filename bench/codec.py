"""decode_messages on route messages: time per message, C speedup against pure Python.

Encodes the design's ``route`` message (method, path, query, auth, src, as
bench/spop_load.py sends them) for requests of the spoa.traffic mix, then
decodes every payload in a loop with each implementation of
``spoa.spop.codec.decode_messages`` and prints the best round. Twice: for
spop_load's repeating mix of 4096 requests, and for 20,000 requests whose src
addresses are nearly all distinct, so building IPv4Address objects (the same
Python code in both versions) weighs in.

    python bench/codec.py [--mix N] [--messages N] [--rounds R]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from spoa.spop import Message, codec, encode_messages  # noqa: E402
from spoa.traffic import Deployment, generate  # noqa: E402

Decoder = Callable[[bytes, int, int], list[Message]]


def route_payloads(count: int) -> list[bytes]:
    """LIST-OF-MESSAGES payloads of one route message each, as HAProxy builds them."""
    return [
        encode_messages([request.route_message()])
        for request in generate(count, Deployment(users=2000, rooms=500, remotes=100))
    ]


def per_message_ns(decode: Decoder, payloads: list[bytes], rounds: int) -> list[float]:
    """Mean time per decode of each round, in nanoseconds."""
    sized = [(payload, len(payload)) for payload in payloads]
    times = []
    for _ in range(rounds):
        start = time.perf_counter_ns()
        for payload, size in sized:
            decode(payload, 0, size)
        times.append((time.perf_counter_ns() - start) / len(sized))
    return times


def compare(payloads: list[bytes], rounds: int, c_decode: Decoder | None) -> None:
    implementations: list[tuple[str, Decoder]] = [("pure Python", codec._decode_messages_py)]
    if c_decode is not None:
        implementations.insert(0, ("C speedup", c_decode))
        for payload in payloads:
            expected = codec._decode_messages_py(payload, 0, len(payload))
            assert c_decode(payload, 0, len(payload)) == expected
    sizes = [len(p) for p in payloads]
    sources = len({p[p.rindex(b"src\x06") :] for p in payloads})
    print(
        f"  {len(payloads):,} route messages, {statistics.mean(sizes):.0f} bytes on average, "
        f"{sources:,} distinct src addresses (codec's address cache: "
        f"{codec._ADDRESSES.limit:,})"
    )
    best = {}
    for name, decode in implementations:
        times = per_message_ns(decode, payloads, rounds)
        best[name] = min(times)
        print(
            f"    {name:12} per message {min(times) / 1000:6.2f} us "
            f"(median round {statistics.median(times) / 1000:.2f} us)"
        )
    if c_decode is not None:
        print(f"    speed-up     {best['pure Python'] / best['C speedup']:6.1f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--mix", type=int, default=4096, help="requests in the repeating mix (spop_load's 4096)"
    )
    parser.add_argument(
        "--messages", type=int, default=20_000, help="requests in the all-distinct run"
    )
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()

    c_decode = codec._load_speedups()
    print(f"decode_messages on the spoa.traffic mix, best of {args.rounds} rounds")
    if c_decode is None:
        print("  C speedup not built (spoa.spop._speedups does not import): pure Python only")
    # As spop_load sends them: a mix small enough for the address cache to hold.
    compare(route_payloads(args.mix), args.rounds, c_decode)
    # Every request from its own client: the address cache misses, in both versions.
    compare(route_payloads(args.messages), args.rounds, c_decode)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
