"""The device's calls (SPEC §18), both sides: seal, send, wait; admit, run, answer.

`Calls` is the thin shell around `calls.PendingCalls` and `calls.Answering`
that `Device` delegates to.  A call is sealed with an envelope TTL of its
timeout (rounded up), so a relay keeps it for an offline callee exactly as
long as it is worth answering, and held in the outbox (sent on every
connection until a relay accepts it) without being tracked for receipts: the
response is its receipt.  The caller waits for the response at most until
the deadline; then it withdraws the call from its outbox if no relay took it
yet, and raises CallTimeoutError.  A response that comes after that is
discarded and counted (`responses_late`).

The callee admits a call (from a peer: `inbox.decide` dropped the others)
before any handler sees it, runs the handler in a task of its own, bounded by
the call's deadline and by `Answering.max_running`, and answers every call it
admitted, or refused as late, busy or unknown, with exactly one response.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Any

from proto import Envelope, Identity, Kind, PublicKey
from proto.calls import Call, CallStatus, Response
from proto.errors import CallTimeoutError, ProtocolError
from runtime.clock import now_ms
from runtime.logs import library_logger
from runtime.tasks import cancel_all_and_wait

from .calls import (Admission, Answering, CallHandler, CallResult, IncomingCall, PendingCalls,
                    ResponseFate)
from .freshness import device_now_ms
from .inbox import CallArrived, ResponseArrived
from .sending import Sender
from .stats import DeviceStats

log = library_logger("continuum.client")

# A response lives at least this long in the caller's mailbox (a caller reconnecting, or
# clocks apart: a TIMEOUT answer still tells it why).
RESPONSE_MIN_TTL_S = 30
# What a failed handler's caller learns: nothing of the exception.
HANDLER_FAILED = b"the handler failed"
TOO_LARGE = b"the response does not fit in an envelope"


class Calls:
    """Calls made and answered by one device; see the module docstring."""

    def __init__(self, sender: Sender, stats: DeviceStats,
                 identity: Callable[[], Identity], *, max_running: int) -> None:
        self._sender = sender
        self._stats = stats
        self._identity = identity  # the device's current key: it seals the responses
        self.pending = PendingCalls()
        self.answering = Answering(max_running=max_running)
        self._tasks: set[asyncio.Task[Any]] = set()

    async def stop(self) -> None:
        await cancel_all_and_wait(self._tasks)

    # -- caller ----------------------------------------------------------------------------

    async def call(self, peer: PublicKey, method: str, body: bytes,
                   timeout: float) -> CallResult:
        if not 0 < timeout <= 7 * 24 * 3600:
            raise ValueError("a call's timeout must be positive and at most 7 days")
        correlation_id, answered = self.pending.start(peer)
        entry = None
        try:
            now = self._sender.now_ms()
            deadline_ms = now + math.ceil(timeout * 1000)
            plaintext = Call(correlation_id, method, deadline_ms, body).encode()
            envelope = self._sender.seal(self._identity(), Kind.CALL, [peer], plaintext,
                                         max(1, math.ceil(timeout)))
            entry = self._sender.hold_untracked(envelope, awaited=True)
            async with asyncio.timeout(timeout):
                await self._sender.send_now(entry)
                # A relay stored it, or its refusal (NotPeerError, …); shielded, so that
                # giving up leaves the entry's future to the outbox.
                await asyncio.shield(entry.accepted)
                return await answered
        except TimeoutError:
            self._stats.calls_timed_out += 1
            raise CallTimeoutError(f"no response to {method!r} from {peer.text} within"
                                   f" {timeout:g}s") from None
        finally:
            self.pending.give_up(correlation_id)
            if entry is not None and not entry.accepted.done():
                self._sender.discard_untracked(entry)

    def on_response(self, decision: ResponseArrived) -> ResponseFate:
        fate = self.pending.resolve(decision.envelope.sender, decision.response)
        if fate is ResponseFate.LATE:
            self._stats.responses_late += 1
        elif fate is ResponseFate.UNMATCHED:
            self._stats.responses_unmatched += 1
            log.info("response_unmatched", sender=decision.envelope.sender.text)
        return fate

    # -- callee ----------------------------------------------------------------------------

    def on_call(self, method: str, handler: CallHandler | None) -> None:
        self.answering.on_call(method, handler)

    def on_call_arrived(self, decision: CallArrived) -> None:
        """Rule on the call and answer it in a task of its own (the delivery is ACKed)."""
        envelope, call = decision.envelope, decision.call
        admission = self.answering.admit(envelope, call, self._deadline_now_ms())
        self._stats.calls_received += 1
        if admission in (Admission.REPLAY, Admission.INVALID):
            self._stats.calls_dropped += 1
            log.info("call_dropped", reason=admission.value, caller=envelope.sender.text)
            return
        if admission is Admission.RUN:
            self.answering.running += 1
        self._spawn(self._answer(envelope, call, admission))

    def _deadline_now_ms(self) -> int:
        """What a call's deadline is held against: the device's clock, or the relay's when
        that is later (`freshness.device_now_ms`).  The relay's alone let a relay announcing
        a clock an hour behind have a call held past its deadline run, and its handler run
        an hour past it; the caller had given up and may have called again."""
        return device_now_ms(now_ms(), self._sender.clock_offset_ms)

    async def _answer(self, envelope: Envelope, call: Call, admission: Admission) -> None:
        try:
            result = await self._result(envelope, call, admission)
        finally:
            if admission is Admission.RUN:
                self.answering.running -= 1
        if result.status is not CallStatus.OK:
            self._stats.calls_not_ok += 1
        await self._respond(envelope, call, result)

    async def _result(self, envelope: Envelope, call: Call, admission: Admission) -> CallResult:
        if admission is Admission.LATE:
            return CallResult(CallStatus.TIMEOUT, b"the deadline passed before the call arrived")
        if admission is Admission.NOT_FOUND:
            return CallResult(CallStatus.NOT_FOUND, f"no method {call.method}".encode())
        if admission is Admission.BUSY:
            return CallResult(CallStatus.REFUSED, b"too many calls running; retry later")
        handler = self.answering.handler(call.method)
        if handler is None:  # removed since it was admitted
            return CallResult(CallStatus.NOT_FOUND, f"no method {call.method}".encode())
        incoming = IncomingCall(envelope.sender, call.method, call.body, call.deadline_ms,
                                call.correlation_id)
        remaining_s = (call.deadline_ms - self._deadline_now_ms()) / 1000
        try:
            async with asyncio.timeout(max(0.0, remaining_s)):
                outcome = await handler(incoming)
        except TimeoutError:
            return CallResult(CallStatus.TIMEOUT, b"the handler did not finish by the deadline")
        except Exception as exc:  # the handler's bug: logged here, never sent
            log.warning("call_handler_failed", method=call.method, error=type(exc).__name__,
                        detail=str(exc))
            return CallResult(CallStatus.ERROR, HANDLER_FAILED)
        if isinstance(outcome, bytes):
            return CallResult(CallStatus.OK, outcome)
        if (isinstance(outcome, CallResult) and isinstance(outcome.body, bytes)
                and outcome.status in set(CallStatus)):
            return CallResult(CallStatus(outcome.status), outcome.body)
        log.warning("call_handler_returned", method=call.method, type=type(outcome).__name__)
        return CallResult(CallStatus.ERROR, HANDLER_FAILED)

    async def _respond(self, envelope: Envelope, call: Call, result: CallResult) -> None:
        remaining_s = math.ceil((call.deadline_ms - self._deadline_now_ms()) / 1000)
        ttl_s = max(RESPONSE_MIN_TTL_S, remaining_s)
        try:
            sealed = self._seal_response(envelope.sender, call, result, ttl_s)
        except ProtocolError:  # the body does not fit the envelope limit
            sealed = self._seal_response(envelope.sender, call,
                                         CallResult(CallStatus.ERROR, TOO_LARGE), ttl_s)
        entry = self._sender.hold_untracked(sealed, awaited=False)
        self._stats.responses_sent += 1
        await self._sender.send_now(entry)

    def _seal_response(self, caller: PublicKey, call: Call, result: CallResult,
                       ttl_s: int) -> Envelope:
        plaintext = Response(call.correlation_id, result.status, result.body).encode()
        return self._sender.seal(self._identity(), Kind.RESPONSE, [caller], plaintext, ttl_s)

    def _spawn(self, work: Any) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
