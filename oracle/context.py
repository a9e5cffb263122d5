"""What every part of one oracle process shares, and the key its aiohttp application keeps it by."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog
from aiohttp import web

from proto import Identity
from proto.rotation import OracleKeyChain
from runtime.client_address import client_address

from .auth import Auth
from .login_throttle import LoginThrottle
from .presence import Presence
from .publisher import AccessListPublisher
from .registry import Registry
from .relay_auth import RelayAuth
from .settings import OracleSettings
from .silence import CheckIns, SilenceWatch

if TYPE_CHECKING:
    from .pusher import Pusher


@dataclass
class OracleContext:
    settings: OracleSettings
    identity: Identity
    registry: Registry
    auth: Auth
    publisher: AccessListPublisher
    pusher: Pusher
    relay_auth: RelayAuth
    log: structlog.typing.FilteringBoundLogger
    # How this oracle's key got where it is (empty until its first rotation).
    chain: OracleKeyChain = field(default_factory=OracleKeyChain)
    login_throttle: LoginThrottle = field(default_factory=LoginThrottle)
    # Presence and silence (README "Presence"), over the registry's database.
    presence: Presence = field(init=False)
    checkins: CheckIns = field(init=False)
    silence: SilenceWatch = field(init=False)

    def __post_init__(self) -> None:
        db = self.registry.db
        self.presence, self.checkins, self.silence = Presence(db), CheckIns(db), SilenceWatch(db)


# Where the aiohttp application keeps the context, for the API, the dashboard and the middlewares.
ORACLE_KEY = web.AppKey("oracle", OracleContext)


def address_of(request: web.Request) -> str:
    """The client's address behind the trusted proxies: the audit log's "from where" and
    the login throttle's budget key."""
    return client_address(request.remote or "unknown", request.headers,
                          request.app[ORACLE_KEY].settings.proxy_trust)
