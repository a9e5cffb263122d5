"""The oracle's records: what the registry reads from its database, as frozen values.

A row is not a device: `DeviceRecord` is what the oracle knows about one
enrolled key (the client library's `Device` is the device itself).  The
records an administrator sees render themselves (`to_json`), so the API
has one spelling of each field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Any


@dataclass(frozen=True)
class DeviceRecord:
    key: str
    name: str
    tags: tuple[str, ...]
    enrolled_at_ms: int
    revoked_at_ms: int | None
    last_seen_ms: int | None
    peer_version: int
    acked_version: int
    groups: tuple[str, ...]
    # Key rotation: the key this device moved to (this record is then revoked) or came from.
    rotated_to: str | None = None
    rotated_from: str | None = None
    # Until when a rotated device's old key may still drain its mailbox.
    drain_until_ms: int | None = None
    # Where its mailbox lives (SPEC §19; None without regions), and the home it last moved
    # from, and when (relays move mail still waiting there).
    home_region: str | None = None
    former_region: str | None = None
    moved_at_ms: int | None = None
    # Configuration (SPEC §21): the newest version issued, and the one it last reported.
    config_version: int = 0
    reported_config_version: int = 0

    @property
    def revoked(self) -> bool:
        return self.revoked_at_ms is not None

    @property
    def behind(self) -> bool:
        """Issued a peer list the device has not acknowledged yet."""
        return not self.revoked and self.acked_version < self.peer_version

    @property
    def config_behind(self) -> bool:
        """Issued a configuration it has not reported applying."""
        return not self.revoked and self.reported_config_version < self.config_version

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "name": self.name, "tags": list(self.tags),
                "enrolled_at_ms": self.enrolled_at_ms, "revoked_at_ms": self.revoked_at_ms,
                "revoked": self.revoked, "last_seen_ms": self.last_seen_ms,
                "peer_version": self.peer_version, "acked_version": self.acked_version,
                "behind": self.behind, "groups": list(self.groups),
                "rotated_to": self.rotated_to, "rotated_from": self.rotated_from,
                "drain_until_ms": self.drain_until_ms, "home_region": self.home_region,
                "former_region": self.former_region, "moved_at_ms": self.moved_at_ms,
                "config_version": self.config_version,
                "reported_config_version": self.reported_config_version,
                "config_behind": self.config_behind}


@dataclass(frozen=True)
class Revocation:
    """What revoking a key did: the record, and the keys whose drain it ended (SPEC §15),
    so the answer says when a revoke of a key already revoked still changed something."""

    device: DeviceRecord
    drains_ended: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {**self.device.to_json(), "drains_ended": list(self.drains_ended)}


@dataclass(frozen=True)
class DeviceCounts:
    """The fleet at a glance: the dashboard's summary and the /metrics gauges."""

    total: int
    revoked: int
    behind: int
    # Active devices issued a configuration they have not reported applying (SPEC §21).
    config_behind: int = 0

    @property
    def active(self) -> int:
        return self.total - self.revoked


@dataclass(frozen=True)
class GroupRecord:
    id: str
    name: str
    created_at_ms: int
    members: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "created_at_ms": self.created_at_ms,
                "members": list(self.members), "member_count": len(self.members)}


@dataclass(frozen=True)
class GroupSummary:
    """A group as its page heads it: its member count, not its members (a page of them is
    read like any device list)."""

    id: str
    name: str
    created_at_ms: int
    member_count: int


@dataclass(frozen=True)
class GroupRef:
    """A group as a device's page names it: no member list."""

    id: str
    name: str


@dataclass(frozen=True)
class PendingPush:
    """The newest unsent peer-change version of one device."""

    device_key: str
    epoch: int
    version: int
    peers: frozenset[str]
    envelope: str | None
    attempts: int


@dataclass(frozen=True)
class PushStatus:
    device_key: str
    version: int
    created_at_ms: int
    sent_at_ms: int | None
    acked_at_ms: int | None
    attempts: int
    last_error: str | None

    def to_json(self) -> dict[str, Any]:
        return {"device_key": self.device_key, "version": self.version,
                "created_at_ms": self.created_at_ms, "sent_at_ms": self.sent_at_ms,
                "acked_at_ms": self.acked_at_ms, "attempts": self.attempts,
                "last_error": self.last_error}


@dataclass(frozen=True)
class AccessSnapshot:
    """What the access list is built from: stamp, keys, the group ids of each enrolled key
    that is in a group, and the old keys of rotated devices with their drain deadline."""

    epoch: int
    version: int
    enrolled: frozenset[str]
    revoked: frozenset[str]
    groups: Mapping[str, frozenset[str]]
    draining: Mapping[str, int] = field(default_factory=dict)
    # With regions (SPEC §19): the home of every enrolled and draining key, and the former
    # home of enrolled keys that moved within the drain window.
    homes: Mapping[str, str] = field(default_factory=dict)
    former: Mapping[str, str] = field(default_factory=dict)
