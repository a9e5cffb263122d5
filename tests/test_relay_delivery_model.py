"""The delivery rules of `RelayProtocol` against a model mailbox, in every interleaving.

A wake-up may carry the entry appended (`pushed`), and pub/sub, fetch replies and the
device's ACKs race: a wake-up can come after a fetch that already returned its entry, a
fetch can be under way while entries are appended, entries can expire unread, and a
pub/sub connection can drop (its wake-ups lost, then one plain wake-up for everyone).
Hypothesis drives the steps in any order; whatever the order, once everything settles
the device got every entry that did not expire, each once, in mailbox order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given
from hypothesis import strategies as st

from continuum.protocol import Fetch
from continuum.store import NewEntry, StoredMessage
from fuzz_settings import long_run, quick
from proto.frames import Ack, Deliver, encode_frame
from test_relay_protocol import WINDOW, authenticated, frames

STEPS = ("start", "append", "append", "append", "wake_up", "wake_up", "run_fetch", "fetch_reply",
         "ack", "expire", "lose_wake_ups")


@dataclass
class Mailbox:
    """A Redis stream as the accept script sees it: ids only grow; an emptied log keeps
    its last id (what a wake-up's `previous` is then)."""

    present: dict[int, bytes] = field(default_factory=dict)
    last_id: int = 0

    def append(self) -> NewEntry:
        newest = max(self.present, default=self.last_id)
        self.last_id += 1
        raw = b"envelope %d" % self.last_id
        self.present[self.last_id] = raw
        return NewEntry(str(self.last_id), str(newest) if newest else None, raw)

    def fetch(self, after: str | None, limit: int) -> list[StoredMessage]:
        start = int(after) if after is not None else 0
        return [StoredMessage(str(tag), raw) for tag, raw in sorted(self.present.items())
                if tag > start][:limit]


class World:
    """One connection of a device whose mailbox had `history` entries before it subscribed,
    the first `acked` of them acked on an earlier connection.  `confirmation`: its subscribe
    is confirmed with a plain wake-up (the relay's first subscriber of this key, on Redis);
    without one (another connection of the key subscribed already, or the embedded store),
    the wake-ups of new entries can come before the session's own first fetch."""

    def __init__(self, history: int, acked: int, confirmation: bool) -> None:
        self.protocol = authenticated()
        self.mailbox = Mailbox()
        for _ in range(history):
            self.mailbox.append()  # before this connection subscribed: no wake-up here
        for tag in range(1, min(acked, history) + 1):
            del self.mailbox.present[tag]
        self.started = False  # the session's own first wake-up, right after subscribing
        self.wake_ups: list[NewEntry | None] = [None] if confirmation else []
        self.fetch: Fetch | None = None
        self.fetched: list[StoredMessage] | None = None  # ran in the store, reply on its way
        self.delivered: list[int] = []  # tags, in the order the device got them
        self.unacked: list[str] = []
        self.expired: set[int] = set()

    def collect(self) -> None:
        for frame in frames(self.protocol):
            assert isinstance(frame, Deliver)
            assert frame.envelope == b"envelope " + frame.tag.encode()
            self.delivered.append(int(frame.tag))
            self.unacked.append(frame.tag)
        assert len(self.unacked) <= WINDOW, "more in flight than the window"

    def asked(self, fetch: Fetch | None) -> None:
        if fetch is not None:
            assert self.fetch is None and self.fetched is None, "two fetches at once"
            self.fetch = fetch
        self.collect()

    def step(self, name: str, pick: int) -> None:
        if name == "start" and not self.started:
            self.started = True
            self.asked(self.protocol.wake())
        elif name == "append":
            self.wake_ups.append(self.mailbox.append())
        elif name == "wake_up" and self.wake_ups:
            entry = self.wake_ups.pop(0)
            self.asked(self.protocol.wake() if entry is None else self.protocol.pushed(entry))
        elif name == "run_fetch" and self.fetch is not None and self.fetched is None:
            self.fetched = self.mailbox.fetch(self.fetch.after, self.fetch.limit)
        elif name == "fetch_reply" and self.fetched is not None:
            batch, self.fetch, self.fetched = self.fetched, None, None
            self.asked(self.protocol.fetched(batch))
        elif name == "ack" and self.unacked:
            tag = self.unacked.pop(pick % len(self.unacked))
            assert self.protocol.receive(encode_frame(Ack(tag))) is not None
            existed = self.mailbox.present.pop(int(tag), None) is not None
            self.asked(self.protocol.removed(tag, existed))
        elif name == "expire" and self.mailbox.present:
            tags = sorted(self.mailbox.present)
            gone = tags[pick % len(tags)]
            del self.mailbox.present[gone]
            if gone not in self.delivered:
                self.expired.add(gone)
        elif name == "lose_wake_ups":
            self.wake_ups = [None]  # the relay resubscribes and wakes everyone

    def settle(self) -> None:
        """Everything in flight arrives, the device acks all it got, until nothing moves."""
        for _ in range(1000):
            if not self.started:
                self.step("start", 0)
            elif self.wake_ups:
                self.step("wake_up", 0)
            elif self.fetched is not None:
                self.step("fetch_reply", 0)
            elif self.fetch is not None:
                self.step("run_fetch", 0)
            elif self.unacked:
                self.step("ack", 0)
            else:
                return
        raise AssertionError("the delivery never settled")


def check(history: int, acked: int, confirmation: bool,
          steps: list[tuple[str, int]]) -> None:
    world = World(history, acked, confirmation)
    for name, pick in steps:
        world.step(name, pick)
    world.settle()
    delivered = world.delivered
    assert delivered == sorted(set(delivered)), "out of order, or twice"
    appended = set(range(min(acked, history) + 1, world.mailbox.last_id + 1))
    assert set(delivered) | world.expired == appended, "an entry was never delivered"


STEP_LISTS = st.lists(st.tuples(st.sampled_from(STEPS), st.integers(0, 1000)), max_size=60)
HISTORY = st.integers(0, 3)


@quick(1000)
@given(HISTORY, HISTORY, st.booleans(), STEP_LISTS)
def test_every_entry_is_delivered_once_in_order_whatever_races(history, acked, confirmation,
                                                               steps) -> None:
    check(history, acked, confirmation, steps)


@long_run
@given(HISTORY, HISTORY, st.booleans(), STEP_LISTS)
def test_every_entry_is_delivered_once_in_order_whatever_races_long(history, acked,
                                                                    confirmation,
                                                                    steps) -> None:
    check(history, acked, confirmation, steps)
