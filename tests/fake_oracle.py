"""An HTTP server on 127.0.0.1 that serves whatever signed access list a test hands it.

The real oracle only ever serves its newest list; to show what a relay does
with a replayed old one (the attacker on the path, or a rogue endpoint), this
serves any bytes, signed by a key the test holds, over a real socket, and
answers the relay's long-poll the way the oracle does (at once when the list
differs from the one the relay names, else 204 after `longpoll_s`).  It does
not check the relay's signed request: that is the real oracle's test.
"""

from __future__ import annotations

import asyncio
from types import TracebackType

from aiohttp import web

from proto import Identity
from proto.access import ACCESS_LIST_CONTENT_TYPE, ACCESS_LIST_PATH, AccessList


class FakeOracle:
    def __init__(self, identity: Identity, longpoll_s: float = 0.5) -> None:
        self.identity = identity
        self.longpoll_s = longpoll_s
        self.document: bytes | None = None
        self.requests = 0
        self._runner: web.AppRunner | None = None
        self.url = ""

    def serve(self, access: AccessList) -> None:
        """Answer every poll with `access`, signed by this oracle's key, from now on."""
        self.document = access.sign(self.identity)

    async def _access_list(self, request: web.Request) -> web.Response:
        self.requests += 1
        held = (request.query.get("epoch"), request.query.get("after"),
                request.query.get("valid_until"))
        deadline = asyncio.get_running_loop().time() + self.longpoll_s
        while asyncio.get_running_loop().time() < deadline:
            if self.document is not None:
                access = AccessList.verify(self.document, self.identity.public)
                if held != (str(access.epoch), str(access.version), str(access.valid_until_ms)):
                    return web.Response(body=self.document, content_type=ACCESS_LIST_CONTENT_TYPE)
            await asyncio.sleep(0.02)
        return web.Response(status=204)

    async def __aenter__(self) -> FakeOracle:
        app = web.Application()
        app.router.add_get(ACCESS_LIST_PATH, self._access_list)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        assert self._runner is not None
        await self._runner.cleanup()
