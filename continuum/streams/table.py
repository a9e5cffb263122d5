"""The stream rules of one device connection, as a pure object: frames in, decisions out.

A stream has two *halves*, one at each end's connection (on one relay
process, or on two replicas).  `StreamTable` holds the halves of one
connection and decides everything about them:

- **who may open what.**  A STREAM_OPEN is verified like a SEND (`admit`:
  the connection's own key, signature, clock) and must name one recipient
  that the access list lets the device write to (`check_send`: peers only,
  where the relay knows peer groups).  A STREAM_ACCEPT must come from the
  device the open was offered to, sealed to the opener alone.  The relay
  cannot read either envelope; the frame type tells it what they are.
- **credits.**  A device may send only the chunk bytes the other end granted
  (the window in OPEN or ACCEPT, then STREAM_CREDIT); this half checks what
  its device sends against that.  What a device grants is passed on only
  within two pools, of *exposure*: credit passed on toward a device minus
  what the device has since read (which it tells by granting it back), i.e.
  what may be on its way to it or waiting in a buffer, plus credit not yet
  used; summed over one connection's streams (`stream_connection_window_bytes`)
  and over all connections of the relay process (`stream_relay_window_bytes`).
  The rest waits here, as a number, and is passed on as the device reads (or,
  for the relay-wide pool, at the next tick).  So what this relay, Redis or
  another replica may hold for a device is bounded per connection and per
  relay, however many streams it has and however little it reads; a receiver
  with many streams shares the pool between them.
- **bounds.**  Open streams per device and per relay process (`StreamBudget`),
  pending opens per device and their deadline, the rate of opens, and a byte
  rate per connection, enforced by pausing the connection's reads (`Pause`)
  so a fast sender slows down instead of losing its stream.
- **endings.**  A stream ends when both directions sent STREAM_FIN, or on
  STREAM_ABORT from either end, a broken rule, a deadline, or when either
  connection closes: the other end is then told why (STREAM_ABORT with a
  SPEC §9 code), never left waiting.

Frames are relayed live and never stored.  No I/O, no clock read: `now_ms`
comes in, and every decision comes out as a list of outputs the caller acts
on in order (`ToDevice`, `ToPeer`, `Offer`, `Withdraw`, `Refused`, `Dropped`,
`Pause`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import Enum, auto
from typing import Protocol

from proto import Envelope, Limits, PublicKey, decode_envelope
from proto.errors import (ErrorCode, InvalidFieldError, PeerUnreachableError, ProtocolError,
                          RateLimitedError, StreamBrokenError, StreamLimitError,
                          UnexpectedFrameError)
from proto.frames import (StreamAbort, StreamAccept, StreamCredit, StreamData, StreamFin,
                          StreamFrame, StreamOpen)

from ..admission import admit
from ..bucket import Bucket
from ..settings import Settings


@dataclass(frozen=True, order=True, slots=True)
class Address:
    """Where one half lives: a relay process (`replica`) and a connection in it."""

    replica: str
    connection: int


class SendCheck(Protocol):
    """The access list's rule for who may write to whom (`AccessControl.check_send`)."""

    def check_send(self, sender: PublicKey, recipients: tuple[PublicKey, ...]) -> None: ...


class StreamBudget:
    """What one relay process's streams hold, all connections together: halves open
    (`max_streams`) and credit passed on toward devices (`stream_relay_window_bytes`)."""

    __slots__ = ("limit", "open", "credit_limit", "credit")

    def __init__(self, limit: int, credit_limit: int) -> None:
        self.limit, self.open = limit, 0
        self.credit_limit, self.credit = credit_limit, 0


class Phase(Enum):
    OPENING = auto()  # this device opened it; waiting for the answer
    OFFERED = auto()  # offered to this device; waiting for its answer
    OPEN = auto()


class Half:
    """One end of a stream as this connection's relay sees it."""

    __slots__ = ("peer", "phase", "route", "deadline_ms", "may_send", "may_receive",
                 "exposure", "held", "sent_fin", "received_fin")

    def __init__(self, peer: PublicKey, phase: Phase, route: Address | None, deadline_ms: int,
                 *, may_send: int = 0) -> None:
        self.peer, self.phase, self.route, self.deadline_ms = peer, phase, route, deadline_ms
        self.may_send = may_send  # chunk bytes this device may still send (granted to it)
        self.may_receive = 0  # credit passed on to the other end and not yet used
        self.exposure = 0  # credit passed on minus what the device has read since
        self.held = 0  # credit this device granted that waits here for room in the pools
        self.sent_fin = self.received_fin = False


@dataclass(frozen=True)
class ToDevice:
    """Write this frame to this connection's device."""

    frame: StreamFrame


@dataclass(frozen=True)
class ToPeer:
    """Pass this frame to the other half, at `route`, the half of device `peer`."""

    route: Address
    peer: PublicKey
    frame: StreamFrame


@dataclass(frozen=True)
class Offer:
    """Offer this open to every connection of `peer`, on any replica; if none holds it, call
    `unreachable` with the stream id."""

    peer: PublicKey
    frame: StreamOpen
    stream_id: bytes


@dataclass(frozen=True)
class Withdraw:
    """Tell every connection of `peer`, on any replica, that this device's open is withdrawn
    (`frame`, a STREAM_ABORT): whichever took it ends its half.  For an open whose answer
    may have been lost on the way, so this end cannot say where the half that answered is."""

    peer: PublicKey
    frame: StreamAbort


@dataclass(frozen=True)
class Refused:
    """The device broke a rule or hit a bound: answer it with STREAM_ABORT (or, without a
    usable stream id, ERROR); `abuse` counts toward the connection's limit of refusals."""

    stream_id: bytes | None
    error: ProtocolError
    abuse: bool


@dataclass(frozen=True)
class Dropped:
    """A frame for a stream that has already ended (it crossed the end): dropped, counted."""

    reason: str


@dataclass(frozen=True)
class Pause:
    """Read nothing more from this device for `seconds` (its byte rate is spent)."""

    seconds: float


Output = ToDevice | ToPeer | Offer | Withdraw | Refused | Dropped | Pause

_DATA_FRAMES = (StreamData, StreamFin)


def refuse_offer(frame: StreamOpen, origin: Address, opener: PublicKey, error: ProtocolError,
                 limits: Limits) -> list[Output]:
    """Tell the opener's half, at `origin`, that this offer cannot be taken, and why."""
    try:
        stream_id = decode_envelope(frame.envelope, limits).msg_id
    except ProtocolError:
        return [Dropped("bad_offer")]  # no relay offers what it could not decode
    return [ToPeer(origin, opener, StreamAbort(stream_id, int(error.code), error.message))]


def answer_gone(frame: StreamFrame, origin: Address, sender: PublicKey, reason: str,
                limits: Limits) -> list[Output]:
    """What the half at `origin` hears when its frame finds this end gone: an offer is
    refused (PEER_UNREACHABLE), any other frame but an abort ends its stream
    (STREAM_BROKEN).  Silence would leave that half open for good: an ACCEPT swallowed by a
    connection closing held the acceptor's stream slot and its tunnel's TCP connection."""
    if isinstance(frame, StreamOpen):
        return refuse_offer(frame, origin, sender, PeerUnreachableError(reason), limits)
    if isinstance(frame, StreamAbort):
        return []
    return [ToPeer(origin, sender, StreamAbort(frame.stream_id, int(ErrorCode.STREAM_BROKEN),
                                               reason))]


class StreamTable:
    """The halves of one authenticated connection; see the module docstring."""

    __slots__ = ("_device", "_settings", "_access", "_budget", "_halves", "_opens", "_bytes",
                 "_exposure", "_holding", "_waiting")

    def __init__(self, device: PublicKey, settings: Settings, access: SendCheck,
                 budget: StreamBudget) -> None:
        self._device, self._settings, self._access, self._budget = (
            device, settings, access, budget)
        self._halves: dict[bytes, Half] = {}
        self._opens = Bucket(settings.stream_opens_per_s, settings.stream_open_burst)
        self._bytes = Bucket(settings.stream_bytes_per_s, settings.stream_burst_bytes)
        self._exposure = 0  # the exposure of this device's streams, together
        self._holding: deque[bytes] = deque()  # streams with credit held back, oldest first
        self._waiting = 0  # halves waiting for an answer

    def __len__(self) -> int:
        return len(self._halves)

    @property
    def pending(self) -> int:
        """Halves waiting for an answer (each has a deadline: `expire`)."""
        return self._waiting

    @property
    def needs_tick(self) -> bool:
        """Opens wait for an answer, or credit waits for room in the relay-wide pool: the
        caller calls `expire` now and then (the router's ticker)."""
        return bool(self._waiting or self._holding)

    def half(self, stream_id: bytes) -> Half | None:
        return self._halves.get(stream_id)

    # -- frames from this connection's device ----------------------------------------------

    def from_device(self, frame: StreamFrame, now_ms: int) -> list[Output]:
        return self._released(self._from_device(frame, now_ms))

    def _released(self, out: list[Output]) -> list[Output]:
        """After anything that may have freed room in the pools: pass on held credit."""
        if self._holding:
            out += self._release()
        return out

    def _from_device(self, frame: StreamFrame, now_ms: int) -> list[Output]:
        if isinstance(frame, StreamOpen):
            return self._open(frame, now_ms)
        half = self._halves.get(frame.stream_id)
        if half is None:
            # It ended (an abort crossed this frame, or a deadline passed): nothing to do.
            return [Dropped("stream_ended")]
        if isinstance(frame, StreamAbort):
            return self._end(frame.stream_id, half, to_peer=frame)
        if isinstance(frame, StreamAccept):
            return self._accept(frame, half, now_ms)
        if isinstance(frame, StreamCredit):
            return self._grant(frame, half)
        return self._send(frame, half, now_ms)

    def _open(self, frame: StreamOpen, now_ms: int) -> list[Output]:
        settings = self._settings
        try:
            envelope = decode_envelope(frame.envelope, settings.limits)
        except ProtocolError as exc:
            return [Refused(None, exc, abuse=True)]
        stream_id = envelope.msg_id
        if stream_id in self._halves:
            return [Refused(None, InvalidFieldError(
                "a stream with this id is open on this connection: a stream's id is its open"
                " envelope's msg_id, drawn at random"), abuse=True)]
        try:
            peer = self._check_open(envelope, now_ms)
        except ProtocolError as exc:
            limit = isinstance(exc, (StreamLimitError, RateLimitedError))
            return [Refused(stream_id, exc, abuse=not limit)]
        half = Half(peer, Phase.OPENING, None,
                    now_ms + int(settings.stream_open_timeout_s * 1000))
        self._add(stream_id, half)
        window = self._pass(stream_id, half, self._bounded(frame.window))
        return [Offer(peer, StreamOpen(window, frame.envelope), stream_id)]

    def _check_open(self, envelope: Envelope, now_ms: int) -> PublicKey:
        """Raise why this open may not go out; the peer it goes to if it may.  Cheap checks
        and bounds first, so a flood costs no signature checks beyond the open rate."""
        settings = self._settings
        if len(envelope.recipients) != 1:
            raise InvalidFieldError("a stream open names exactly one recipient, the other end")
        peer = envelope.recipients[0].key
        if peer == self._device:
            raise InvalidFieldError("a stream needs another device at its other end")
        if len(self._halves) >= settings.max_streams_per_device:
            raise StreamLimitError(f"this device has {len(self._halves)} streams open or"
                                   f" opening, the most a relay allows")
        if self.pending >= settings.max_pending_streams_per_device:
            raise StreamLimitError(f"this device waits for {self.pending} answers already")
        if self._budget.open >= self._budget.limit:
            raise StreamLimitError("this relay carries as many streams as it may; retry later"
                                   " or at another relay")
        if not self._opens.try_take(1, now_ms):
            raise RateLimitedError(f"more than {settings.stream_opens_per_s:g} stream opens/s"
                                   f" (burst {settings.stream_open_burst})")
        admit(envelope, self._device, now_ms, settings)
        self._access.check_send(self._device, (peer,))
        return peer

    def _bounded(self, window: int) -> int:
        """A window above this relay's bound is lowered to it: the other end gets less credit
        to start with, which the granting end never notices (it only checks that it does not
        receive more than it granted)."""
        return min(window, self._settings.max_stream_window_bytes)

    def _accept(self, frame: StreamAccept, half: Half, now_ms: int) -> list[Output]:
        if half.phase is not Phase.OFFERED:
            return self._break(frame.stream_id, half, UnexpectedFrameError(
                "STREAM_ACCEPT answers an open offered to this device, once"))
        try:
            envelope = decode_envelope(frame.envelope, self._settings.limits)
            if envelope.recipient_keys != (half.peer,):
                raise InvalidFieldError("a stream answer is sealed to the opener alone")
            admit(envelope, self._device, now_ms, self._settings)
            self._access.check_send(self._device, (half.peer,))
        except ProtocolError as exc:
            return self._break(frame.stream_id, half, exc)
        self._opened(half)
        window = self._pass(frame.stream_id, half, self._bounded(frame.window))
        assert half.route is not None
        return [ToPeer(half.route, half.peer, StreamAccept(frame.stream_id, window,
                                                           frame.envelope))]

    def _grant(self, frame: StreamCredit, half: Half) -> list[Output]:
        if half.phase is not Phase.OPEN:
            return self._break(frame.stream_id, half, UnexpectedFrameError(
                "STREAM_CREDIT before the stream is open (the window goes in OPEN or ACCEPT)"))
        if half.received_fin:
            return [Dropped("credit_after_fin")]  # nothing more will come that needs it
        outstanding = half.may_receive + half.held + frame.credit
        if outstanding > self._settings.max_stream_window_bytes:
            return self._break(frame.stream_id, half, InvalidFieldError(
                f"credit outstanding would be {outstanding} bytes, above this relay's"
                f" window bound of {self._settings.max_stream_window_bytes}"))
        # What the device read is off the path; it can have read only what reached it, the
        # exposure less the credit the other end has not used yet.  (Counting the whole grant
        # let a device that granted unused credit back free its pool for ever more credit.)
        self._unexpose(half, min(frame.credit, half.exposure - half.may_receive))
        passed = self._pass(frame.stream_id, half, frame.credit)
        assert half.route is not None
        out: list[Output] = []
        if passed:
            out.append(ToPeer(half.route, half.peer, StreamCredit(frame.stream_id, passed)))
        return out

    def _send(self, frame: StreamData | StreamFin, half: Half, now_ms: int) -> list[Output]:
        if half.phase is not Phase.OPEN or half.sent_fin:
            return self._break(frame.stream_id, half, UnexpectedFrameError(
                "stream data before the answer or after this direction's FIN"))
        size = len(frame.chunk)
        if size > half.may_send:
            return self._break(frame.stream_id, half, StreamBrokenError(
                f"a chunk of {size} bytes with {half.may_send} bytes of credit: a sender waits"
                " for STREAM_CREDIT"))
        half.may_send -= size
        assert half.route is not None
        out: list[Output] = [ToPeer(half.route, half.peer, frame)]
        if isinstance(frame, StreamFin):
            half.sent_fin = True
            if half.received_fin:
                self._remove(frame.stream_id)
        wait_s = self._bytes.borrow(size, now_ms)
        if wait_s > 0:
            out.append(Pause(wait_s))
        return out

    # -- frames from the other half ---------------------------------------------------------

    def from_peer(self, frame: StreamFrame, origin: Address, peer: PublicKey,
                  now_ms: int) -> list[Output]:
        """A frame the other half (at `origin`, for device `peer`) passed on."""
        return self._released(self._from_peer(frame, origin, peer, now_ms))

    def _from_peer(self, frame: StreamFrame, origin: Address, peer: PublicKey,
                   now_ms: int) -> list[Output]:
        if isinstance(frame, StreamOpen):
            return self._offered(frame, origin, peer, now_ms)
        half = self._halves.get(frame.stream_id)
        if isinstance(frame, StreamAccept):
            if half is None or half.phase is not Phase.OPENING or half.peer != peer:
                # The opener gave up, or another connection of the peer answered first.
                return [ToPeer(origin, peer, StreamAbort(
                    frame.stream_id, int(ErrorCode.STREAM_BROKEN),
                    "the opener no longer waits for this answer"))]
            self._opened(half)
            half.route, half.may_send = origin, frame.window
            return [ToDevice(frame)]
        if half is None or half.peer != peer or (half.route is not None and half.route != origin):
            return [Dropped("stream_ended")]
        if isinstance(frame, StreamAbort):
            self._remove(frame.stream_id)
            return [ToDevice(frame)]
        if half.phase is not Phase.OPEN:
            return [Dropped("stream_not_open")]
        if isinstance(frame, StreamCredit):
            if half.sent_fin:
                return [Dropped("credit_after_fin")]
            half.may_send += frame.credit
            return [ToDevice(frame)]
        return self._receive(frame, half)

    def _offered(self, frame: StreamOpen, origin: Address, opener: PublicKey,
                 now_ms: int) -> list[Output]:
        settings = self._settings
        try:
            stream_id = decode_envelope(frame.envelope, settings.limits).msg_id
        except ProtocolError:
            return [Dropped("bad_offer")]  # the opener's relay verified it: not from one
        refusal: ProtocolError | None = None
        if stream_id in self._halves:
            refusal = StreamBrokenError("a stream with this id is open at the peer")
        elif len(self._halves) >= settings.max_streams_per_device:
            refusal = StreamLimitError("the peer has as many streams as a relay allows")
        elif self.pending >= settings.max_pending_streams_per_device:
            refusal = StreamLimitError("the peer has as many opens waiting as a relay allows")
        elif self._budget.open >= self._budget.limit:
            refusal = StreamLimitError("the peer's relay carries as many streams as it may")
        if refusal is not None:
            return refuse_offer(frame, origin, opener, refusal, settings.limits)
        self._add(stream_id, Half(opener, Phase.OFFERED, origin,
                                  now_ms + int(settings.stream_open_timeout_s * 1000),
                                  may_send=frame.window))
        return [ToDevice(frame)]

    def _receive(self, frame: StreamData | StreamFin, half: Half) -> list[Output]:
        size = len(frame.chunk)
        if size > half.may_receive or half.received_fin:
            # Only a relay that broke the rules lets this through: end it at both ends.
            return self._break(frame.stream_id, half, StreamBrokenError(
                "the other end sent beyond the credit it was given"), abuse=False)
        half.may_receive -= size  # on its way to the device: exposed until it reads it
        if isinstance(frame, StreamFin):
            half.received_fin = True
            if half.sent_fin:
                self._remove(frame.stream_id)
        return [ToDevice(frame)]

    def unreachable(self, stream_id: bytes) -> list[Output]:
        """No connection of the peer took the offer: the open fails at once."""
        half = self._halves.get(stream_id)
        if half is None or half.phase is not Phase.OPENING:
            return []
        self._remove(stream_id)
        error = PeerUnreachableError(f"{half.peer.text} is not connected to any relay here")
        return self._released([ToDevice(StreamAbort(stream_id, int(error.code),
                                                    error.message))])

    # -- time and endings -------------------------------------------------------------------

    def expire(self, now_ms: int) -> list[Output]:
        """End every open still unanswered at its deadline, telling both ends; pass on held
        credit the relay-wide pool has room for again (another connection freed it)."""
        out: list[Output] = []
        timeout_s = self._settings.stream_open_timeout_s
        for stream_id, half in list(self._halves.items()):
            if half.phase is Phase.OPEN or half.deadline_ms > now_ms:
                continue
            self._remove(stream_id)
            if half.phase is Phase.OPENING:
                out.append(ToDevice(StreamAbort(
                    stream_id, int(ErrorCode.PEER_UNREACHABLE),
                    f"{half.peer.text} did not answer within {timeout_s:g}s")))
            else:
                out.append(ToDevice(StreamAbort(
                    stream_id, int(ErrorCode.STREAM_BROKEN),
                    f"this device did not answer the open within {timeout_s:g}s")))
                assert half.route is not None
                out.append(ToPeer(half.route, half.peer, StreamAbort(
                    stream_id, int(ErrorCode.PEER_UNREACHABLE),
                    f"the peer did not answer within {timeout_s:g}s")))
        return self._released(out)

    def closed(self) -> list[Output]:
        """The connection is gone: every other end hears so, and this table is emptied."""
        out: list[Output] = []
        for stream_id, half in list(self._halves.items()):
            self._remove(stream_id)
            if half.route is not None:
                out.append(ToPeer(half.route, half.peer, StreamAbort(
                    stream_id, int(ErrorCode.STREAM_BROKEN),
                    f"{self._device.text}'s connection to its relay closed")))
        return out

    def abort_via(self, here: str, replica: str | None, reason: str) -> list[Output]:
        """End every stream whose other half is on `replica` (None: on any other replica than
        `here`): frames between them may have been lost, and a lost credit would stall it.
        The other half is sent the abort too: a replica that lost only its subscription
        still publishes, and a gone one hears nothing, harmlessly.

        When the whole path is lost (None), so may be the answer to an open still waiting
        for one: the half that sent it would stay open for good, never hearing from this
        end, holding a stream slot (and a tunnel's TCP connection).  Such opens end too,
        withdrawn from wherever they were taken, since this end does not know where."""
        out: list[Output] = []
        for stream_id, half in list(self._halves.items()):
            route = half.route
            abort = StreamAbort(stream_id, int(ErrorCode.STREAM_BROKEN), reason)
            if route is None:  # this device's open, waiting for its answer
                if replica is None:
                    self._remove(stream_id)
                    out += [ToDevice(abort), Withdraw(half.peer, abort)]
                continue
            if route.replica == here or replica not in (None, route.replica):
                continue
            self._remove(stream_id)
            out += [ToDevice(abort), ToPeer(route, half.peer, abort)]
        return self._released(out)

    def recheck(self) -> list[Output]:
        """The access list changed: end every stream whose two ends it no longer lets write
        to each other, at both ends, with its reason (REVOKED, NOT_PEER, ...).  An open is
        checked as a SEND is, but a SEND is over at once and a stream lasts: a key that is
        only draining may fetch its mailbox and nothing else (SPEC §15), yet its tunnels
        ran on for as long as its connection lived.  (An open still unanswered ends here
        alone: the half offered it ends at its own relay, under the same list.)"""
        out: list[Output] = []
        for stream_id, half in list(self._halves.items()):
            try:
                self._access.check_send(self._device, (half.peer,))
            except ProtocolError as exc:
                abort = StreamAbort(stream_id, int(exc.code), exc.message)
                out.append(ToDevice(abort))
                out += self._end(stream_id, half, to_peer=abort)
        return self._released(out)

    def _end(self, stream_id: bytes, half: Half, *, to_peer: StreamAbort) -> list[Output]:
        self._remove(stream_id)
        return [ToPeer(half.route, half.peer, to_peer)] if half.route is not None else []

    def _break(self, stream_id: bytes, half: Half, error: ProtocolError,
               abuse: bool = True) -> list[Output]:
        """The device (or the other relay) broke a rule of this stream: it ends at both ends."""
        out: list[Output] = [Refused(stream_id, error, abuse)]
        out += self._end(stream_id, half, to_peer=StreamAbort(
            stream_id, int(ErrorCode.STREAM_BROKEN),
            f"the other end broke the stream's rules: {error.message}"))
        return out

    # -- the credit pools ------------------------------------------------------------------------

    def _pass(self, stream_id: bytes, half: Half, credit: int) -> int:
        """Credit this device grants: how much goes to the other end now; the rest is held
        until the pools have room (`release`)."""
        if self._holding:  # credit of other streams (or this one) waits: no overtaking
            passed = 0
        else:
            passed = max(0, min(credit, self._room()))
        half.may_receive += passed
        self._expose(half, passed)
        if credit > passed:
            if not half.held:
                self._holding.append(stream_id)
            half.held += credit - passed
        return passed

    def _room(self) -> int:
        settings = self._settings
        return min(settings.stream_connection_window_bytes - self._exposure,
                   self._budget.credit_limit - self._budget.credit)

    def _expose(self, half: Half, amount: int) -> None:
        half.exposure += amount
        self._exposure += amount
        self._budget.credit += amount

    def _unexpose(self, half: Half, amount: int) -> None:
        """The device read `amount` bytes (or the stream ended): they no longer count, and
        never below zero.  What a grant may count as read is `_grant`'s to bound."""
        amount = min(amount, half.exposure)
        half.exposure -= amount
        self._exposure -= amount
        self._budget.credit -= amount

    def _release(self) -> list[Output]:
        """Pass on held credit, oldest first, as far as the pools have room (a stream whose
        other end is not known yet keeps its place)."""
        out: list[Output] = []
        still: deque[bytes] = deque()
        for stream_id in self._holding:
            half = self._halves.get(stream_id)
            if half is None or not half.held:
                continue
            room = self._room()
            if half.phase is Phase.OPEN and room > 0:
                passed = min(half.held, room)
                half.held -= passed
                half.may_receive += passed
                self._expose(half, passed)
                assert half.route is not None
                out.append(ToPeer(half.route, half.peer, StreamCredit(stream_id, passed)))
            if half.held:
                still.append(stream_id)
        self._holding = still
        return out

    def _add(self, stream_id: bytes, half: Half) -> None:
        self._halves[stream_id] = half
        self._budget.open += 1
        self._waiting += 1  # every half starts waiting for the answer

    def _opened(self, half: Half) -> None:
        half.phase = Phase.OPEN
        self._waiting -= 1

    def _remove(self, stream_id: bytes) -> None:
        half = self._halves.pop(stream_id, None)
        if half is not None:
            self._budget.open -= 1
            if half.phase is not Phase.OPEN:
                self._waiting -= 1
            self._unexpose(half, half.exposure)
