"""Who may fetch the access list: relays that sign each request with a key this oracle knows.

The list names every device key and its groups, so it is not for anyone who
can reach the oracle.  A relay already has an Ed25519 identity (the key it
signs EXPIRY notices and WELCOME with), so it signs each request with it
(`proto.access.AccessRequest`): the oracle's configuration holds only public
keys, nothing worth stealing, and a header captured in transit is good for
one request within a minute.  A shared bearer token would be one more secret
in two places, replayable for as long as it lives.

Presence reports (SPEC §20) are signed the same way, over the whole report,
and pass the same two checks here (`admit`): an allowed relay key, a nonce
not seen within the clock window.

Keys allowed: those configured (`--relay-key`, e.g. another region's relays)
and those of the relays this oracle pushes peer changes through, which proved
their key to it in WELCOME: an operator who points the oracle at a relay
already trusts that relay with every peer change.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from proto import PublicKey
from proto.access import ORACLE_CLOCK_SKEW_MS, AccessRequest
from proto.errors import UnauthenticatedError

# Nonces of accepted requests, kept while a replay could still pass the clock check.
_MAX_NONCES = 100_000


class RelayAuth:
    def __init__(self, oracle: PublicKey, configured: Collection[PublicKey],
                 learned: Callable[[], Collection[PublicKey]],
                 former: Collection[PublicKey] = ()) -> None:
        self._oracle = oracle
        # Keys this oracle rotated away from: a relay started with one still asks here.
        self._former = frozenset(former)
        self._configured = frozenset(configured)
        self._learned = learned
        # nonce → when it may be forgotten; insertion order is (nearly) expiry order.
        self._nonces: dict[bytes, int] = {}

    def check(self, header: str | None, now_ms: int) -> PublicKey:
        """The relay key a request's `Authorization` proves; a ProtocolError says why not."""
        if not header:
            raise UnauthenticatedError("the access list is served to relays only:"
                                       " sign the request (Authorization: Continuum-Relay …)")
        request = AccessRequest.verify(header, self._oracle, now_ms, self._former,
                                       allowed=self.check_allowed)
        self.admit(request.relay, request.nonce, now_ms)
        return request.relay

    def check_allowed(self, relay: PublicKey) -> None:
        """UnauthenticatedError unless `relay` may be served: before its signature is checked
        (a verify costs more than this), and again in `admit`."""
        if relay not in self._configured and relay not in self._learned():
            raise UnauthenticatedError(f"relay key {relay.text} is not allowed here")

    def admit(self, relay: PublicKey, nonce: bytes, now_ms: int) -> None:
        """Whether a signed request (its signature and clock already checked) may be served:
        UnauthenticatedError unless `relay` is allowed and `nonce` is new."""
        self.check_allowed(relay)
        self._forget_expired(now_ms)
        if nonce in self._nonces:
            raise UnauthenticatedError("relay token already used (replay)")
        if len(self._nonces) >= _MAX_NONCES:
            raise UnauthenticatedError("too many relay requests in the last minutes; retry")
        self._nonces[nonce] = now_ms + 2 * ORACLE_CLOCK_SKEW_MS

    def _forget_expired(self, now_ms: int) -> None:
        while self._nonces:
            nonce, forget_at = next(iter(self._nonces.items()))
            if forget_at > now_ms:
                return
            del self._nonces[nonce]
