"""What every part of one relay process shares: settings, store, key, metrics, log."""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import structlog

from proto import Identity

from .access import AccessControl
from .connection_gate import ConnectionGate
from .health import HealthProbe
from .metrics import RelayMetrics
from .settings import Settings
from .store import MailboxLimits, MailboxStore
from .store.base import UNBOUNDED_BYTES
from .streams.router import StreamRouter
from .streams.table import StreamBudget

if TYPE_CHECKING:
    from .presence_report import PresenceReporter
    from .store.regional import RegionalStore


@dataclass
class RelayContext:
    settings: Settings
    store: MailboxStore
    identity: Identity
    metrics: RelayMetrics
    log: structlog.typing.FilteringBoundLogger
    gate: ConnectionGate
    access: AccessControl
    streams: StreamRouter
    stream_budget: StreamBudget
    # Reports enrolled devices' connections to the oracle (None: no oracle, or turned off).
    presence: PresenceReporter | None = None
    # The region stores behind `store`, for their health (None: a relay without regions).
    regions: RegionalStore | None = None

    @functools.cached_property
    def health(self) -> HealthProbe:
        """What /healthz reports, one probe a second at most (shared by every request)."""
        return HealthProbe(self.store, self.regions)

    @functools.cached_property
    def mailbox_limits(self) -> MailboxLimits:
        """Built once (read on every accept); `settings` is frozen and never replaced."""
        settings = self.settings
        return MailboxLimits(settings.mailbox_max_messages, settings.mailbox_max_bytes,
                             sender_max_bytes=settings.sender_max_stored_bytes,
                             store_max_bytes=settings.store_max_bytes)

    @functools.cached_property
    def unmetered_mailbox_limits(self) -> MailboxLimits:
        """No per-sender byte budget; the mailboxes' and the store's bounds still apply.  For
        the oracle (one change to a large group is a list per member, tens of MiB at once)
        and for the relay's own expiry notices: their sender is the relay key, shared by
        every device's notices (on Redis, by every replica's), so one device that leaves
        its notices unread must not fill a budget that drops everyone else's."""
        return replace(self.mailbox_limits, sender_max_bytes=UNBOUNDED_BYTES)
