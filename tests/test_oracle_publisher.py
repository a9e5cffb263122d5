"""The oracle's access-list publisher: an answer never predates a committed change."""

from __future__ import annotations

import asyncio
from pathlib import Path

import structlog

from oracle.db import open_database
from oracle.publisher import AccessListPublisher
from oracle.records import AccessSnapshot
from oracle.registry import Registry
from proto import Identity


class GatedRegistry:
    """The real registry, whose access-list reads wait for `gate`: a slow database, on cue."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry
        self.gate = asyncio.Event()
        self.gate.set()

    async def access_snapshot(self) -> AccessSnapshot:
        await self.gate.wait()
        return await self._registry.access_snapshot()


async def test_current_waits_for_a_rebuild_already_reading(tmp_path: Path) -> None:
    """Before: a rebuild clears its stale flag when its read starts, so `current()` asked
    while that read was still running answered the list from before the change."""
    db = await open_database(f"sqlite:///{tmp_path / 'oracle.db'}")
    publisher: AccessListPublisher
    registry = Registry(db, lambda: publisher.notify())
    gated = GatedRegistry(registry)
    publisher = AccessListPublisher(gated, Identity.generate(),  # type: ignore[arg-type]
                                    structlog.get_logger("test"), validity_ms=600_000)
    try:
        before = await publisher.current()
        gated.gate.clear()
        device = Identity.generate().public.text
        await registry.enroll(device, "late")  # committed; notify() starts a rebuild
        await asyncio.sleep(0.05)  # the rebuild is now inside its (gated) read
        answer = asyncio.create_task(publisher.current())
        await asyncio.sleep(0.05)
        assert not answer.done()  # it waits for the read that sees the change
        gated.gate.set()
        published = await asyncio.wait_for(answer, 5)
        assert published.stamp > before.stamp
        assert device in {key.text for key in published.access.enrolled}
    finally:
        await db.close()
