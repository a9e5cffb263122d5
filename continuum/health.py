"""What /healthz reports, found by a probe that runs at most once a second.

The probe writes: a body as large as an envelope may be, committed to the store (a
store that cannot write cannot honour ACCEPTED), and a call to every region's store.
/healthz answers anyone (load balancers and Kubernetes ask it, unauthenticated), so a
client asking it in a loop made the relay commit one write per request, each in a
transaction of its own beside the devices' group commits, and call every region as
often.  Now requests within PROBE_EVERY_S of a probe get that probe's result, and
requests that come while one runs wait for it: one probe a second, whatever the rate.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from proto.errors import ProtocolError

from .store import MailboxStore
from .store.regional import PROBE_TIMEOUT_S

if TYPE_CHECKING:
    from .store.regional import RegionalStore

# How long one probe's result answers /healthz.  Far below what probes of a load balancer or
# Kubernetes wait between asks (10 s by default), so they see each state change.
PROBE_EVERY_S = 1.0


@dataclass(frozen=True)
class Health:
    """One probe's result: the store's failure (None: it took the write) and each region's
    state (empty without regions)."""

    store_error: str | None
    regions: dict[str, object]


class HealthProbe:
    """The last probe's result, probed again once it is PROBE_EVERY_S old."""

    def __init__(self, store: MailboxStore, regions: RegionalStore | None) -> None:
        self._store, self._regions = store, regions
        self._lock = asyncio.Lock()
        self._last: Health | None = None
        self._last_at = 0.0

    async def check(self) -> Health:
        async with self._lock:  # one probe at a time: those who wait take its result
            if self._last is None or time.monotonic() - self._last_at >= PROBE_EVERY_S:
                self._last = await self._probe()
                self._last_at = time.monotonic()
            return self._last

    async def _probe(self) -> Health:
        regions = await _region_states(self._regions)
        try:
            await self._store.ping()
        except ProtocolError as exc:
            return Health(exc.message, regions)
        return Health(None, regions)


async def _region_states(store: RegionalStore | None) -> dict[str, object]:
    """Each region store's state, for a relay with regions (SPEC §19): another region's
    outage is reported here and in metrics, and refuses only sends to devices homed there,
    so it never makes this relay's /healthz fail."""
    if store is None:
        return {}
    states = await store.probe(PROBE_TIMEOUT_S)
    return {"region": store.local,
            "regions": {state.region: "ok" if state.reachable else "unreachable"
                        for state in states},
            "unreachable_regions": {state.region: state.detail for state in states
                                    if not state.reachable}}
