"""Counters a device application can read, e.g. to export as metrics or show on a console.

Dropped messages are never surfaced, so counting them is the only way an
operator learns that a non-peer is knocking or that someone sends garbage.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .inbox import DropReason


@dataclass
class DeviceStats:
    connects: int = 0
    connect_failures: int = 0
    deliveries: int = 0
    sent: int = 0
    resent: int = 0
    refused: int = 0
    surfaced: int = 0
    receipts: int = 0
    expiry_notices: int = 0
    peer_list_updates: int = 0
    # PEER_CHANGEs behind the held list (a replay, or an oracle that went back): not applied,
    # not receipted.  Anything but 0 deserves a look.
    peer_changes_older: int = 0
    # Steps of the oracle's key chain followed (SPEC §15).
    oracle_key_changes: int = 0
    dropped_invalid: int = 0
    # Envelopes past created_at + ttl + skew: replays (a fake relay, or one on the path).
    dropped_stale: int = 0
    duplicates: int = 0
    dropped_non_peer: int = 0
    dropped_untrusted_expiry: int = 0
    dropped_unauthorized_peer_change: int = 0
    dropped_unexpected_receipt: int = 0
    # CONFIG from any key but the oracle's (SPEC §21).
    dropped_unauthorized_config: int = 0
    # Configurations applied, and CONFIGs behind the applied one (not applied, not reported).
    config_updates: int = 0
    configs_older: int = 0
    # Transfers refused for this device's bounds (too large, too many under way).
    dropped_refused_transfer: int = 0
    files_surfaced: int = 0
    # Relay messages that were no frame a device may receive (nothing to ACK).
    bad_frames: int = 0
    # Calls (SPEC §18), as caller: calls that got no response in time, responses that came
    # after that (discarded), and responses for no call of ours or from another than the
    # callee (discarded: anything but 0 deserves a look).
    calls_timed_out: int = 0
    responses_late: int = 0
    responses_unmatched: int = 0
    # As callee: calls from peers, those dropped (a replayed correlation id, a deadline
    # outside its envelope), those answered with a status other than OK, responses sent.
    calls_received: int = 0
    calls_dropped: int = 0
    calls_not_ok: int = 0
    responses_sent: int = 0
    # Calls and configurations left for another run of the home (`takes_commands=False`).
    commands_left: int = 0

    def count_drop(self, reason: DropReason) -> None:
        name = "duplicates" if reason is DropReason.DUPLICATE else f"dropped_{reason.value}"
        setattr(self, name, getattr(self, name) + 1)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)
