"""The relay's half of one device connection, as a pure object: messages in, decisions out.

`RelayProtocol` owns every rule of the conversation: the handshake, the
sealed channel after it (`proto.channel`: a message that does not open ends
the connection), what becomes ACCEPTED or ERROR, the delivery window and its
ACK rule, when the mailbox is fetched again, abuse counting, and when to
close.  It does no I/O, reads no clock and draws no randomness (the nonce,
the ephemeral seed and `now_ms` come in), so every rule is tested frame by
frame without a socket (tests/test_relay_protocol.py).

The shell (`session.py`) follows one contract:

- after every call, write `data_to_send()` in order, then close the
  WebSocket if `close` is set (and stop reading);
- after every message read from the device (`receive`, `receive_non_binary`,
  `receive_control`), read nothing more from it for `read_pause_s()` seconds:
  every message of an authenticated device costs a token of its connection's
  frame rate, and one over it is read more slowly, never refused;
- a call that returns a request (`CheckRate`, `StoreEnvelope`, `RemoveDelivered`,
  `Fetch`) asks for one store call, whose result goes back in through the
  matching method (`rate_checked`, `stored`/`store_refused`, `removed`,
  `fetched`); a store failure goes back through `store_failed` (or, for an
  accept, `store_refused`);
- `Authenticated` asks it to subscribe to the mailbox and watch the key's
  access, then call `wake()`; each wake-up of the store goes in through `wake()`, or
  `pushed()` when it carries the entry appended, which may deliver it at once;
- `RouteStreams` hands the stream router (`streams.router`) what the
  connection's stream rules (`streams.table`) decided: frames for the other
  end of a stream, offers of an open, a pause of this connection's reads.
  The router passes frames from other ends back in through
  `stream_from_peer` (and `stream_unreachable`, `expire_streams`), and the
  shell calls `close_streams` once the socket is gone.

At most one `Fetch` is outstanding at a time: a wake-up that arrives while
one runs is remembered and served when `fetched` reports back.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, auto
from typing import Protocol

import structlog

from proto import Envelope, Identity, PublicKey, decode_envelope
from proto.errors import (DecodeError, OversizeError, ProtocolError, RateLimitedError,
                          StoreUnavailableError, SupersededError, UnauthenticatedError,
                          UnexpectedFrameError)
from proto.channel import ChannelError, FrameOpener, FrameSealer, Layout
from proto.frames import (STREAM_FRAMES, Accepted, Ack, Deliver, Error, Frame, Send, StreamAbort,
                          StreamData, StreamFin, StreamFrame, decode_frame)
from proto.handshake import RelayHandshake

from .access import AccessControl
from .admission import admit, replay_until_ms
from .bucket import Bucket
from .metrics import RelayMetrics
from .presence import ConnectionCounts
from .settings import Settings
from .store import NewEntry, StoredMessage
from .streams.table import (Address, Dropped, Output, Refused, StreamBudget, StreamTable,
                            ToDevice, ToPeer, answer_gone)

CLOSE_NORMAL = 1000
CLOSE_POLICY_VIOLATION = 1008
CLOSE_INTERNAL_ERROR = 1011

# A connection over its frame rate waits for at least this long at a time (50 frames at the
# default 5,000 frames/s), not after every frame: a wait per frame, a timer and an event-loop
# turn each, added a fifth to what a paced flood cost the relay.
MIN_READ_PAUSE_S = 0.01

# PINGs and PONGs a peer may send before its HELLO.  It pays no frame rate yet, so the next
# one is refused as its HELLO: answered without end, a flood of them cost the relay a read
# and a PONG each until the handshake deadline, for a peer that never authenticates.
MAX_CONTROL_BEFORE_HELLO = 8


class VerifyBudget(Protocol):
    """Signature checks this connection's address may still spend on keys the relay does
    not know (`connection_gate.Slot`): a flood of fresh keys is refused before any verify."""

    def is_known(self, key: PublicKey) -> bool: ...

    def take_unknown_key_token(self, now_ms: int) -> bool: ...


@dataclass(frozen=True)
class Authenticated:
    """The device proved `device_key`: subscribe to its mailbox, watch it, then `wake()`."""

    device_key: PublicKey


@dataclass(frozen=True)
class CheckRate:
    """Take one token from the bucket of this connection's device (`store.allow`; not
    of the sender the envelope names, which is checked only after the token), then
    `rate_checked`.  With `metered` False (the oracle's key) neither the bucket nor the
    sender's byte budget applies: call `rate_checked` with allowed True, store with the
    oracle's limits."""

    envelope: Envelope
    metered: bool = True


@dataclass(frozen=True)
class StoreEnvelope:
    """`store.accept` the envelope, then `stored`, or `store_refused` with its error."""

    envelope: Envelope
    replay_until_ms: int


@dataclass(frozen=True)
class RemoveDelivered:
    """`store.ack` the delivery, then `removed` with whether it was still there."""

    tag: str


@dataclass(frozen=True)
class Fetch:
    """`store.fetch` up to `limit` entries after `after`, then `fetched` with them."""

    after: str | None
    limit: int


@dataclass(frozen=True)
class RouteStreams:
    """Hand these stream decisions to the router (`streams.router.StreamRouter.dispatch`);
    a `Pause` among them asks the shell to read nothing from the device for a while."""

    outputs: tuple[Output, ...]


@dataclass(frozen=True)
class Close:
    """Close the WebSocket with this code once `data_to_send()` is written."""

    code: int
    reason: str


class Phase(Enum):
    HANDSHAKE = auto()
    OPEN = auto()
    CLOSED = auto()


Request = Authenticated | CheckRate | RemoveDelivered | RouteStreams


class RelayProtocol:
    """One device connection as the relay sees it; see the module docstring for the contract.

    Most devices sit idle for hours, so the object is small: slots, the handshake
    dropped once done, and the device's logger bound per call, not kept.
    """

    __slots__ = ("_settings", "_access", "_budget", "_metrics", "_relay_log", "_handshake", "_out",
                 "_layout", "_sealer", "_opener", "phase", "device_key", "close", "_invalid_frames",
                 "_probation", "_in_flight", "_cursor", "_asked", "_wanted", "_found_empty",
                 "counts", "_stream_budget", "_streams", "_frames", "_controls_before_hello")

    def __init__(self, identity: Identity, settings: Settings, access: AccessControl,
                 budget: VerifyBudget, metrics: RelayMetrics,
                 log: structlog.typing.FilteringBoundLogger, *, relay_nonce: bytes,
                 ephemeral_seed: bytes, stream_budget: StreamBudget | None = None,
                 layout: Layout = Layout.SEALED) -> None:
        self._settings = settings
        self._layout = layout  # the channel's, as the WebSocket handshake negotiated it
        self._access = access
        self._budget = budget
        self._metrics = metrics
        self._relay_log = log
        self._handshake: RelayHandshake | None = RelayHandshake(
            identity, relay_nonce, ephemeral_seed, settings.limits)
        # The sealed channel's two directions, from WELCOME on.
        self._sealer: FrameSealer | None = None
        self._opener: FrameOpener | None = None
        self._out: list[bytes] = [self._handshake.challenge()]
        self.phase = Phase.HANDSHAKE
        self.device_key: PublicKey | None = None
        self.close: Close | None = None
        self._invalid_frames = 0
        self._controls_before_hello = 0
        self._probation = 0  # SENDs still charged to the address's budget for unknown keys
        # The delivery window: tags sent and not yet acked, and where the next fetch starts.
        self._in_flight: set[str] = set()
        self._cursor: str | None = None
        self._asked = 0  # the limit of the Fetch outstanding, 0 when none is
        self._wanted = False  # the mailbox may hold more than was fetched
        self._found_empty = False  # a fetch from the start found nothing (see `pushed`)
        # This connection's messages, for the oracle's presence reports (`presence`).
        self.counts = ConnectionCounts()
        # Streams: the relay-wide count, and this connection's table, made at its first stream
        # (most connections never carry one, and each byte of an idle connection counts).
        self._stream_budget = stream_budget or StreamBudget(settings.max_streams,
                                                            settings.stream_relay_window_bytes)
        self._streams: StreamTable | None = None
        # The frame rate's bucket, made at the first message after WELCOME (as the table).
        self._frames: Bucket | None = None

    @property
    def _log(self) -> structlog.typing.FilteringBoundLogger:
        if self.device_key is None:
            return self._relay_log
        return self._relay_log.bind(device=self.device_key.text)

    def data_to_send(self) -> list[bytes]:
        """Frames to write now, in order; after each call the list starts empty."""
        out, self._out = self._out, []
        return out

    # -- the device's messages -------------------------------------------------------------

    def receive(self, data: bytes, now_ms: int) -> Request | None:
        """One binary WebSocket message from the device."""
        if self.phase is Phase.HANDSHAKE:
            return self._receive_hello(data, now_ms)
        if self.phase is Phase.CLOSED:
            return None
        self._charge(now_ms)
        assert self._opener is not None
        try:
            # Opened before anything else, an oversize one too: each message counts in the
            # channel, so one refused unopened would break every later one.
            data, detached = self._opener.open(data)
        except ChannelError as exc:
            self._metrics.rejected.labels("channel").inc()
            self._log.warning("channel_broken", detail=exc.message)
            self._emit(Error(None, int(exc.code), exc.message))
            self._close(Close(CLOSE_POLICY_VIOLATION, "channel integrity"))
            return None
        max_frame = self._settings.limits.max_frame_bytes
        if len(data) + len(detached) > max_frame:
            self._reject(None, OversizeError(
                f"frame of {len(data) + len(detached)} bytes exceeds the limit of {max_frame}"))
            return None
        try:
            frame = decode_frame(data, max_frame, detached)
        except ProtocolError as exc:
            self._reject(None, exc)
            return None
        if isinstance(frame, Send):
            try:
                envelope = decode_envelope(frame.envelope, self._settings.limits)
            except ProtocolError as exc:
                self._reject(None, exc)
                return None
            if self._probation > 0:
                self._probation -= 1
                if not self._budget.take_unknown_key_token(now_ms):
                    self._reject(envelope.msg_id, RateLimitedError(
                        "too many signature checks for new keys from this address; retry later"))
                    return None
            # The oracle's pushes (peer lists, configuration) go to the whole fleet at
            # once; a per-device rate would spread one change over minutes (SPEC §10).
            return CheckRate(envelope, metered=self.device_key != self._access.oracle)
        if isinstance(frame, Ack):
            return RemoveDelivered(frame.tag)
        if isinstance(frame, STREAM_FRAMES):
            return self._routed(self._stream_table().from_device(frame, now_ms))
        self._reject(None, UnexpectedFrameError(
            f"a device may send SEND or ACK here, not {type(frame).__name__.upper()}"))
        return None

    def receive_non_binary(self, now_ms: int) -> None:
        """A text message: frames are binary, so this is refused like a bad frame."""
        if self.phase is Phase.HANDSHAKE:
            self._refuse_handshake(UnauthenticatedError("expected a binary HELLO frame"),
                                   "not_binary")
        elif self.phase is Phase.OPEN:
            self._charge(now_ms)
            self._reject(None, DecodeError("frames must be binary WebSocket messages"))

    def receive_control(self, now_ms: int) -> bool:
        """A WebSocket PING or PONG; True if the shell answers it (a PING, with a PONG).
        Cheap, but read and answered all the same: an authenticated device pays for it like
        for any frame, and before HELLO only MAX_CONTROL_BEFORE_HELLO are taken."""
        if self.phase is Phase.HANDSHAKE:
            self._controls_before_hello += 1
            if self._controls_before_hello > MAX_CONTROL_BEFORE_HELLO:
                self._refuse_handshake(UnauthenticatedError(
                    f"expected a binary HELLO frame after at most {MAX_CONTROL_BEFORE_HELLO}"
                    " PINGs or PONGs"), "not_binary")
                return False
            return True
        if self.phase is Phase.OPEN:
            self._charge(now_ms)
            return True
        return False

    def read_pause_s(self) -> float:
        """Seconds the shell waits before reading the device's next message: how far the
        messages read so far put the connection over its frame rate, once that is at least
        `MIN_READ_PAUSE_S` (0: within it, or not that far yet)."""
        debt_s = self._frames.debt_s() if self._frames is not None else 0.0
        return debt_s if debt_s >= MIN_READ_PAUSE_S else 0.0

    def _charge(self, now_ms: int) -> None:
        """One message of an authenticated device: a token of its connection's bucket
        (`frames_per_s`, burst `frame_burst`), taken into debt when there is none.

        The abuse count closes a device only for refused frames, the SEND rate counts only
        SENDs and the stream byte rate only chunk bytes; ACKs, credit, frames for ended
        streams and PINGs each cost a decode and often an answer, so without this a device
        could make the relay handle some 30,000 of them a second, a whole core.  Paced, not
        refused: a device within its rate never notices, and one beyond it only slows.
        """
        frames = self._frames
        if frames is None:
            settings = self._settings
            frames = self._frames = Bucket(settings.frames_per_s, settings.frame_burst)
        if frames.borrow(1, now_ms) > 0:
            self._metrics.frames_over_rate.inc()

    def handshake_timed_out(self, timeout_s: float) -> None:
        """No HELLO arrived within the deadline the shell enforces."""
        if self.phase is Phase.HANDSHAKE:
            self._refuse_handshake(UnauthenticatedError(f"no HELLO within {timeout_s}s"),
                                   "timeout")

    def connection_lost(self) -> None:
        """The socket is gone: nothing more is sent, fetched or decided."""
        self.phase = Phase.CLOSED

    def _receive_hello(self, data: bytes, now_ms: int) -> Authenticated | None:
        handshake = self._handshake
        assert handshake is not None
        try:
            claimed = handshake.read_hello(data)
            if not self._budget.is_known(claimed):
                if not self._budget.take_unknown_key_token(now_ms):
                    self._refuse_handshake(RateLimitedError(
                        "too many handshakes of new keys from this address; retry later"),
                        "unknown_key_budget")
                    return None
                self._probation = self._settings.probation_sends
            key = handshake.verify_hello()
        except ProtocolError as exc:
            self._refuse_handshake(exc, exc.code.name.lower())
            return None
        refusal = self._access.refusal(key)
        if refusal is not None:
            self._refuse_handshake(refusal, refusal.code.name.lower())
            return None
        welcome, terms = handshake.welcome(now_ms)
        self._out.append(welcome)
        sealer, opener = terms.channel.for_relay()
        self._sealer = FrameSealer(sealer, self._layout)
        self._opener = FrameOpener(opener, self._layout)
        self._handshake = None
        self.device_key = key
        self.phase = Phase.OPEN
        return Authenticated(key)

    def evicted(self) -> None:
        """Still in its handshake, this connection lost its place to a newer one from its
        address (the pending-handshake cap per address)."""
        if self.phase is Phase.HANDSHAKE:
            self._refuse_handshake(UnauthenticatedError(
                "too many pending handshakes from this address; this one was the oldest"),
                "evicted")

    def _refuse_handshake(self, error: ProtocolError, reason: str) -> None:
        assert self._handshake is not None
        self._metrics.handshake_failures.labels(reason).inc()
        self._log.info("handshake_refused", reason=reason, detail=error.message)
        self._out.append(self._handshake.refuse(error))
        self._close(Close(CLOSE_POLICY_VIOLATION, "unauthenticated"))

    # -- sending: rate check, admission, store ---------------------------------------------

    def rate_checked(self, envelope: Envelope, allowed: bool, now_ms: int) -> StoreEnvelope | None:
        """The sender's bucket answered; admit the envelope (signature, clock, access) or refuse."""
        if self.phase is not Phase.OPEN:
            return None
        assert self.device_key is not None
        settings = self._settings
        try:
            if not allowed:
                raise RateLimitedError(
                    f"more than {settings.rate_per_s:g} messages/s (burst {settings.rate_burst})")
            admit(envelope, self.device_key, now_ms, settings, self._metrics.verify_seconds.observe)
            self._access.check_send(self.device_key, envelope.recipient_keys)
        except ProtocolError as exc:
            self._reject(envelope.msg_id, exc)
            return None
        return StoreEnvelope(envelope, replay_until_ms(envelope, settings))

    def stored(self, msg_id: bytes) -> None:
        """The store holds every recipient's copy: only now may the device hear ACCEPTED."""
        if self.phase is Phase.OPEN:
            self._metrics.accepted.inc()
            self.counts.sent += 1
            self._emit(Accepted(msg_id))

    def store_refused(self, msg_id: bytes, error: ProtocolError) -> None:
        """The store refused the envelope (replay, full mailbox, outage): nothing was stored.

        An outage is never the device's fault, so it does not count toward abuse.
        """
        if self.phase is Phase.OPEN:
            self._reject(msg_id, error, abuse=not isinstance(error, StoreUnavailableError))

    # -- delivering: the window and the ACK rule -------------------------------------------

    def wake(self) -> Fetch | None:
        """The mailbox may have grown (or the window opened): the fetch to run now, if any."""
        self._wanted = True
        if self.phase is not Phase.OPEN or self._asked:
            return None
        return self._next_fetch()

    def pushed(self, entry: NewEntry) -> Fetch | None:
        """A wake-up that carries the entry just appended: DELIVER it now if it is the one
        the next fetch would return first, else the fetch to run, as for `wake`.

        It is when no fetch is outstanding (its batch could hold this entry too, or
        entries before it), the window has room, and no entry this connection has not
        delivered can lie before it: the entry before it in the mailbox (`previous`) is
        the last this connection delivered (`_cursor`), or this connection delivered
        nothing yet and found the mailbox empty.  (An entry appended since that fetch woke
        it before this one did, in append order; one whose wake-up was lost, or came
        before the store registered the subscription, is fetched by the wake-up the store
        gives then.)  A fetch already past the entry has moved the cursor beyond
        `previous` too, so nothing is delivered twice.
        """
        follows = entry.previous == self._cursor or (self._cursor is None and self._found_empty)
        if (self.phase is not Phase.OPEN or self._asked or self._wanted or not follows
                or len(self._in_flight) >= self._settings.delivery_window):
            return self.wake()
        self._in_flight.add(entry.tag)
        self._cursor = entry.tag
        self._emit(Deliver(entry.tag, entry.raw))
        self._metrics.delivered.inc()
        self._metrics.delivered_from_wakeups.inc()
        return None

    def fetched(self, batch: list[StoredMessage]) -> Fetch | None:
        """Entries the last `Fetch` returned, oldest first: DELIVER them; the next fetch, if any.

        Only a batch that filled what was asked can have left entries behind; a
        shorter one reached the mailbox's end, and mail stored after that read
        wakes us (a wake during the fetch is kept in `_wanted`).
        """
        asked, self._asked = self._asked, 0
        if self.phase is not Phase.OPEN:
            return None
        if not batch and self._cursor is None:
            self._found_empty = True
        if batch:
            self._in_flight.update(entry.tag for entry in batch)
            self._cursor = batch[-1].tag
            for entry in batch:
                self._emit(Deliver(entry.tag, entry.raw))
            self._metrics.delivered.inc(len(batch))
        if len(batch) >= asked:
            self._wanted = True
        return self._next_fetch()

    def removed(self, tag: str, existed: bool) -> Fetch | None:
        """The store acted on an ACK; `existed` is False if it was already gone (acked, expired)."""
        if existed:
            self._metrics.acked.inc()
            self.counts.received += 1
        if tag not in self._in_flight:
            return None
        # Only a full window can have stopped the last fetch short of the mailbox's end;
        # otherwise new mail wakes us anyway, and a fetch per ACK would be wasted.
        window_was_full = len(self._in_flight) >= self._settings.delivery_window
        self._in_flight.discard(tag)
        return self.wake() if window_was_full else None

    def _next_fetch(self) -> Fetch | None:
        if not self._wanted:
            return None
        self._wanted = False
        room = self._settings.delivery_window - len(self._in_flight)
        if room <= 0:
            return None  # the ACK that opens the window wakes us
        self._asked = room
        return Fetch(self._cursor, room)

    # -- streams: the rules are the table's, this connection only seals and counts ---------

    def stream_from_peer(self, frame: StreamFrame, origin: Address, peer: PublicKey,
                         now_ms: int) -> tuple[Output, ...]:
        """A frame from the other half of a stream; what the router must pass on."""
        if self.phase is not Phase.OPEN:  # it came as this connection went away
            return tuple(answer_gone(frame, origin, peer, "the peer's connection just closed",
                                     self._settings.limits))
        return self._kept(self._stream_table().from_peer(frame, origin, peer, now_ms))

    def stream_unreachable(self, stream_id: bytes) -> tuple[Output, ...]:
        """No connection of the peer took this connection's open."""
        if self._streams is None or self.phase is not Phase.OPEN:
            return ()
        return self._kept(self._streams.unreachable(stream_id))

    def expire_streams(self, now_ms: int) -> tuple[Output, ...]:
        """End the opens that waited past their deadline, pass on held credit (the router
        ticks connections whose streams need it)."""
        if self._streams is None or self.phase is not Phase.OPEN:
            return ()
        return self._kept(self._streams.expire(now_ms))

    def abort_streams_via(self, here: str, replica: str | None,
                          reason: str) -> tuple[Output, ...]:
        """End the streams whose other half is on another replica the path to which failed."""
        if self._streams is None or self.phase is not Phase.OPEN:
            return ()
        return self._kept(self._streams.abort_via(here, replica, reason))

    @property
    def has_streams(self) -> bool:
        """Streams are open or opening on this connection."""
        return bool(self._streams)

    def recheck_streams(self) -> tuple[Output, ...]:
        """End the streams the access list now in force no longer allows."""
        if self._streams is None or self.phase is not Phase.OPEN:
            return ()
        return self._kept(self._streams.recheck())

    @property
    def streams_need_tick(self) -> bool:
        return self._streams is not None and self._streams.needs_tick

    def close_streams(self) -> tuple[Output, ...]:
        """The socket is gone: the other end of each stream must hear so."""
        streams, self._streams = self._streams, None
        return tuple(streams.closed()) if streams is not None else ()

    def _stream_table(self) -> StreamTable:
        if self._streams is None:
            assert self.device_key is not None
            self._streams = StreamTable(self.device_key, self._settings, self._access,
                                        self._stream_budget)
        return self._streams

    def _routed(self, outputs: list[Output]) -> RouteStreams | None:
        kept = self._kept(outputs)
        for output in kept:
            if isinstance(output, ToPeer) and isinstance(output.frame, (StreamData, StreamFin)):
                self._metrics.stream_bytes.inc(len(output.frame.chunk))
        return RouteStreams(kept) if kept else None

    def _kept(self, outputs: list[Output]) -> tuple[Output, ...]:
        """Act on what concerns this device (frames to write, refusals, counts); return the
        rest, for the router."""
        kept: list[Output] = []
        for output in outputs:
            if isinstance(output, ToDevice):
                self._emit(output.frame)
            elif isinstance(output, Refused):
                self._refuse_stream(output)
            elif isinstance(output, Dropped):
                self._metrics.stream_frames_dropped.labels(output.reason).inc()
            else:
                kept.append(output)
        return tuple(kept)

    def _refuse_stream(self, refused: Refused) -> None:
        """Like `_reject`, but a refusal about a stream is that stream's STREAM_ABORT."""
        if refused.stream_id is None:
            self._reject(None, refused.error, abuse=refused.abuse)
            return
        error = refused.error
        if refused.abuse:
            self._invalid_frames += 1
        self._metrics.rejected.labels(error.code.name.lower()).inc()
        self._log.debug("stream_refused", reason=error.code.name.lower(), detail=error.message)
        self._emit(StreamAbort(refused.stream_id, int(error.code), error.message))
        if self._invalid_frames >= self._settings.max_invalid_frames:
            self._log.warning("closing_abusive_connection", invalid=self._invalid_frames)
            self._close(Close(CLOSE_POLICY_VIOLATION, "too many invalid frames"))

    # -- endings ---------------------------------------------------------------------------

    def store_failed(self, error: ProtocolError) -> None:
        """A fetch or ACK could not reach the store: close (1011) so the device reconnects
        with backoff and its mailbox is read afresh; nothing in it is lost."""
        self._asked = 0
        if self.phase is Phase.OPEN:
            self._log.warning("delivery_failed", error=error.message)
            self._close(Close(CLOSE_INTERNAL_ERROR, "mailbox store unavailable"))

    def superseded(self) -> None:
        """A newer connection of this key authenticated: this one ends (`max_connections_per_key`)."""
        if self.phase is Phase.OPEN:
            error = SupersededError("another connection authenticated with this key")
            self._log.info("session_superseded")
            self._emit(Error(None, int(error.code), error.message))
            self._close(Close(CLOSE_NORMAL, "superseded"))

    def write_stalled(self, timeout_s: float) -> None:
        """Frames waited `timeout_s` for a device that reads nothing: stop holding them."""
        if self.phase is not Phase.CLOSED:
            self._log.info("closing_stalled_reader", timeout_s=timeout_s)
            self._close(Close(CLOSE_POLICY_VIOLATION, "device stopped reading"))

    def revoked(self, error: ProtocolError) -> None:
        """A newer access list refuses this key, or moved its mailbox to another region
        (STORE_UNAVAILABLE: the device reconnects, 1011, and is served from there): end the
        connection now, not at reconnect."""
        if self.phase is Phase.OPEN:
            self._log.info("session_closed_by_access_list", reason=error.code.name.lower())
            self._emit(Error(None, int(error.code), error.message))
            moved = isinstance(error, StoreUnavailableError)
            self._close(Close(CLOSE_INTERNAL_ERROR if moved else CLOSE_POLICY_VIOLATION,
                              error.code.name))

    def _reject(self, msg_id: bytes | None, error: ProtocolError, abuse: bool = True) -> None:
        """Answer one bad frame or refused envelope with ERROR; too many of them is abuse."""
        if abuse:
            self._invalid_frames += 1
        reason = error.code.name.lower()
        self._metrics.rejected.labels(reason).inc()
        self.counts.refused += 1
        self._log.debug("rejected", reason=reason, detail=error.message)
        self._emit(Error(msg_id, int(error.code), error.message))
        if self._invalid_frames >= self._settings.max_invalid_frames:
            self._log.warning("closing_abusive_connection", invalid=self._invalid_frames)
            self._close(Close(CLOSE_POLICY_VIOLATION, "too many invalid frames"))

    def _emit(self, frame: Frame) -> None:
        """Queue one frame in the sealed channel (only ever called once it is open)."""
        assert self._sealer is not None
        self._out.append(self._sealer.seal(frame))

    def _close(self, close: Close) -> None:
        if self.close is None:
            self.close = close
        self.phase = Phase.CLOSED
