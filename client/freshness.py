"""How long an envelope can be valid, by the clocks the protocol trusts (SPEC §11).

A relay stores an envelope only if its `created_at_ms` is within ±300 s of
the relay's clock and expires it at created_at + ttl.  So no honest relay
delivers an envelope after `created_at + ttl + skew`: anything later is a
replay (a fake relay, or someone on the path of a `ws://` link, sending a
genuine old envelope again), and a device drops it.  The same instant bounds
how long a device must remember a (sender, msg_id) to refuse a duplicate:
after it, the freshness rule refuses the copy anyway.

`now` is the later of the device's own clock and the relay's (as announced
in WELCOME): a device without a real-time clock (1970 after a reboot) still
applies the rule against an honest relay, and no relay can make an envelope
look younger than the device's own clock says it is.  An envelope created more
than the skew after that `now` is no honest relay's either: none stores one
created beyond its own clock plus the skew.

What the device forgets, it forgets by its own clock alone (`Device._prune`,
and the stream opens it took, `DeviceStreams.receive`): a relay announcing a
clock years ahead would otherwise have it forget every (sender, msg_id) it
holds, and a later connection replay them as new.
"""

from __future__ import annotations

from proto import Envelope

# The relay's clock-skew allowance (SPEC §10: created_at within ±300 s of relay time).
CLOCK_SKEW_MS = 300_000


def valid_until_ms(envelope: Envelope) -> int:
    """The last instant at which an honest relay may still deliver `envelope`."""
    return envelope.expires_at_ms + CLOCK_SKEW_MS


def is_fresh(envelope: Envelope, now_ms: int) -> bool:
    return now_ms <= valid_until_ms(envelope) and not is_from_the_future(envelope, now_ms)


def is_from_the_future(envelope: Envelope, now_ms: int) -> bool:
    """Created later than any honest relay would have stored it (`now_ms` plus the skew)."""
    return envelope.created_at_ms > now_ms + CLOCK_SKEW_MS


def device_now_ms(local_ms: int, relay_offset_ms: int) -> int:
    """The `now` the rule uses: the device's clock, or the relay's when that is later."""
    return local_ms + max(0, relay_offset_ms)
