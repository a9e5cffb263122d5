"""The signed access list, served to relays by long-poll.

A relay asks `GET /v1/access-list?after=N`; if the oracle's list is newer
it answers at once, else it holds the request until a change (revocation,
enrolment) or `longpoll_s`, then answers 204.  The relay drives the loop, so
a relay that was down simply asks again; nothing is pushed into the void.
"""

from __future__ import annotations

import asyncio
import contextlib

from proto import Identity, PublicKey
from proto.access import AccessList
from runtime.clock import now_ms

from .registry import Registry


class AccessListPublisher:
    def __init__(self, registry: Registry, identity: Identity) -> None:
        self._registry = registry
        self._identity = identity
        self._changed = asyncio.Event()
        self._cache: tuple[int, bytes] | None = None

    def notify(self) -> None:
        """Wake every waiting long-poll: the list may have a new version."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def document(self) -> tuple[int, bytes]:
        """The current version and its signed bytes (signed once per version)."""
        snapshot = await self._registry.access_snapshot()
        if self._cache is None or self._cache[0] != snapshot.version:
            access = AccessList(snapshot.version, now_ms(), self._identity.public,
                                frozenset(PublicKey.from_text(k) for k in snapshot.enrolled),
                                frozenset(PublicKey.from_text(k) for k in snapshot.revoked))
            self._cache = (snapshot.version, access.sign(self._identity))
        return self._cache

    async def wait_newer(self, after: int, timeout_s: float) -> bytes | None:
        """The signed list once its version exceeds `after`; None if none came in `timeout_s`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            changed = self._changed  # take it before reading, so no change slips between
            version, document = await self.document()
            if version > after:
                return document
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await changed.wait()
