"""The relay's side of presence: batch, sign and POST `PresenceTracker`'s reports to the oracle.

Sessions of enrolled devices tell `connected`/`disconnected` (cheap: a dict
entry, no I/O); one task sends what changed every `presence_interval_s`, and
an empty report at least every `presence_heartbeat_s` so the oracle knows
this process is alive (it ends this process's connections once the lease
the report names, three heartbeats, passes unheard).  Reports are signed
with the relay key, like access-list requests (SPEC §20, §12).

When the oracle cannot be reached, or answers anything but 200, the tracker
switches to a snapshot and the task backs off exponentially (1 s doubling up
to 60 s, each wait drawn between half and all of it, so relays that lost the
same oracle do not come back in step; at least the `Retry-After` a busy
oracle names).  So an oracle restart costs it one snapshot per relay
process, spread over the backoff, not a replay of every event.
"""

from __future__ import annotations

import asyncio
import json
import os
import random

import aiohttp
import structlog

from proto import Identity, PublicKey
from proto.access import REQUEST_NONCE_BYTES
from proto.presence import (INSTANCE_BYTES, MAX_LEASE_MS, PRESENCE_CONTENT_TYPE, PRESENCE_PATH,
                            PresenceReport)
from runtime.clock import now_ms
from runtime.tasks import cancel_and_wait

from .access import AccessControl
from .metrics import RelayMetrics
from .presence import ConnectionCounts, Draft, PresenceTracker, Tracked
from .settings import Settings

_BACKOFF_MIN_S, _BACKOFF_MAX_S = 1.0, 60.0
_REQUEST_TIMEOUT_S = 30.0
# How long a stopping relay spends on its last report.
FINAL_REPORT_S = 2.0
# Heartbeats a relay process may miss before the oracle ends its connections.
LEASE_HEARTBEATS = 3


class PresenceReporter:
    def __init__(self, settings: Settings, identity: Identity, access: AccessControl,
                 metrics: RelayMetrics, log: structlog.typing.FilteringBoundLogger,
                 instance: bytes | None = None) -> None:
        self.tracker = PresenceTracker(instance or os.urandom(INSTANCE_BYTES),
                                       max_ended=settings.presence_max_waiting)
        self._url = settings.oracle_url.rstrip("/") + PRESENCE_PATH
        self._settings = settings
        self._identity = identity
        self._access = access
        self._metrics = metrics
        self._log = log
        self._tls = settings.oracle_tls_context()
        self._task: asyncio.Task[None] | None = None
        metrics.presence_held.set_function(lambda: self.tracker.held)
        metrics.presence_waiting.set_function(lambda: self.tracker.waiting)

    # -- what sessions tell ---------------------------------------------------------------

    def connected(self, device: PublicKey, counts: ConnectionCounts) -> Tracked | None:
        """An authenticated connection; tracked only for a device the oracle enrolled."""
        current = self._access.current
        if current is None or device not in current.enrolled:
            return None
        return self.tracker.connected(device, now_ms(), counts)

    def disconnected(self, tracked: Tracked | None) -> None:
        if tracked is not None:
            dropped = self.tracker.dropped
            self.tracker.disconnected(tracked, now_ms())
            if self.tracker.dropped > dropped:  # the queue of ended connections was full
                self._metrics.presence_dropped.inc(self.tracker.dropped - dropped)

    # -- the task -------------------------------------------------------------------------

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="presence")

    async def stop(self) -> None:
        """Stop the task, then tell the oracle once, within FINAL_REPORT_S, what ended with
        this process (called once its sessions are closed), so that a relay stopped on
        purpose (a rolling update) does not leave its devices online until its lease passes."""
        task, self._task = self._task, None
        if task is None:
            return
        await cancel_and_wait(task)
        self.tracker.abandon()
        draft = self.tracker.next_report(heartbeat_due=False)
        if draft is None:
            return
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=FINAL_REPORT_S),
                                         connector=aiohttp.TCPConnector(ssl=self._tls)) as http:
            await self._send(http, draft)

    @property
    def _lease_ms(self) -> int:
        return min(MAX_LEASE_MS, int(LEASE_HEARTBEATS * self._settings.presence_heartbeat_s
                                     * 1000))

    async def _run(self) -> None:
        settings = self._settings
        timeout = aiohttp.ClientTimeout(total=_REQUEST_TIMEOUT_S, sock_connect=5)
        loop = asyncio.get_running_loop()
        last_sent = loop.time()
        backoff_s, failures = 0.0, 0
        async with aiohttp.ClientSession(timeout=timeout,
                                         connector=aiohttp.TCPConnector(ssl=self._tls)) as http:
            while True:
                if backoff_s:
                    await asyncio.sleep(backoff_s)
                elif not self.tracker.has_more:
                    await asyncio.sleep(settings.presence_interval_s)
                heartbeat_due = loop.time() - last_sent >= settings.presence_heartbeat_s
                draft = self.tracker.next_report(heartbeat_due)
                if draft is None:
                    continue
                retry_after = await self._send(http, draft)
                if retry_after is None:
                    last_sent, backoff_s, failures = loop.time(), 0.0, 0
                    continue
                ceiling = min(_BACKOFF_MAX_S, _BACKOFF_MIN_S * 2 ** min(failures, 16))
                failures += 1
                backoff_s = max(retry_after, random.uniform(ceiling / 2, ceiling))

    async def _send(self, http: aiohttp.ClientSession, draft: Draft) -> float | None:
        """POST one report; None once the oracle took it, else how long to wait at least."""
        oracle = self._access.oracle
        assert oracle is not None
        report = PresenceReport(self._identity.public, oracle, now_ms(),
                                os.urandom(REQUEST_NONCE_BYTES), self.tracker.instance,
                                draft.sequence, self._lease_ms, draft.snapshot_from,
                                draft.snapshot_last, draft.connections)
        try:
            body = report.sign(self._identity)
            async with http.post(self._url, data=body,
                                 headers={"Content-Type": PRESENCE_CONTENT_TYPE}) as response:
                text = await response.text()
                if response.status == 200:
                    wants_snapshot = bool(json.loads(text).get("snapshot", False))
                    self.tracker.delivered(draft, wants_snapshot)
                    self._metrics.presence_reports.labels("delivered").inc()
                    return None
                retry_after = _seconds(response.headers.get("Retry-After"))
                self._log.warning("presence_report_refused", url=self._url,
                                  status=response.status, reason=text[:200],
                                  relay_key=self._identity.public.text)
        except (aiohttp.ClientError, TimeoutError, ValueError, AttributeError) as exc:
            self._log.warning("presence_report_failed", url=self._url,
                              error=f"{type(exc).__name__}: {exc}")
            retry_after = 0.0
        self.tracker.failed(draft)
        self._metrics.presence_reports.labels("failed").inc()
        return retry_after


def _seconds(header: str | None) -> float:
    """Retry-After in seconds (the oracle sends seconds; a date or garbage counts as none)."""
    try:
        return min(_BACKOFF_MAX_S, max(0.0, float(header))) if header else 0.0
    except ValueError:
        return 0.0
