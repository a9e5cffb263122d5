"""The relay's side of the oracle's long-poll: fetch the signed access list, keep the floor.

A relay long-polls `GET /v1/access-list?epoch=E&after=V&valid_until=T` (each
request signed with the relay's own key), naming the list it holds, and hands
each list it gets to `AccessControl.apply`.  The oracle answers at once when
its list differs, by stamp or by a later expiry (a refresh), so a relay in
touch with it gets every refresh long before the list it holds lapses, and
between refreshes its requests wait at the oracle: nothing busy-loops.

The floor (SPEC §12) is kept in the mailbox store, which replicas share and
which a restart keeps (a SQLite file, Redis; the memory store keeps nothing,
and then only `valid_until_ms` bounds what a replay can do): it is read
before the first list is applied, so a restarted relay or a new replica
refuses a replayed list older than one any of them obeyed, and raised after
each newer stamp.  A store that cannot be read counts as a failed poll.

The oracle key the relay trusts moves along the oracle's key chain (SPEC §15):
the list carries the chain, and a relay whose requests the oracle refuses
fetches the chain alone (public, self-authenticating), because an oracle that
restarted with a new key cannot vouch for this relay until it has connected
to it, which it cannot do while the relay does not know its new key.
"""

from __future__ import annotations

import asyncio
import os
from urllib.parse import urlsplit

import aiohttp
import structlog

from proto import Identity
from proto.access import (ACCESS_LIST_PATH, ORACLE_KEY_CHAIN_PATH, REQUEST_NONCE_BYTES,
                          AccessRequest)
from proto.errors import ProtocolError
from runtime.clock import now_ms
from runtime.tasks import cancel_and_wait
from runtime.tls import is_loopback_host

from .access import AccessControl
from .settings import Settings
from .store import MailboxStore

_RETRY_MIN_S, _RETRY_MAX_S = 0.2, 5.0
# Bounds of one poll's wait for an answer (see `_poll_timeout_s`).
_POLL_MIN_S, _POLL_MAX_S = 5.0, 60.0


class AccessListFetcher:
    """Keeps `access` supplied with the oracle's latest list, for as long as it runs."""

    def __init__(self, access: AccessControl, settings: Settings, identity: Identity,
                 store: MailboxStore, log: structlog.typing.FilteringBoundLogger) -> None:
        base = settings.oracle_url.rstrip("/")
        self._url = base + ACCESS_LIST_PATH
        self._chain_url = base + ORACLE_KEY_CHAIN_PATH
        self._access = access
        self._identity = identity
        self._store = store
        self._log = log
        self._tls = settings.oracle_tls_context() if access.enabled else True
        self._floor_read = False
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if not self._access.enabled:
            return
        parts = urlsplit(self._url)
        if parts.scheme == "http" and not is_loopback_host(parts.hostname or ""):
            self._log.warning("oracle_url_not_encrypted", url=self._url,
                              detail="anyone on the path can withhold revocations from this"
                                     " relay until its list lapses: use https://")
        self._task = asyncio.create_task(self._poll_forever(), name="access-list")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def _poll_forever(self) -> None:
        """Long-poll the oracle; each answer is a list to try, or "nothing new yet"."""
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=_POLL_MAX_S)
        retry_s = _RETRY_MIN_S
        async with aiohttp.ClientSession(timeout=timeout,
                                         connector=aiohttp.TCPConnector(ssl=self._tls)) as http:
            while True:
                try:
                    await self._sync_floor()
                    async with asyncio.timeout(self._poll_timeout_s()):
                        at_once = await self._poll_once(http)
                except (aiohttp.ClientError, TimeoutError, ProtocolError) as exc:
                    self._log.warning("access_list_fetch_failed", url=self._url,
                                      error=f"{type(exc).__name__}: {exc}", retry_s=retry_s)
                    at_once = False
                if at_once:
                    retry_s = _RETRY_MIN_S
                    continue
                await asyncio.sleep(retry_s)
                retry_s = min(retry_s * 2, _RETRY_MAX_S)

    async def _sync_floor(self) -> None:
        """Read the floor once, before the first list; raise it to each newer stamp applied."""
        access = self._access
        if not self._floor_read:
            access.floor = await self._store.access_list_floor()
            self._floor_read = True
            self._log.info("access_list_floor", floor=str(access.floor))
        current = access.current
        if current is not None and current.stamp > access.floor:
            access.floor = await self._store.raise_access_list_floor(current.stamp)

    def _poll_timeout_s(self) -> float:
        """How long to wait for one answer: until the held list lapses, within bounds.

        A healthy oracle answers long before that (it refreshes the list at half
        its validity, and answers a relay holding a lapsed one at once), so a poll
        still unanswered then is stuck on a dead path (a partition drops packets,
        it does not close sockets): give it up and ask again on a new connection.
        """
        current = self._access.current
        left_s = (current.valid_until_ms - now_ms()) / 1000 if current is not None else 0.0
        return min(_POLL_MAX_S, max(_POLL_MIN_S, left_s))

    def _authorization(self) -> str:
        oracle = self._access.oracle
        assert oracle is not None
        request = AccessRequest(self._identity.public, oracle, now_ms(),
                                os.urandom(REQUEST_NONCE_BYTES))
        return request.authorization(self._identity)

    async def _poll_once(self, http: aiohttp.ClientSession) -> bool:
        """One long-poll; True if the next may start at once (a list applied, or none newer).

        The oracle answers at once whenever its list differs from ours, so a list
        we refuse (older, lapsed) would come straight back: the caller backs off instead.
        """
        current = self._access.current
        params = {"epoch": "0", "after": "0", "valid_until": "0"} if current is None else {
            "epoch": str(current.epoch), "after": str(current.version),
            "valid_until": str(current.valid_until_ms)}
        async with http.get(self._url, params=params,
                            headers={"Authorization": self._authorization()}) as response:
            if response.status == 200:
                return self._access.apply(await response.read())
            if response.status == 204:
                return True
            if response.status == 401:  # also for a moment at start, until the oracle has
                # connected to this relay and so learned its key
                self._log.warning("access_list_unauthorized", relay_key=self._identity.public.text,
                                  reason=(await response.text())[:200],
                                  detail="the oracle does not accept this relay's key: add it to"
                                         " the oracle's --relay-key list")
            else:
                raise aiohttp.ClientResponseError(response.request_info, (),
                                                  status=response.status,
                                                  message=response.reason or "")
        # Refused: or the oracle restarted with a new key that this relay refuses until it
        # knows the chain, and so cannot connect here to learn this relay's key.
        return await self._fetch_chain(http)

    async def _fetch_chain(self, http: aiohttp.ClientSession) -> bool:
        """Follow the oracle's published key chain; True (poll again at once) if it moved."""
        async with http.get(self._chain_url) as response:
            if response.status != 200:
                return False
            return self._access.follow_chain(await response.read())
