"""Access control at the relay: the oracle's signed access list, checked and enforced.

The oracle publishes which keys are enrolled, which are revoked and which
peer groups each enrolled key is in, as one document signed with its Ed25519
key.  `access_fetch` long-polls the oracle for it; this module decides whether
each list may be applied and what the one in force allows.  The relay holds
no private key of the oracle and no state another replica could not fetch
itself, but the highest stamp applied (the floor), which the store keeps.

The document's wire form is `proto.access.AccessList`; the rules are SPEC §12.
A list is applied only while valid (issued no later than the clock allows, not
yet lapsed) and only if its stamp is not below the floor and the list in
force; a refresh (same stamp, valid for longer) replaces the one in force.
While the relay holds no valid list (none yet, or the one in force lapsed
because the oracle is not heard from), `access_list_expired` decides:
fail-closed refuses every key but the oracle's and disconnects the rest,
alarm keeps enforcing the lapsed list.  Both log, count and report it.
The oracle key the relay trusts moves along the oracle's key chain (SPEC §15).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Callable
from enum import StrEnum

import structlog

from proto import PublicKey
from proto.access import AccessList, Stamp
from proto.errors import (AccessListUnavailableError, NotEnrolledError, NotPeerError,
                          ProtocolError, RevokedError, StoreUnavailableError)
from proto.rotation import OracleKeyChain
from runtime.clock import now_ms
from runtime.tasks import cancel_and_wait

from .metrics import RelayMetrics
from .settings import FAIL_CLOSED, Settings

# While the list in force stays lapsed, the warning is logged again this often.
_REMIND_S = 60.0


class ListState(StrEnum):
    """What the relay holds, as /healthz reports it."""

    OFF = "off"  # no oracle configured: every key is admitted
    MISSING = "missing"  # no list verified since this relay started
    VALID = "valid"
    EXPIRED = "expired"  # the list in force lapsed: the oracle is not heard from


class AccessControl:
    """The relay's view of the access list, and the hook that closes refused sessions.

    With no oracle configured every key is admitted and may write to every
    key.  With one, a revoked key is refused; with `require_enrollment` so is
    every key not enrolled.  Without a valid list, see the module docstring.
    Sessions register a callback so a revocation (or, under fail-closed, the
    lapse of the list) closes them the moment it takes effect.
    """

    def __init__(self, settings: Settings, metrics: RelayMetrics,
                 log: structlog.typing.FilteringBoundLogger) -> None:
        self.enabled = bool(settings.oracle_url)
        # The configured key at start; from then on wherever the oracle's key chain leads.
        self._oracle = PublicKey.from_text(settings.oracle_key) if settings.oracle_key else None
        self._require_enrollment = settings.require_enrollment
        self._fail_closed = settings.access_list_expired == FAIL_CLOSED
        # This relay's region (SPEC §19): the home of every key while no list places it.
        self.region = settings.region
        self._metrics = metrics
        self._log = log
        self.current: AccessList | None = None
        # The highest stamp any relay on this store applied (`access_fetch` reads and raises it).
        self.floor = Stamp(0, 0)
        self._watchers: dict[PublicKey, set[Callable[[ProtocolError], None]]] = {}
        self._on_applied: list[Callable[[], None]] = []
        self._loaded = asyncio.Event()
        self._applied = asyncio.Event()
        self._alarm: asyncio.Task[None] | None = None
        metrics.access_list_age.set_function(self._age_s)
        metrics.access_list_expired.set_function(
            lambda: float(self.state in (ListState.MISSING, ListState.EXPIRED)))

    async def start(self) -> None:
        if not self.enabled:
            return
        if self._fail_closed or self._require_enrollment:
            self._log.warning("access_list_missing_fail_closed",
                              detail="refusing every key but the oracle's until the"
                                     " oracle's signed access list is verified")
        self._alarm = asyncio.create_task(self._alarm_forever(), name="access-list-expiry")

    async def stop(self) -> None:
        task, self._alarm = self._alarm, None
        await cancel_and_wait(task)

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

    @property
    def state(self) -> ListState:
        if not self.enabled:
            return ListState.OFF
        current = self.current
        if current is None:
            return ListState.MISSING
        return ListState.EXPIRED if current.expired(now_ms()) else ListState.VALID

    def health(self) -> dict[str, object]:
        """The access list's part of /healthz."""
        report: dict[str, object] = {"state": self.state.value}
        if self.enabled:
            report["on_expiry"] = "fail-closed" if self._fail_closed else "alarm"
        current = self.current
        if current is not None:
            report.update(stamp=str(current.stamp), age_s=round(self._age_s(), 1),
                          valid_until_ms=current.valid_until_ms)
        return report

    def _age_s(self) -> float:
        current = self.current
        return (now_ms() - current.issued_at_ms) / 1000 if current is not None else math.nan

    def refusal(self, key: PublicKey) -> ProtocolError | None:
        """Why `key` may not connect now; None if it may.

        The old key of a rotated device may connect until its drain deadline,
        to fetch its mailbox: `check_send` refuses everything it sends.
        """
        if not self.enabled or key == self._oracle:
            return None
        current = self.current
        if current is None or now_ms() >= current.valid_until_ms:  # on every SEND: inlined
            refusal = self._without_valid_list(current)
            if refusal is not None:
                return refusal
        if current is not None:
            if key in current.revoked:
                return RevokedError(f"{key.text} has been revoked by the oracle")
            if key in current.oracle_chain.former:
                return RevokedError(f"{key.text} is a key the oracle rotated away from")
            until_ms = current.draining.get(key)
            if until_ms is not None:
                return None if now_ms() < until_ms else RevokedError(
                    f"{key.text} was rotated to a new key and its drain time is over")
            if self._require_enrollment and key not in current.groups:
                return NotEnrolledError(f"{key.text} is not enrolled with the oracle")
        return None

    def _without_valid_list(self, current: AccessList | None) -> ProtocolError | None:
        """The refusal of every key but the oracle's while no valid list is held, if any.

        Fail-closed refuses; alarm goes on with the lapsed list, or before a first
        list admits what enrollment allows (nothing, when it is required).
        """
        if current is None:
            if self._fail_closed or self._require_enrollment:
                return AccessListUnavailableError(
                    "this relay has not verified an access list from the oracle yet (fail"
                    " closed): retry later")
        elif self._fail_closed:
            return AccessListUnavailableError(
                f"this relay's access list {current.stamp} lapsed and the oracle has not been"
                " heard from since (fail closed): retry later")
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

    def home_of(self, key: PublicKey) -> str:
        """The region whose store holds `key`'s mailbox (SPEC §19): where the list in force
        places it, else this relay's own region (no oracle, or a list without regions)."""
        current = self.current
        if current is None or not current.regions:
            return self.region
        home = current.home_of(key)
        assert home is not None
        return home

    def former_home_of(self, key: PublicKey) -> str | None:
        """The region `key`'s mailbox moved away from, while mail may still wait there."""
        current = self.current
        return None if current is None else current.former_homes.get(key)

    def list_stamp(self) -> Stamp:
        """The stamp of the list in force, Stamp(0, 0) without one: what orders moves of a
        mailbox between regions made by relays on different lists (SPEC §19)."""
        current = self.current
        return Stamp(0, 0) if current is None else current.stamp

    def watch(self, key: PublicKey, on_refused: Callable[[ProtocolError], None]) -> Callable[[], None]:
        """Call `on_refused` if a later list refuses `key`, or moves its mailbox to another
        region (its session then reconnects, to be served from there); returns the function
        that unregisters."""
        self._watchers.setdefault(key, set()).add(on_refused)

        def unwatch() -> None:
            callbacks = self._watchers.get(key)
            if callbacks is not None:
                callbacks.discard(on_refused)
                if not callbacks:
                    del self._watchers[key]
        return unwatch

    def on_applied(self, callback: Callable[[], None]) -> None:
        """Call `callback` after each list is installed, once the sessions it refuses are
        told: what the relay carries on the strength of the list before (streams,
        `StreamRouter.access_changed`) is checked against the new one."""
        self._on_applied.append(callback)

    def apply(self, document: bytes) -> bool:
        """Verify a list and install it if it may be; True if it was installed.

        Refused, counted and logged as errors: a list that is not valid now
        (`continuum_access_list_untimely`: lapsed, or issued ahead of this
        clock), and a list whose stamp is below the one in force or the floor
        (`continuum_access_list_backwards`: a replay, or an oracle whose database
        and clock both went back; SPEC §12, README "Restoring the oracle").  An
        equal stamp is installed only as a refresh: valid for longer.
        """
        assert self._oracle is not None
        access = AccessList.verify(document, self._oracle)
        now = now_ms()
        untimely = access.timeliness(now)
        if untimely is not None:
            reason = "future" if access.issued_at_ms > now else "expired"
            self._metrics.access_list_untimely.labels(reason).inc()
            self._log.error("access_list_untimely", offered=str(access.stamp), reason=reason,
                            detail=untimely.message)
            return False
        current = self.current
        highest = max(self.floor, current.stamp) if current is not None else self.floor
        if access.stamp < highest:
            self._metrics.access_list_backwards.inc()
            self._log.error("access_list_went_backwards", offered=str(access.stamp),
                            held=str(current.stamp) if current is not None else None,
                            floor=str(self.floor),
                            detail="refused: a replayed list, or an oracle restored with"
                                   " its clock behind the epoch of a list applied before")
            return False
        lapsed = current is not None and current.expired(now)
        homes_before = {key: self.home_of(key) for key in self._watchers} if self.region else {}
        if current is not None and access.stamp == current.stamp:
            if access.valid_until_ms <= current.valid_until_ms:
                return False  # the one in force, or an older signing of it
            if not access.same_content(current):
                self._metrics.access_list_backwards.inc()
                self._log.error("access_list_stamp_reused", stamp=str(access.stamp),
                                detail="refused: another list under the stamp in force (an"
                                       " oracle restored with its clock behind?)")
                return False
            self._install(access)
            self._log.debug("access_list_refreshed", stamp=str(access.stamp),
                            valid_until_ms=access.valid_until_ms)
        else:
            if current is not None and access.epoch != current.epoch:
                self._log.info("access_list_new_epoch", held=str(current.stamp),
                               applied=str(access.stamp))
            self._follow(access.oracle)
            self._install(access)
            self._log.info("access_list_applied", epoch=access.epoch, version=access.version,
                           enrolled=len(access.groups), revoked=len(access.revoked),
                           valid_until_ms=access.valid_until_ms)
        if lapsed:
            self._log.warning("access_list_valid_again", stamp=str(access.stamp),
                              detail="the oracle is heard from again")
        self._check_regions(access)
        self._refuse_watched()
        self._move_watched(homes_before)
        for callback in self._on_applied:
            callback()
        return True

    def _check_regions(self, access: AccessList) -> None:
        """Say so when the list's regions and this relay's setting cannot both be right."""
        if access.regions and not self.region:
            self._log.warning("access_list_regions_ignored", regions=list(access.regions),
                              detail="the oracle places mailboxes in regions, but this relay has"
                                     " no --region: it treats every key as local")
        elif self.region and access.regions and self.region not in access.regions:
            self._log.error("relay_region_unknown_to_oracle", region=self.region,
                            regions=list(access.regions),
                            detail="no device is homed here; check --region")

    def _move_watched(self, homes_before: dict[PublicKey, str]) -> None:
        """Close every watched session whose mailbox now lives in another region: its
        reconnection is served from the new home (and moves what waits in the old one)."""
        for key, before in homes_before.items():
            after = self.home_of(key)
            if after != before:
                error = StoreUnavailableError(f"the mailbox of {key.text} moved from region"
                                              f" {before} to {after}: reconnect")
                for callback in list(self._watchers.get(key, ())):
                    callback(error)

    def _install(self, access: AccessList) -> None:
        self.current = access
        self._loaded.set()
        self._applied.set()

    def _refuse_watched(self) -> None:
        """Close every watched session whose key the relay refuses now."""
        for key in list(self._watchers):
            error = self.refusal(key)
            if error is not None:
                for callback in list(self._watchers.get(key, ())):
                    callback(error)

    async def _alarm_forever(self) -> None:
        """When the list in force lapses: warn (again every _REMIND_S while it stays lapsed)
        and, under fail-closed, disconnect every session but the oracle's."""
        while True:
            self._applied.clear()
            current = self.current
            wait_s: float | None = None  # until a list is applied
            if current is not None:
                wait_s = (current.valid_until_ms - now_ms()) / 1000
                if wait_s <= 0:
                    self._log.warning(
                        "access_list_expired", stamp=str(current.stamp),
                        lapsed_s=round(-wait_s, 1), valid_until_ms=current.valid_until_ms,
                        on_expiry="fail-closed" if self._fail_closed else "alarm",
                        detail="the oracle has not been heard from: "
                               + ("refusing every key but the oracle's" if self._fail_closed
                                  else "still enforcing the lapsed list, which misses any"
                                       " revocation since"))
                    if self._fail_closed:
                        self._refuse_watched()
                    wait_s = _REMIND_S
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_s):
                    await self._applied.wait()

    def follow_chain(self, document: bytes) -> bool:
        """Take the oracle's key chain alone (`GET /v1/oracle-key-chain`); True if it led
        to a new key.  Only forward from the key in force: an old chain changes nothing."""
        assert self._oracle is not None
        chain = OracleKeyChain.decode(document, trusted=self._oracle)
        return self._follow(chain.follow(self._oracle))

    def _follow(self, key: PublicKey) -> bool:
        if key == self._oracle:
            return False
        self._log.warning("oracle_key_followed", former=self._oracle.text if self._oracle else None,
                          oracle_key=key.text, detail="the oracle rotated its key; configure the"
                          " new one (--oracle-key) when convenient: the old still works")
        self._oracle = key
        return True
