"""What a peer's bytes may carry beyond its messages: WebSocket framing, bounded.

RFC 6455 lets a message be split into frames, and aiohttp's reader parses each
one, but only complete messages reach the session, where the frame rate
(`RelayProtocol`) and the limit on PINGs before HELLO charge them.  A peer that
starts a message and then sends empty continuation frames without end (6 bytes
each) completes nothing: nothing was charged, counted or queued, reading was
never paused, and one connection had the relay parse 8 million frames a second,
a whole core, before HELLO as after WELCOME (the audit of 2026-12-07).

So the bytes read from a connection, less the messages its session took from
them, may not exceed a bound: each message taken pays back its payload and
`FRAMING_PER_MESSAGE` bytes of headers (a few fragments' worth; an unfragmented
frame needs 6 to 14), and the rest -- headers of fragments, a message still
arriving, messages parsed and not yet taken -- stays under `limit`.  Before
HELLO the only message expected is a HELLO, so the bound is small; after
WELCOME it holds the largest frame plus what aiohttp keeps parsed ahead.  A
connection beyond it is cut off: no honest peer gets there.
"""

from __future__ import annotations

# Header bytes a message may carry beyond its payload: ten empty fragments, or a few real
# ones (an unfragmented client frame has 6 to 14).
FRAMING_PER_MESSAGE = 64

# Bytes a peer may have sent before its HELLO is taken: a HELLO is a few hundred bytes.
BEFORE_HELLO_BYTES = 64 * 1024

# Beyond the largest message: what aiohttp's queue holds parsed ahead of the session (64 KiB
# of payload), a read it parked while stalled (up to 256 KiB), and slack.
PARSED_AHEAD_BYTES = 1024 * 1024


class FramingBudget:
    """Bytes read and not yet paid back by a message the session took."""

    __slots__ = ("_unpaid", "limit")

    def __init__(self, limit: int = BEFORE_HELLO_BYTES) -> None:
        self._unpaid = 0
        self.limit = limit

    def authenticated(self, max_message_bytes: int) -> None:
        """The peer is a device now: its messages may be as large as the relay reads."""
        self.limit = max_message_bytes + PARSED_AHEAD_BYTES

    def read(self, size: int) -> bool:
        """`size` bytes came from the socket; False once the peer is over its bound."""
        self._unpaid += size
        return self._unpaid <= self.limit

    def taken(self, payload: int) -> None:
        """The session took a message carrying `payload` bytes."""
        self._unpaid = max(0, self._unpaid - payload - FRAMING_PER_MESSAGE)
