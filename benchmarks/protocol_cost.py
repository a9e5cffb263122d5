"""What the wire protocol itself costs per message and per connection, on one core.

    .venv/bin/python benchmarks/protocol_cost.py [--baseline /tmp/base]

Measured in-process with the `proto` package (of this checkout, and with
--baseline of another one in a child process, so both are printed in one
run): envelope bytes for a 64-byte payload to one and to eight recipients;
µs to seal, decode + verify, and open one; µs of both sides of one
handshake; and, from protocol 2 on, µs to seal + open one sealed frame of a
300-byte envelope.  Each figure is the best of 5 timed slices (the machine is
shared: the minimum is the least disturbed).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import best_us, table

PAYLOAD = b"\x00" * 64


def measure() -> dict[str, float]:
    """Every figure for the `proto` package importable here (any protocol version)."""
    from proto import Identity, Kind, decode_envelope, seal_envelope
    from proto import handshake as hs
    from proto.limits import DEFAULT_LIMITS, PROTOCOL_VERSION

    alice, bob = Identity.generate(), Identity.generate()
    eight = [Identity.generate().public for _ in range(8)]
    now = time.time_ns() // 1_000_000

    def seal(recipients: list) -> object:
        return seal_envelope(alice, Kind.DATA, recipients, PAYLOAD, ttl_s=60, now_ms=now)

    one = seal([bob.public])
    figures = {"protocol": float(PROTOCOL_VERSION),
               "envelope_bytes_1_recipient": float(len(one.raw)),
               "envelope_bytes_8_recipients": float(len(seal(eight).raw)),
               "seal_us": best_us(lambda: seal([bob.public])),
               "decode_verify_us": best_us(lambda: decode_envelope(one.raw).verify()),
               "open_us": best_us(lambda: decode_envelope(one.raw).open(bob))}
    relay = Identity.generate()
    two_seeds = len(inspect.signature(hs.RelayHandshake).parameters) == 4  # protocol 2

    def handshake() -> object:
        nonce = os.urandom(32)
        if two_seeds:
            r = hs.RelayHandshake(relay, nonce, os.urandom(32), DEFAULT_LIMITS)
            d = hs.DeviceHandshake(alice, os.urandom(32), os.urandom(32), 1 << 20)
        else:
            r = hs.RelayHandshake(relay, nonce, DEFAULT_LIMITS)
            d = hs.DeviceHandshake(alice, os.urandom(32), 1 << 20)
        r.receive_hello(d.receive_challenge(r.challenge()))
        welcome, terms = r.welcome(now)
        d.receive_welcome(welcome)
        return terms

    figures["handshake_both_sides_us"] = best_us(handshake)
    terms = handshake()
    channel = getattr(terms, "channel", None)
    if channel is not None:
        send, _ = channel.for_device()
        _, receive = channel.for_relay()
        frame = b"\x00" * 300
        figures["frame_seal_open_us"] = best_us(lambda: receive.open(send.seal(frame)))
        figures["frame_overhead_bytes"] = float(len(send.seal(frame)) - len(frame))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", help="another checkout's top directory")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.json:
        print(json.dumps(measure()))
        return
    runs = {"this checkout": measure()}
    if args.baseline:
        env = {**os.environ, "PYTHONPATH": str(Path(args.baseline).resolve())}
        child = subprocess.run([sys.executable, __file__, "--json"], env=env, check=True,
                               capture_output=True, text=True, cwd=Path(__file__).parent)
        runs = {"baseline": json.loads(child.stdout), **runs}
    names = list(next(iter(runs.values())))
    for figures in runs.values():
        names += [n for n in figures if n not in names]
    rows = [(name, *(f"{r[name]:,.1f}" if name in r else "-" for r in runs.values()))
            for name in names]
    print(table(["figure", *runs], rows))


if __name__ == "__main__":
    main()
