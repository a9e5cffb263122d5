"""Access control at the relay: the oracle's signed access list, fetched and enforced.

The oracle publishes which keys are enrolled, which are revoked and which
peer groups each enrolled key is in, as one document signed with its Ed25519
key.  A relay long-polls the oracle for it (`GET /v1/access-list?epoch=E&after=V`,
each request signed with the relay's own key), verifies it with the oracle's
public key and keeps it as a cache: the relay holds no private key of the
oracle and no state another replica could not fetch itself.

The document's wire form is `proto.access.AccessList`; the rules are SPEC §12.
The oracle key the relay trusts moves along the oracle's key chain (SPEC §15):
the list carries the chain, and a relay whose requests the oracle refuses
fetches the chain alone (public, self-authenticating), because an oracle that
restarted with a new key cannot vouch for this relay until it has connected
to it, which it cannot do while the relay does not know its new key.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable

import aiohttp
import structlog

from proto import Identity, PublicKey
from proto.access import (ACCESS_LIST_PATH, ORACLE_KEY_CHAIN_PATH, REQUEST_NONCE_BYTES,
                          AccessList, AccessRequest, Stamp)
from proto.errors import NotEnrolledError, NotPeerError, ProtocolError, RevokedError
from proto.rotation import OracleKeyChain
from runtime.clock import now_ms

from .metrics import RelayMetrics

_RETRY_MIN_S, _RETRY_MAX_S = 0.2, 5.0


class AccessControl:
    """The relay's view of the access list, and the hook that closes revoked sessions.

    With no oracle configured every key is admitted and may write to every
    key.  With one, a revoked key is refused; with `require_enrollment` so is
    every key not enrolled, and until a verified list arrives that means every
    key but the oracle's (fail closed).  Sessions register a callback so a
    revocation closes them the moment the list that says so is verified.
    """

    def __init__(self, oracle_url: str, oracle_key: str, require_enrollment: bool,
                 identity: Identity, metrics: RelayMetrics,
                 log: structlog.typing.FilteringBoundLogger) -> None:
        self.enabled = bool(oracle_url)
        self._url = oracle_url.rstrip("/") + ACCESS_LIST_PATH
        self._chain_url = oracle_url.rstrip("/") + ORACLE_KEY_CHAIN_PATH
        # The configured key at start; from then on wherever the oracle's key chain leads.
        self._oracle = PublicKey.from_text(oracle_key) if oracle_key else None
        self._require_enrollment = require_enrollment
        self._identity = identity
        self._metrics = metrics
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

    @property
    def oracle(self) -> PublicKey | None:
        """The oracle key in force: the configured one, or where its key chain led."""
        return self._oracle

    def refusal(self, key: PublicKey) -> ProtocolError | None:
        """Why `key` may not connect now; None if it may.

        The old key of a rotated device may connect until its drain deadline,
        to fetch its mailbox: `check_send` refuses everything it sends.
        """
        if not self.enabled or key == self._oracle:
            return None
        current = self.current
        if current is not None:
            if key in current.revoked:
                return RevokedError(f"{key.text} has been revoked by the oracle")
            if key in current.oracle_chain.former:
                return RevokedError(f"{key.text} is a key the oracle rotated away from")
            until_ms = current.draining.get(key)
            if until_ms is not None:
                return None if now_ms() < until_ms else RevokedError(
                    f"{key.text} was rotated to a new key and its drain time is over")
        if self._require_enrollment:
            if current is None:
                return NotEnrolledError("this relay has no verified access list yet (fail closed)")
            if key not in current.groups:
                return NotEnrolledError(f"{key.text} is not enrolled with the oracle")
        return None

    def check_send(self, sender: PublicKey, recipients: tuple[PublicKey, ...]) -> None:
        """Raise why `sender` may not store an envelope for `recipients` now.

        Checked on every SEND against the live list, not only at the handshake:
        a key revoked while its connection is open is refused from the next SEND
        on, whatever the timing of the callback that closes that connection.
        Then every recipient (the first refusal wins; nothing is stored):

        - revoked → REVOKED: nothing may reach it any more;
        - the oracle → any enrolled key may write to it (receipts for peer changes);
        - not enrolled → NOT_ENROLLED with `require_enrollment`, else allowed:
          the oracle does not manage that key;
        - enrolled → only the oracle, or a sender sharing a peer group with it
          (NOT_PEER), so a stranger cannot fill a device's mailbox.

        The rule cannot see what an envelope means (its kind is sealed), nor
        need it: a RECEIPT from a peer passes because it comes from a peer, and
        relays' own EXPIRY notices never come here.
        A rotated device's old key (draining) sends nothing and is sent nothing:
        REVOKED, so whoever still writes to it is told.
        """
        refusal = self.refusal(sender)
        if refusal is not None:
            raise refusal
        current = self.current
        if not self.enabled or current is None:
            return
        if sender in current.draining:
            raise RevokedError(f"{sender.text} was rotated to a new key: it may only fetch"
                               " its mailbox")
        for key in recipients:
            if key in current.revoked or key in current.oracle_chain.former:
                raise RevokedError(f"recipient {key.text} has been revoked by the oracle")
            if key in current.draining:
                raise RevokedError(f"recipient {key.text} was rotated to a new key: write to"
                                   " its new key (a new peer list names it)")
            if key == self._oracle:
                if sender != key and sender not in current.groups:
                    raise NotPeerError(f"only enrolled keys may write to the oracle, not"
                                       f" {sender.text}")
            elif key not in current.groups:
                if self._require_enrollment:
                    raise NotEnrolledError(f"recipient {key.text} is not enrolled with the oracle")
            elif sender != self._oracle and not current.shares_group(sender, key):
                raise NotPeerError(f"{sender.text} shares no peer group with recipient {key.text}")

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
        """Verify and install a list if its stamp is newer; True if it was installed.

        A list older than the one in force is refused and alarmed on (log and
        `continuum_access_list_backwards`): it is a replay, or an oracle whose
        database and clock both went back (SPEC §12, README "Restoring the oracle").
        """
        assert self._oracle is not None
        access = AccessList.verify(document, self._oracle)
        current = self.current
        if current is not None and access.stamp <= current.stamp:
            if access.stamp < current.stamp:
                self._metrics.access_list_backwards.inc()
                self._log.error("access_list_went_backwards", held=str(current.stamp),
                                offered=str(access.stamp),
                                detail="refused: a replayed list, or an oracle restored with"
                                       " its clock behind the epoch of the list in force")
            return False
        if current is not None and access.epoch != current.epoch:
            self._log.info("access_list_new_epoch", held=str(current.stamp),
                           applied=str(access.stamp))
        self._follow(access.oracle)
        self.current = access
        self._loaded.set()
        self._log.info("access_list_applied", epoch=access.epoch, version=access.version,
                       enrolled=len(access.groups), revoked=len(access.revoked))
        for key in list(self._watchers):
            error = self.refusal(key)
            if error is not None:
                for callback in list(self._watchers.get(key, ())):
                    callback(error)
        return True

    def follow_chain(self, document: bytes) -> bool:
        """Take the oracle's key chain alone (`GET /v1/oracle-key-chain`); True if it led
        to a new key.  Only forward from the key in force: an old chain changes nothing."""
        assert self._oracle is not None
        chain = OracleKeyChain.decode(document)
        return self._follow(chain.follow(self._oracle))

    def _follow(self, key: PublicKey) -> bool:
        if key == self._oracle:
            return False
        self._log.warning("oracle_key_followed", former=self._oracle.text if self._oracle else None,
                          oracle_key=key.text, detail="the oracle rotated its key; configure the"
                          " new one (--oracle-key) when convenient: the old still works")
        self._oracle = key
        return True

    def _authorization(self) -> str:
        assert self._oracle is not None
        request = AccessRequest(self._identity.public, self._oracle, now_ms(),
                                os.urandom(REQUEST_NONCE_BYTES))
        return request.authorization(self._identity)

    async def _poll_forever(self) -> None:
        """Long-poll the oracle; each answer is a list to try, or "nothing new yet"."""
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=60)
        retry_s = _RETRY_MIN_S
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while True:
                try:
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

    async def _poll_once(self, http: aiohttp.ClientSession) -> bool:
        """One long-poll; True if the next may start at once (a list applied, or none newer).

        The oracle answers at once whenever its stamp differs from ours, so a list
        we refuse (older) would come straight back: the caller backs off instead.
        """
        stamp = self.current.stamp if self.current is not None else Stamp(0, 0)
        async with http.get(self._url, params={"epoch": str(stamp.epoch),
                                               "after": str(stamp.version)},
                            headers={"Authorization": self._authorization()}) as response:
            if response.status == 200:
                return self.apply(await response.read())
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
            return self.follow_chain(await response.read())
