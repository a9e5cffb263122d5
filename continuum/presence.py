"""What this relay process tells the oracle about enrolled devices' connections, as a pure object.

`PresenceTracker` keeps the connections of enrolled devices this process
holds, and the ones that ended and the oracle has not heard of yet, and
turns them into report drafts (`proto.presence`): no clock, no I/O, no
randomness (the instance id comes in).  The shell (`presence_report.py`)
asks for a draft, signs and sends it, and says how it went:

- `delivered`: what the draft said is now the oracle's; ended connections
  it carried are forgotten.  The oracle may ask for a snapshot (it missed a
  report, or does not know this process).
- `failed`: the oracle may or may not have applied it.  Nothing is replayed:
  the next report is a snapshot of every connection held, plus the ended
  ones still waiting (each with its exact times and counts), so an oracle
  that was down gets one report per relay process, not a storm of events.

Events are coalesced by construction: a report carries each connection's
state now (connected or ended, its cumulative counts), however many times
it changed since the last one.  Ended connections wait in a bounded queue
(`max_ended`): beyond it the oldest are dropped and counted, the only
information a long oracle outage can cost (their end time and last counts;
the oracle ends them itself when the snapshot no longer lists them).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from proto import PublicKey
from proto.presence import MAX_PRESENCE_CONNECTIONS, ConnectionState


class ConnectionCounts:
    """Messages of one connection, counted by `RelayProtocol` as it decides them."""

    __slots__ = ("sent", "received", "refused")

    def __init__(self) -> None:
        self.sent = 0  # SENDs accepted (ACCEPTED answered)
        self.received = 0  # deliveries the device acknowledged
        self.refused = 0  # frames and SENDs refused with ERROR


class Tracked:
    """One connection of an enrolled device; the handle `disconnected` takes back."""

    __slots__ = ("device", "connected_at_ms", "disconnected_at_ms", "counts", "reported")

    def __init__(self, device: PublicKey, connected_at_ms: int, counts: ConnectionCounts) -> None:
        self.device = device
        self.connected_at_ms = connected_at_ms
        self.disconnected_at_ms: int | None = None
        self.counts = counts
        # The state the oracle last acknowledged (None: it never heard of this connection).
        self.reported: ConnectionState | None = None

    def changed(self) -> bool:
        """Whether the oracle has not acknowledged this connection's state as it is now."""
        reported, counts = self.reported, self.counts
        return (reported is None or reported.disconnected_at_ms != self.disconnected_at_ms
                or reported.sent != counts.sent or reported.received != counts.received
                or reported.refused != counts.refused)

    def state(self) -> ConnectionState:
        counts = self.counts
        return ConnectionState(self.device, self.connected_at_ms, self.disconnected_at_ms,
                               counts.sent, counts.received, counts.refused)


@dataclass(frozen=True)
class Draft:
    """One report to sign and send: its place in the sequence and what it says."""

    sequence: int
    snapshot_from: int
    snapshot_last: bool
    connections: tuple[ConnectionState, ...]
    tracked: tuple[Tracked, ...]


class PresenceTracker:
    def __init__(self, instance: bytes, max_ended: int = 50_000,
                 max_per_report: int = MAX_PRESENCE_CONNECTIONS) -> None:
        self.instance = instance
        self._max_ended = max_ended
        self._max_per_report = max_per_report
        self._live: dict[int, Tracked] = {}  # id(tracked) → tracked, in connection order
        self._ended: OrderedDict[int, Tracked] = OrderedDict()  # ended, not yet delivered
        self._sequence = 0
        self._in_flight: Draft | None = None
        # A snapshot being sent: the connections left for its later parts, and its first part.
        self._snapshot_left: list[Tracked] | None = None
        self._snapshot_from = 0
        self._snapshot_wanted = True  # the oracle has not heard of this process yet
        self._truncated = False  # the last changes report was full: more are waiting
        self.dropped = 0  # ended connections forgotten unreported (queue full)

    # -- events from the sessions -----------------------------------------------------------

    def connected(self, device: PublicKey, now_ms: int, counts: ConnectionCounts) -> Tracked:
        tracked = Tracked(device, now_ms, counts)
        self._live[id(tracked)] = tracked
        return tracked

    def disconnected(self, tracked: Tracked, now_ms: int) -> None:
        if self._live.pop(id(tracked), None) is None:
            return
        tracked.disconnected_at_ms = now_ms
        # Freeze the counts: nothing is decided on a closed connection any more.
        final = ConnectionCounts()
        final.sent, final.received, final.refused = (tracked.counts.sent,
                                                     tracked.counts.received,
                                                     tracked.counts.refused)
        tracked.counts = final
        self._ended[id(tracked)] = tracked
        while len(self._ended) > self._max_ended:
            self._ended.popitem(last=False)
            self.dropped += 1

    @property
    def held(self) -> int:
        """Connections of enrolled devices open on this process now."""
        return len(self._live)

    @property
    def waiting(self) -> int:
        """Ended connections the oracle has not acknowledged yet."""
        return len(self._ended)

    # -- reports ----------------------------------------------------------------------------

    def next_report(self, heartbeat_due: bool) -> Draft | None:
        """The next report to send, or None when there is nothing to say and no heartbeat due.

        One report is in flight at a time: call `delivered` or `failed` first.
        """
        assert self._in_flight is None, "one report at a time"
        if self._snapshot_left is None and self._snapshot_wanted:
            self._snapshot_wanted = False
            self._snapshot_left = self._snapshot_order()
            self._snapshot_from = self._sequence + 1
        if self._snapshot_left is not None:
            part = self._snapshot_left[:self._max_per_report]
            last = len(part) == len(self._snapshot_left)
            draft = self._draft(part, self._snapshot_from, last)
        else:
            changed = self._changed()
            if not changed and not heartbeat_due:
                return None
            draft = self._draft(changed, 0, False)
        self._in_flight = draft
        return draft

    def delivered(self, draft: Draft, wants_snapshot: bool) -> None:
        """The oracle took `draft`; `wants_snapshot`: it asks for every connection again."""
        self._settle(draft)
        for tracked, state in zip(draft.tracked, draft.connections, strict=True):
            tracked.reported = state
            if state.disconnected_at_ms is not None:
                self._ended.pop(id(tracked), None)
        if self._snapshot_left is not None:
            del self._snapshot_left[:len(draft.tracked)]
            if draft.snapshot_last:
                self._snapshot_left = None
        if wants_snapshot and self._snapshot_left is None:
            self._snapshot_wanted = True

    def failed(self, draft: Draft) -> None:
        """`draft` may not have arrived: start a snapshot afresh with the next report."""
        self._settle(draft)
        self._snapshot_left = None
        self._snapshot_wanted = True

    def abandon(self) -> None:
        """Whatever report was in flight (its sender was cancelled) counts as failed."""
        if self._in_flight is not None:
            self.failed(self._in_flight)

    @property
    def has_more(self) -> bool:
        """Whether the next report should go now, not after the batching interval: a
        snapshot is wanted or under way, or the last report was full."""
        return self._snapshot_wanted or self._snapshot_left is not None or self._truncated

    def _settle(self, draft: Draft) -> None:
        assert self._in_flight is draft, "not the report in flight"
        self._in_flight = None

    def _draft(self, tracked: list[Tracked], snapshot_from: int, last: bool) -> Draft:
        self._sequence += 1
        tracked = sorted(tracked, key=lambda t: (t.device.raw, t.connected_at_ms))
        return Draft(self._sequence, snapshot_from, last, tuple(t.state() for t in tracked),
                     tuple(tracked))

    def _snapshot_order(self) -> list[Tracked]:
        """Every connection a snapshot lists: the ended ones still waiting, then the open."""
        return [*self._ended.values(), *self._live.values()]

    def _changed(self) -> list[Tracked]:
        """Connections whose state the oracle has not acknowledged, oldest events first,
        at most one report's worth (the rest go in the next)."""
        out: list[Tracked] = []
        limit = self._max_per_report
        self._truncated = False
        for group in (self._ended.values(), self._live.values()):
            for tracked in group:
                if tracked.changed():
                    if len(out) >= limit:
                        self._truncated = True
                        return out
                    out.append(tracked)
        return out
