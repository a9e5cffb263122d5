"""The physical floor of a relay that verifies every message: one Ed25519 verify, one envelope check.

A relay must at least decode and verify each envelope it accepts, so
`decode_envelope(raw).verify()` per second on one core bounds its throughput
from above; the relay benchmark reports its figure as a fraction of this one,
measured in the same run on the same machine.

    .venv/bin/python benchmarks/verify_floor.py [--quick]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from proto import Identity, Kind, decode_envelope, seal_envelope

from common import table, write_results


def _rate(operation: Callable[[], object], seconds: float,
          clock: Callable[[], float]) -> dict[str, float]:
    """Best of three timed slices: the floor is what the core can do, not the noise."""
    best, total = float("inf"), 0
    for _ in range(3):
        started, count = clock(), 0
        while clock() - started < seconds / 3:
            for _ in range(200):
                operation()
            count += 200
        total += count
        best = min(best, (clock() - started) / count)
    return {"us_per_op": best * 1e6, "ops_per_s": 1 / best, "ops_measured": total}


def measure(seconds: float = 3.0, payload_bytes: int = 64,
            clock: Callable[[], float] = time.perf_counter) -> dict[str, dict[str, float]]:
    """µs/op and ops/s, single core, for a bare verify and for decode + verify of one envelope.

    `clock` time.process_time gives CPU µs per op, comparable with a server's CPU per message
    (benchmarks/peers.py) and unaffected by other work taking the core away."""
    sender, recipient = Identity.generate(), Identity.generate()
    envelope = seal_envelope(sender, Kind.DATA, [recipient.public], b"x" * payload_bytes,
                             ttl_s=600, now_ms=time.time_ns() // 1_000_000)
    signed, signature, raw = envelope.signed_bytes(), envelope.signature, envelope.raw
    public = sender.public
    return {
        "ed25519_verify": _rate(lambda: public.verify(signed, signature), seconds / 2, clock),
        "envelope_decode_verify": _rate(lambda: decode_envelope(raw).verify(), seconds / 2, clock),
        "envelope_bytes": {"bytes": len(raw)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="0.6 s of timing instead of 4 s")
    args = parser.parse_args()
    result = measure(0.6 if args.quick else 4.0)
    print(table(["operation", "µs/op", "ops/s (1 core)"],
                [(name, r["us_per_op"], r["ops_per_s"]) for name, r in result.items()
                 if "ops_per_s" in r]))
    print(f"results: {write_results('verify_floor', {'verify_floor': result})}")


if __name__ == "__main__":
    main()
