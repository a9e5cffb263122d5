"""Access control at the relay: the oracle's signed access list, fetched and enforced.

The oracle publishes which keys are enrolled and which are revoked as one
document signed with its Ed25519 key.  A relay long-polls the oracle for it
(`GET /v1/access-list?after=<version>`), verifies it with the oracle's public
key and keeps it as a cache: the relay holds no private key of the oracle and
no state another replica could not fetch itself.

The document's wire form is `proto.access.AccessList`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
import aiohttp
import structlog

from proto import PublicKey
from proto.access import ACCESS_LIST_PATH, AccessList
from proto.errors import NotEnrolledError, ProtocolError, RevokedError


class AccessControl:
    """The relay's view of the access list, and the hook that closes revoked sessions.

    With no oracle configured every key is admitted.  With one, a revoked key
    is refused; with `require_enrollment` so is every key not enrolled, and
    until a verified list arrives that means every key but the oracle's
    (fail closed).  Sessions register a callback so a revocation closes them
    the moment the list that says so is verified.
    """

    def __init__(self, oracle_url: str, oracle_key: str, require_enrollment: bool,
                 log: structlog.typing.FilteringBoundLogger) -> None:
        self.enabled = bool(oracle_url)
        self._url = oracle_url.rstrip("/") + ACCESS_LIST_PATH
        self._oracle = PublicKey.from_text(oracle_key) if oracle_key else None
        self._require_enrollment = require_enrollment
        self._log = log
        self.current: AccessList | None = None
        self._watchers: dict[PublicKey, set[Callable[[ProtocolError], None]]] = {}
        self._poller: asyncio.Task[None] | None = None
        self._loaded = asyncio.Event()

    async def start(self) -> None:
        if self.enabled:
            if self._require_enrollment:
                self._log.warning("access_list_missing_fail_closed",
                                  detail="refusing every key but the oracle's until the"
                                         " oracle's signed access list is verified")
            self._poller = asyncio.create_task(self._poll_forever(), name="access-list")

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None

    async def wait_loaded(self, timeout: float) -> bool:
        """True once a verified list is in force (tests and readiness checks)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._loaded.wait()
        return self._loaded.is_set()

    def refusal(self, key: PublicKey) -> ProtocolError | None:
        """Why `key` may not connect or be written to now; None if it may."""
        if not self.enabled or key == self._oracle:
            return None
        current = self.current
        if current is not None and key in current.revoked:
            return RevokedError(f"{key.text} has been revoked by the oracle")
        if self._require_enrollment:
            if current is None:
                return NotEnrolledError("this relay has no verified access list yet (fail closed)")
            if key not in current.enrolled:
                return NotEnrolledError(f"{key.text} is not enrolled with the oracle")
        return None

    def check_send(self, sender: PublicKey, recipients: tuple[PublicKey, ...]) -> None:
        """Raise why `sender` may not store an envelope for `recipients` now.

        Checked on every SEND against the live list, not only at the handshake:
        a key revoked while its connection is open is refused from the next SEND
        on, whatever the timing of the callback that closes that connection.
        A revoked recipient is refused too: nothing may reach it any more.
        """
        refusal = self.refusal(sender)
        if refusal is not None:
            raise refusal
        current = self.current
        if not self.enabled or current is None:
            return
        for key in recipients:
            if key in current.revoked:
                raise RevokedError(f"recipient {key.text} has been revoked by the oracle")

    def watch(self, key: PublicKey, on_refused: Callable[[ProtocolError], None]) -> Callable[[], None]:
        """Call `on_refused` if a later list refuses `key`; returns the function that unregisters."""
        self._watchers.setdefault(key, set()).add(on_refused)

        def unwatch() -> None:
            callbacks = self._watchers.get(key)
            if callbacks is not None:
                callbacks.discard(on_refused)
                if not callbacks:
                    del self._watchers[key]
        return unwatch

    def apply(self, document: bytes) -> bool:
        """Verify and install a list if it is newer; True if it was installed."""
        assert self._oracle is not None
        access = AccessList.verify(document, self._oracle)
        if self.current is not None and access.version <= self.current.version:
            return False
        self.current = access
        self._loaded.set()
        self._log.info("access_list_applied", version=access.version,
                       enrolled=len(access.enrolled), revoked=len(access.revoked))
        for key in list(self._watchers):
            error = self.refusal(key)
            if error is not None:
                for callback in list(self._watchers.get(key, ())):
                    callback(error)
        return True

    async def _poll_forever(self) -> None:
        """Long-poll the oracle; each answer is either a newer list or "nothing new yet"."""
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=60)
        backoff = 0.2
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while True:
                after = self.current.version if self.current is not None else 0
                try:
                    async with http.get(self._url, params={"after": str(after)}) as response:
                        if response.status == 200:
                            self.apply(await response.read())
                        elif response.status != 204:
                            raise aiohttp.ClientResponseError(
                                response.request_info, (), status=response.status,
                                message=response.reason or "")
                    backoff = 0.2
                except (aiohttp.ClientError, TimeoutError, ProtocolError) as exc:
                    self._log.warning("access_list_fetch_failed", url=self._url,
                                      error=f"{type(exc).__name__}: {exc}", retry_s=backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
