"""What a device keeps about calls (SPEC §18): the ones it awaits, the ones it answered.

Two small objects with no I/O, so every rule is tested without a network;
`Device` does the sealing, sending and running:

- `PendingCalls` (caller side): each outstanding call's correlation id, the
  peer it was sent to and the future its response resolves.  A response counts
  only from that peer for an outstanding id; one for a call given up on (timed
  out) is *late*, any other *unmatched*: both discarded, and counted apart.
- `Answering` (callee side): the handlers by method, the (caller, correlation
  id) pairs already taken (kept until their deadline, bounded), and the bound
  on handlers running at once.  `admit` rules on each call before any handler
  sees it.

Calls run at most once: a call is recorded as taken (and its delivery ACKed)
before its handler runs, so a crash while it runs loses it, and the caller gets
a timeout, never a second run.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum

from proto import Envelope, PublicKey
from proto.calls import CORRELATION_ID_BYTES, Call, CallStatus, Response, check_method
from proto.errors import CallRejectedError, ProtocolError

# Correlation ids of calls given up on, remembered to tell a late response from a stray one.
_GIVEN_UP_CAPACITY = 4096
DEFAULT_MAX_RUNNING = 32
DEFAULT_TAKEN_CAPACITY = 65_536
_FORGET_BATCH = 256


@dataclass(frozen=True)
class CallResult:
    """A response's status and body: what `Device.call` returns, and what a handler may
    return to choose a status other than OK."""

    status: CallStatus
    body: bytes = b""

    @property
    def ok(self) -> bool:
        return self.status is CallStatus.OK


@dataclass(frozen=True)
class IncomingCall:
    """A call as a handler sees it; `deadline_ms` is in relay time (the handler is cancelled
    when it passes)."""

    caller: PublicKey
    method: str
    body: bytes
    deadline_ms: int
    correlation_id: bytes


# A handler returns the body of an OK response, or a CallResult for another status; an
# exception becomes ERROR with a generic body (nothing of the exception leaves the device).
CallHandler = Callable[[IncomingCall], Awaitable[bytes | CallResult]]


class ResponseFate(Enum):
    MATCHED = "matched"
    LATE = "late"
    UNMATCHED = "unmatched"


class PendingCalls:
    """The caller's outstanding calls, by correlation id."""

    def __init__(self) -> None:
        self._waiting: dict[bytes, tuple[PublicKey, asyncio.Future[CallResult]]] = {}
        self._given_up: OrderedDict[bytes, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._waiting)

    def start(self, peer: PublicKey) -> tuple[bytes, asyncio.Future[CallResult]]:
        correlation_id = os.urandom(CORRELATION_ID_BYTES)
        future: asyncio.Future[CallResult] = asyncio.get_running_loop().create_future()
        self._waiting[correlation_id] = (peer, future)
        return correlation_id, future

    def resolve(self, sender: PublicKey, response: Response) -> ResponseFate:
        """Hand `response` to its call if `sender` is the peer it was sent to."""
        entry = self._waiting.get(response.correlation_id)
        if entry is None or entry[0] != sender:
            return (ResponseFate.LATE if entry is None and response.correlation_id in self._given_up
                    else ResponseFate.UNMATCHED)
        del self._waiting[response.correlation_id]
        if not entry[1].done():
            entry[1].set_result(CallResult(response.status, response.body))
        return ResponseFate.MATCHED

    def give_up(self, correlation_id: bytes) -> None:
        """The caller stopped waiting (answered, timed out, cancelled, refused)."""
        if self._waiting.pop(correlation_id, None) is None:
            return  # answered
        self._given_up[correlation_id] = None
        while len(self._given_up) > _GIVEN_UP_CAPACITY:
            self._given_up.popitem(last=False)


class Admission(Enum):
    """What the callee does with one call from a peer."""

    RUN = "run"
    NOT_FOUND = "not_found"  # answer NOT_FOUND, run nothing
    BUSY = "busy"  # answer REFUSED: too many handlers running
    LATE = "late"  # answer TIMEOUT: past its deadline on arrival
    REPLAY = "replay"  # drop: this correlation id from this caller was taken already
    INVALID = "invalid"  # drop: a deadline outside its envelope's life


class Answering:
    """The callee's handlers and memory; `admit` then `started`/`finished` around a run."""

    def __init__(self, *, max_running: int = DEFAULT_MAX_RUNNING,
                 taken_capacity: int = DEFAULT_TAKEN_CAPACITY) -> None:
        self.max_running = max_running
        self.running = 0
        self._handlers: dict[str, CallHandler] = {}
        self._taken: OrderedDict[tuple[PublicKey, bytes], int] = OrderedDict()
        self._taken_capacity = taken_capacity

    def on_call(self, method: str, handler: CallHandler | None) -> None:
        check_method(method)
        if handler is None:
            self._handlers.pop(method, None)
        else:
            self._handlers[method] = handler

    def handler(self, method: str) -> CallHandler | None:
        return self._handlers.get(method)

    def admit(self, envelope: Envelope, call: Call, now_ms: int) -> Admission:
        """Rule on a call already known to come from a peer; records it as taken unless it
        is a replay or invalid (so a re-sent copy is never run twice)."""
        key = (envelope.sender, call.correlation_id)
        try:
            call.check(envelope, now_ms)
        except CallRejectedError:
            late = True
        except ProtocolError:
            return Admission.INVALID
        else:
            late = False
        self._forget_before(now_ms)
        if key in self._taken:
            return Admission.REPLAY
        self._taken[key] = call.deadline_ms
        while len(self._taken) > self._taken_capacity:
            self._taken.popitem(last=False)
        if late:
            return Admission.LATE
        if call.method not in self._handlers:
            return Admission.NOT_FOUND
        if self.running >= self.max_running:
            return Admission.BUSY
        return Admission.RUN

    def _forget_before(self, now_ms: int) -> None:
        """Past its deadline a copy is refused as late anyway: its pair need not be kept."""
        oldest = itertools.islice(self._taken.items(), _FORGET_BATCH)  # bounded work per call
        for key in [key for key, deadline in oldest if deadline < now_ms]:
            del self._taken[key]
