"""The device's streams as a pure object: frames from the relay and the application's
calls in, frames to send and events out (SPEC §16).

`DeviceStreams` holds every stream of the device's relay connection and
decides everything about them: which offers are refused before the
application sees them (not fresh, replayed, not sealed as an open to this
device, not from a peer, too many waiting), what a STREAM_ACCEPT must prove
before the stream opens (the peer, this very open: `proto.streams`), how much
may be sent (the credit the other end granted) and granted (as the
application reads, whole chunks at a time, up to the stream's window), and
how a stream ends: both FINs, an abort from either side, a chunk that does
not open (`StreamBrokenError`: altered, dropped, replayed, reordered,
truncated), or the connection's loss, after which nothing resumes.

No I/O, no clock read, randomness passed in; the shell (`streams`) sends
`frames_to_send()` after every call, in order, and wakes whoever waits on the
streams an event names.
"""

from __future__ import annotations

import os
from collections import OrderedDict, deque
from collections.abc import Container
from dataclasses import dataclass
from enum import Enum, auto

from proto import Envelope, Identity, Limits, PublicKey, decode_envelope
from proto.errors import (ProtocolError, StreamBrokenError, StreamLimitError,
                          StreamRefusedError, error_for_code)
from proto.frames import (StreamAbort, StreamAccept, StreamCredit, StreamData, StreamFin,
                          StreamFrame, StreamOpen)
from proto.sealing import RandomBytes
from proto.streams import (CHUNK_OVERHEAD_BYTES, OPEN_TTL_S, Opening, OpenRequest, StreamKeys,
                           accept_open, begin_open, read_open)

from .freshness import is_fresh, valid_until_ms

# What a device grants each stream unless told otherwise: 64 full chunks in flight.  A window
# caps a stream at one window per round trip (4 MiB: about 50 MB/s across an 80 ms WAN path,
# 13 with 1 MiB), and on loopback a tunnel moved 1.1-1.4x as much with 4 MiB as with 1 MiB
# (benchmarks/README, "Tunnels"), since fewer credits and stalls cross the three processes.
# What it costs is what may queue for the reader: one window per stream, within the relay's
# per-connection pool (SPEC §16), which does not change.
DEFAULT_WINDOW = 4 * 1024 * 1024
# Offers waiting for the application's answer; opens remembered against replays.
MAX_WAITING_OFFERS = 16
MAX_REMEMBERED_OPENS = 16_384
# A chunk smaller than this is sent only if it is all there is to send.
MIN_PARTIAL_CHUNK = 1024


class State(Enum):
    OPENING = auto()  # ours, waiting for the answer
    OFFERED = auto()  # theirs, waiting for the application's answer
    OPEN = auto()
    ENDED = auto()


class StreamEnd:
    """One stream at this device; the shell's `Stream` reads its state."""

    __slots__ = ("stream_id", "peer", "service", "state", "keys", "opening", "may_send",
                 "granted", "window", "unread", "unread_bytes", "read_wire_bytes",
                 "peer_finished", "finished", "error")

    def __init__(self, stream_id: bytes, peer: PublicKey, service: str, state: State, *,
                 window: int, may_send: int = 0, opening: Opening | None = None) -> None:
        self.stream_id, self.peer, self.service, self.state = stream_id, peer, service, state
        self.keys: StreamKeys | None = None
        self.opening = opening
        self.may_send = may_send  # chunk bytes we may still send
        self.window = window
        self.granted = window if state is State.OPENING else 0  # they may still send us
        # Plaintext chunks received and not yet read (with the wire size each will credit).
        self.unread: deque[tuple[memoryview, int]] = deque()
        self.unread_bytes = 0
        self.read_wire_bytes = 0  # wire bytes read since the last STREAM_CREDIT
        self.peer_finished = False  # their FIN arrived: after `unread`, the end of the data
        self.finished = False  # we sent our FIN
        self.error: ProtocolError | None = None  # why it ended, if not by both FINs


@dataclass(frozen=True)
class Offered:
    """A peer asks to open a stream: the application accepts or refuses it."""

    end: StreamEnd
    envelope: Envelope
    request: OpenRequest


@dataclass(frozen=True)
class Changed:
    """The stream opened, has data, got credit, or ended: wake whoever waits on it."""

    end: StreamEnd


Event = Offered | Changed


class DeviceStreams:
    """Every stream of this device's relay connection; see the module docstring."""

    def __init__(self, *, is_peer: Container[PublicKey],
                 random_bytes: RandomBytes = os.urandom) -> None:
        self._is_peer = is_peer
        self._random = random_bytes
        self._ends: dict[bytes, StreamEnd] = {}
        self._out: list[StreamFrame] = []
        # (opener, stream id) of opens taken, until they could no longer be delivered.
        self._remembered: OrderedDict[tuple[PublicKey, bytes], int] = OrderedDict()

    def frames_to_send(self) -> list[StreamFrame]:
        out, self._out = self._out, []
        return out

    def __len__(self) -> int:
        return len(self._ends)

    # -- opening -----------------------------------------------------------------------------

    def open(self, identity: Identity, peer: PublicKey, service: str, *, now_ms: int,
             limits: Limits, window: int = DEFAULT_WINDOW) -> StreamEnd:
        """Send a STREAM_OPEN to `peer`; the end opens when its answer comes (`Changed`)."""
        opening = begin_open(identity, peer, service, now_ms=now_ms, ttl_s=OPEN_TTL_S,
                             limits=limits, random_bytes=self._random)
        end = StreamEnd(opening.stream_id, peer, service, State.OPENING, window=window,
                        opening=opening)
        self._ends[end.stream_id] = end
        self._out.append(StreamOpen(window, opening.envelope.raw))
        return end

    def accept(self, end: StreamEnd, identity: Identity, request: OpenRequest,
               envelope: Envelope, *, now_ms: int, limits: Limits,
               window: int = DEFAULT_WINDOW) -> None:
        """Answer an offer: the stream is open from now on."""
        if end.state is not State.OFFERED:
            raise StreamBrokenError("this offer was answered already, or has ended")
        answer, end.keys = accept_open(identity, envelope, request, now_ms=now_ms,
                                       ttl_s=OPEN_TTL_S, limits=limits,
                                       random_bytes=self._random)
        end.state, end.window, end.granted = State.OPEN, window, window
        self._out.append(StreamAccept(end.stream_id, window, answer.raw))

    # -- the application's data ----------------------------------------------------------------

    def write(self, end: StreamEnd, data: memoryview, max_chunk: int) -> int:
        """Seal and queue as much of `data` as the credit allows; how many bytes were taken
        (0: wait for credit).  Raises the stream's error once it has ended."""
        self._check_sending(end)
        taken = 0
        while taken < len(data) and end.may_send > CHUNK_OVERHEAD_BYTES:
            left = len(data) - taken
            size = min(left, max_chunk, end.may_send - CHUNK_OVERHEAD_BYTES)
            if size < left and size < min(max_chunk, MIN_PARTIAL_CHUNK):
                break  # a sliver of credit: wait for more rather than pay 17 bytes for it
            assert end.keys is not None
            chunk = end.keys.sealer.seal(bytes(data[taken:taken + size]))
            end.may_send -= len(chunk)
            self._out.append(StreamData(end.stream_id, chunk))
            taken += size
        return taken

    def finish(self, end: StreamEnd) -> bool:
        """Send our FIN (the end of what we send; reading goes on); False: wait for credit."""
        self._check_sending(end)
        if end.may_send < CHUNK_OVERHEAD_BYTES:
            return False
        assert end.keys is not None
        chunk = end.keys.sealer.seal(b"", final=True)
        end.may_send -= len(chunk)
        end.finished = True
        self._out.append(StreamFin(end.stream_id, chunk))
        self._forget_if_done(end)
        return True

    def read(self, end: StreamEnd, max_bytes: int) -> bytes | None:
        """Up to `max_bytes` received bytes; b"" if none yet, None at the end of the data.
        Raises the stream's error if it ended otherwise.  Grants credit for what was read."""
        if end.unread:
            view, wire = end.unread[0]
            if len(view) <= max_bytes and isinstance(view.obj, bytes) \
                    and len(view) == len(view.obj):
                # The usual case: a whole chunk, handed over as it was opened (no copy).
                end.unread.popleft()
                end.read_wire_bytes += wire
                end.unread_bytes -= len(view)
                self._grant(end)
                return view.obj
            out = bytearray()
            while end.unread and len(out) < max_bytes:
                view, wire = end.unread[0]
                piece = view[:max_bytes - len(out)]
                out += piece
                if len(piece) == len(view):
                    end.unread.popleft()
                    end.read_wire_bytes += wire
                else:
                    end.unread[0] = (view[len(piece):], wire)
            end.unread_bytes -= len(out)
            self._grant(end)
            return bytes(out)
        if end.error is not None:
            raise end.error
        if end.peer_finished:
            return None
        return b""

    def abort(self, end: StreamEnd, error: ProtocolError) -> None:
        """End the stream now, both ways, telling the other end why."""
        if end.state is State.ENDED:
            return
        self._end(end, error)
        self._out.append(StreamAbort(end.stream_id, int(error.code), error.message))

    def _check_sending(self, end: StreamEnd) -> None:
        if end.error is not None:
            raise end.error
        if end.finished:
            raise StreamBrokenError("this end has closed its sending side (FIN)")
        if end.state is not State.OPEN:
            raise StreamBrokenError("the stream is not open")

    def _grant(self, end: StreamEnd) -> None:
        """Give back credit for what the application read, once it is worth a frame (a
        quarter of the window), and never after the other end finished."""
        if end.peer_finished or end.state is not State.OPEN:
            return
        if end.read_wire_bytes >= max(1, end.window // 4):
            credit, end.read_wire_bytes = end.read_wire_bytes, 0
            end.granted += credit
            self._out.append(StreamCredit(end.stream_id, credit))

    # -- frames from the relay -------------------------------------------------------------------

    def receive(self, frame: StreamFrame, identity: Identity, *, now_ms: int,
                limits: Limits, local_ms: int | None = None) -> Event | None:
        """`now_ms`: the freshness rule's now (client/freshness.py), which a relay's clock
        may move ahead; `local_ms`: the device's own clock (`now_ms` when None), by which
        alone it forgets the opens it took, as it forgets the messages (`Device._prune`)."""
        if isinstance(frame, StreamOpen):
            return self._offered(frame, identity, now_ms,
                                 now_ms if local_ms is None else local_ms, limits)
        end = self._ends.get(frame.stream_id)
        if end is None:
            return None  # it ended here already; the relay will drop or has dropped it
        if isinstance(frame, StreamAbort):
            self._end(end, error_for_code(frame.code, frame.message))
            return Changed(end)
        if isinstance(frame, StreamAccept):
            return self._accepted(end, frame, identity, limits)
        if end.state is not State.OPEN:
            return self._broken(end, "a stream frame before the stream was open")
        if isinstance(frame, StreamCredit):
            end.may_send += frame.credit
            return Changed(end)
        return self._chunk(end, frame)

    def _offered(self, frame: StreamOpen, identity: Identity, now_ms: int, local_ms: int,
                 limits: Limits) -> Event | None:
        try:
            envelope = decode_envelope(frame.envelope, limits)
        except ProtocolError:
            return None  # no stream id to answer; an honest relay never sends this
        stream_id, opener = envelope.msg_id, envelope.sender
        if stream_id in self._ends:
            return None  # a second offer of a stream already here: the first one stands
        try:
            if not is_fresh(envelope, now_ms):
                raise StreamRefusedError("the open is too old to be live (a replay)")
            if (opener, stream_id) in self._remembered:
                raise StreamRefusedError("this open was taken already (a replay)")
            request = read_open(envelope, identity)  # verifies the signature first
            if opener not in self._is_peer:
                raise StreamRefusedError(f"{opener.text} is not a peer of this device")
            waiting = sum(1 for end in self._ends.values() if end.state is State.OFFERED)
            if waiting >= MAX_WAITING_OFFERS:
                raise StreamLimitError(f"{waiting} opens wait for this device's answer")
        except ProtocolError as exc:
            code = exc.code if isinstance(exc, StreamLimitError) else StreamRefusedError.code
            self._out.append(StreamAbort(stream_id, int(code), exc.message))
            return None
        self._remember(opener, stream_id, valid_until_ms(envelope), local_ms)
        end = StreamEnd(stream_id, opener, request.service, State.OFFERED, window=0,
                        may_send=frame.window)
        self._ends[stream_id] = end
        return Offered(end, envelope, request)

    def _accepted(self, end: StreamEnd, frame: StreamAccept, identity: Identity,
                  limits: Limits) -> Event:
        if end.state is not State.OPENING or end.opening is None:
            return self._broken(end, "an answer to a stream that was not opening")
        try:
            end.keys = end.opening.complete(frame.envelope, identity, limits)
        except ProtocolError as exc:
            return self._broken(end, f"the answer does not prove the peer: {exc.message}")
        end.opening = None
        end.state, end.may_send = State.OPEN, frame.window
        return Changed(end)

    def _chunk(self, end: StreamEnd, frame: StreamData | StreamFin) -> Event:
        size = len(frame.chunk)
        if size > end.granted:
            return self._broken(end, "the other end sent beyond the credit granted")
        end.granted -= size
        assert end.keys is not None
        try:
            data = end.keys.opener.open(frame.chunk, final=isinstance(frame, StreamFin))
        except ProtocolError as exc:
            return self._broken(end, exc.message)
        if data:
            end.unread.append((memoryview(data), size))
            end.unread_bytes += len(data)
        else:
            end.read_wire_bytes += size  # nothing to read: credit it with the next grant
        if isinstance(frame, StreamFin):
            end.peer_finished = True
            self._forget_if_done(end)
        return Changed(end)

    def _broken(self, end: StreamEnd, why: str) -> Changed:
        self.abort(end, StreamBrokenError(why))
        return Changed(end)

    # -- endings -------------------------------------------------------------------------------

    def connection_lost(self) -> list[StreamEnd]:
        """The relay connection is gone: every stream ends (none is ever resumed)."""
        ended = list(self._ends.values())
        for end in ended:
            self._end(end, StreamBrokenError(
                "the connection to the relay was lost; a stream is never resumed"))
        self._out.clear()
        return ended

    def _end(self, end: StreamEnd, error: ProtocolError) -> None:
        if end.state is State.ENDED:
            return
        end.state, end.error, end.opening = State.ENDED, error, None
        self._ends.pop(end.stream_id, None)

    def _forget_if_done(self, end: StreamEnd) -> None:
        """Both FINs: the stream has ended well; what is unread stays readable."""
        if end.finished and end.peer_finished:
            end.state = State.ENDED
            self._ends.pop(end.stream_id, None)

    def _remember(self, opener: PublicKey, stream_id: bytes, until_ms: int,
                  local_ms: int) -> None:
        while self._remembered:
            _, oldest = next(iter(self._remembered.items()))
            if oldest >= local_ms and len(self._remembered) < MAX_REMEMBERED_OPENS:
                break
            self._remembered.popitem(last=False)
        self._remembered[(opener, stream_id)] = until_ms

