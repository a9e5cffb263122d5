"""What signed prekeys (SPEC §5) cost, against sealing to identity keys, in one run.

    PYTHONPATH=. .venv/bin/python benchmarks/prekey_cost.py

Printed, never asserted: bytes added per peer-list entry and per envelope
wrap; µs to verify one signed prekey (decode included); µs to seal and to
open a 64-byte DATA envelope to one recipient with its identity key and with
its prekey, and their ratio; and the oracle's side: bytes of a peer change of
N = 10 and 100 peers with and without prekeys, µs to encode one, and µs for
a device to decode (and so verify) one.  Each time is the best of 5 slices
(the machine is shared: the minimum is the least disturbed).
"""

from __future__ import annotations

import os
import time

from common import best_us, table

from proto import Identity, Kind, decode_envelope, seal_envelope
from proto.payloads import PeerChange
from proto.prekeys import SignedPrekey, create_prekey

PAYLOAD = b"\x00" * 64
WEEK_MS = 7 * 86_400_000


def main() -> None:
    now = time.time_ns() // 1_000_000
    alice, bob = Identity.generate(), Identity.generate()
    prekey, secret = create_prekey(bob, 1, os.urandom(32), now + WEEK_MS)
    encoded_prekey = prekey.encode()

    def seal(prekeys: dict | None) -> object:
        return seal_envelope(alice, Kind.DATA, [bob.public], PAYLOAD, ttl_s=60, now_ms=now,
                             prekeys=prekeys)

    plain, sealed = seal(None), seal({bob.public: prekey})
    plain_env, prekey_env = decode_envelope(plain.raw), decode_envelope(sealed.raw)
    held = {1: secret}
    seal_id = best_us(lambda: seal(None))
    seal_pk = best_us(lambda: seal({bob.public: prekey}))
    open_id = best_us(lambda: decode_envelope(plain.raw).open(bob))
    open_pk = best_us(lambda: decode_envelope(sealed.raw).open(bob, held))
    print(table(["figure", "value"], [
        ["signed prekey, bytes (id < 24)", len(encoded_prekey)],
        ["bytes added per peer-list entry with a prekey", len(encoded_prekey)],
        ["bytes added per peer-list entry without one (null)", 1],
        ["bytes added per envelope wrap sealed to a prekey (id < 24)",
         len(sealed.raw) - len(plain.raw)],
        ["verify one signed prekey, µs", best_us(
            lambda: SignedPrekey.decode(encoded_prekey, bob.public))],
        ["check a prekey is usable at now_ms, µs", best_us(lambda: prekey.check_usable(now))],
    ]))
    print()
    print(table(["1 recipient, 64 B", "identity key µs", "prekey µs", "prekey / identity"], [
        ["seal", seal_id, seal_pk, seal_pk / seal_id],
        ["decode + verify + open", open_id, open_pk, open_pk / open_id],
    ]))
    assert plain_env.open(bob).plaintext == prekey_env.open(bob, held).plaintext  # same mail
    print()
    rows = []
    for n in (10, 100):
        peers = [Identity.generate() for _ in range(n)]
        prekeys = tuple(create_prekey(p, 1, os.urandom(32), now + WEEK_MS)[0] for p in peers)
        keys = tuple(p.public for p in peers)
        bare, full = PeerChange(1, keys, 1), PeerChange(1, keys, 1, prekeys)
        bare_bytes, full_bytes = bare.encode(), full.encode()
        rows.append([n, len(bare_bytes), len(full_bytes), best_us(bare.encode),
                     best_us(full.encode), best_us(lambda b=bare_bytes: PeerChange.decode(b)),
                     best_us(lambda b=full_bytes: PeerChange.decode(b))])
    print(table(["peers", "bytes bare", "bytes prekeys", "oracle encode µs bare",
                 "oracle encode µs prekeys", "device decode µs bare",
                 "device decode+verify µs prekeys"], rows))


if __name__ == "__main__":
    main()
