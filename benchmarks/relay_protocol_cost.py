"""CPU of one relayed message in the relay's pure code (`RelayProtocol` and `proto`), no socket.

    .venv/bin/python benchmarks/relay_protocol_cost.py [--baseline /tmp/base] [--rounds 3]

A sender's and a receiver's `RelayProtocol`, authenticated, are driven as
the session drives them for one message: SEND in (channel open, frame and
envelope decode), the rate check answered, admission (with the Ed25519
verify), ACCEPTED out, the receiver's fetch answered with the stored bytes,
DELIVER out, its ACK in, the removal answered.  The store calls are answered
by hand, so this is what the relay spends on a message beside the store,
aiohttp, asyncio and the kernel.  The verify is reported on its own and
subtracted.

Timed in process CPU time (`time.process_time`), not wall time: on a shared
machine, wall time counts the time other processes had the core.  With
--baseline, another checkout's code runs in a child process alternately with
this one's, `--rounds` times; the figure to quote is the median of the
per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import table

MESSAGES = 4_000  # per timed slice; each slice builds fresh connections


def measure(slices: int = 5) -> dict[str, float]:
    """Best-of-`slices` µs per message (protocol total, verify alone, the rest)."""
    import structlog

    from continuum.access import AccessControl
    from continuum.connection_gate import AddressBudget, ConnectionGate
    from continuum.metrics import RelayMetrics
    from continuum.protocol import RelayProtocol
    from continuum.settings import Settings
    from continuum.store import StoredMessage
    from proto import Identity, Kind, seal_envelope
    from proto.access import AccessList
    from proto.frames import Ack, Send, encode_frame
    from proto.handshake import DeviceHandshake
    from runtime.logs import configure_logging

    configure_logging("warning")
    relay, oracle = Identity.generate(), Identity.generate()
    alice, bob = Identity.generate(), Identity.generate()
    settings = Settings(oracle_url="http://oracle.invalid", oracle_key=oracle.public.text,
                        rate_per_s=1e9, rate_burst=10**9)
    metrics, log = RelayMetrics(), structlog.get_logger("bench")
    access = AccessControl(settings, metrics, log)
    now = time.time_ns() // 1_000_000
    access.apply(AccessList(1, 1, now, now + 3_600_000, oracle.public,
                            {alice.public: frozenset({0}), bob.public: frozenset({0})},
                            frozenset()).sign(oracle))
    gate = ConnectionGate(
        max_pending_per_address=settings.max_pending_handshakes_per_address,
        max_per_address=settings.max_connections_per_address,
        max_per_key=settings.max_connections_per_key,
        unknown_key_rate_per_s=1e9, unknown_key_burst=10**9, known_keys=settings.known_keys)

    def connected(device: Identity) -> tuple[RelayProtocol, object]:
        protocol = RelayProtocol(relay, settings, access, AddressBudget(gate, "192.0.2.1"),
                                 metrics, log, relay_nonce=os.urandom(32),
                                 ephemeral_seed=os.urandom(32))
        handshake = DeviceHandshake(device, os.urandom(32), os.urandom(32), 1 << 20)
        protocol.receive(handshake.receive_challenge(protocol.data_to_send()[0]), now)
        terms = handshake.receive_welcome(protocol.data_to_send()[0])
        return protocol, terms.channel.for_device()[0]

    envelopes = [seal_envelope(alice, Kind.DATA, [bob.public], b"\x00" * 64, ttl_s=600,
                               now_ms=now) for _ in range(64)]

    def one_slice(verify: bool) -> float:
        sender, to_relay = connected(alice)
        receiver, ack_to_relay = connected(bob)
        # The devices' sealing is theirs, not the relay's: done before the clock starts.
        sends = [to_relay.seal(encode_frame(Send(envelopes[i % 64].raw)))  # type: ignore[attr-defined]
                 for i in range(MESSAGES)]
        acks = [ack_to_relay.seal(encode_frame(Ack(f"{i:020d}-0")))  # type: ignore[attr-defined]
                for i in range(MESSAGES)]
        receiver.wake()
        receiver.fetched([])
        started = time.process_time()
        for i in range(MESSAGES):
            check = sender.receive(sends[i], now)
            envelope = check.envelope  # type: ignore[union-attr]
            if not verify:
                object.__setattr__(envelope, "_verified", True)
            sender.rate_checked(envelope, True, now)
            sender.stored(envelope.msg_id)
            sender.data_to_send()
            receiver.wake()
            tag = f"{i:020d}-0"
            receiver.fetched([StoredMessage(tag, envelope.raw)])
            receiver.data_to_send()
            removal = receiver.receive(acks[i], now)
            receiver.removed(removal.tag, True)  # type: ignore[union-attr]
        return (time.process_time() - started) / MESSAGES * 1e6

    with_verify = min(one_slice(True) for _ in range(slices))
    without = min(one_slice(False) for _ in range(slices))
    return {"per_message_us": with_verify, "verify_us": with_verify - without,
            "beside_verify_us": without}


def _child(code_dir: str) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(Path(code_dir).resolve())}
    child = subprocess.run([sys.executable, __file__, "--json"], env=env, check=True,
                           capture_output=True, text=True, cwd=Path(__file__).parent)
    return json.loads(child.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", help="another checkout's top directory")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.json:
        print(json.dumps(measure()))
        return
    if not args.baseline:
        figures = measure()
        print(table(["figure", "µs"], [(name, f"{value:.2f}") for name, value in figures.items()]))
        return
    here = str(Path(__file__).resolve().parent.parent)
    rows, ratios = [], []
    for index in range(args.rounds):
        base, cand = _child(args.baseline), _child(here)
        ratios.append(cand["beside_verify_us"] / base["beside_verify_us"])
        rows.append((index + 1, f"{base['beside_verify_us']:.2f}", f"{cand['beside_verify_us']:.2f}",
                     f"{base['verify_us']:.2f}", f"{cand['verify_us']:.2f}", f"{ratios[-1]:.3f}"))
    print(table(["round", "base µs beside verify", "cand µs beside verify", "base verify µs",
                 "cand verify µs", "ratio"], rows))
    print(f"median ratio candidate / baseline, beside the verify: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
