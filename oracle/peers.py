"""Pure decisions about peer lists: who may talk to whom, and who must be told.

No database here: the registry loads memberships and the last list each
device was sent, and these functions say what every device's list should be
and which devices need a new version.  Deriving every list from scratch on
each change (instead of patching lists) means no sequence of edits can leave
a list that the groups do not justify.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping


def derive_peer_lists(memberships: Iterable[tuple[str, str]],
                      revoked: set[str]) -> dict[str, frozenset[str]]:
    """Each device's peers: the other members of all its groups, minus revoked devices.

    `memberships` are (group_id, device_key) pairs.  Revoked devices get no
    list (nothing can reach them any more) and appear in nobody's.
    """
    groups: dict[str, set[str]] = {}
    for group_id, device in memberships:
        groups.setdefault(group_id, set()).add(device)
    lists: dict[str, set[str]] = {}
    for members in groups.values():
        active = members - revoked
        for device in active:
            lists.setdefault(device, set()).update(active - {device})
    return {device: frozenset(peers) for device, peers in lists.items()}


def changed_lists(last_sent: Mapping[str, frozenset[str]], desired: Mapping[str, frozenset[str]],
                  active: Iterable[str]) -> dict[str, frozenset[str]]:
    """The active devices whose desired list differs from the last one issued to them.

    A device that was never sent a list counts as having an empty one, so a
    device in no group is not sent a pointless empty first version.
    """
    changes = {}
    for device in active:
        want = desired.get(device, frozenset())
        if last_sent.get(device, frozenset()) != want:
            changes[device] = want
    return changes


def encode_peer_text(peers: Iterable[str]) -> str:
    """Storage form of a list: sorted keys separated by spaces (keys contain none)."""
    return " ".join(sorted(peers))


def decode_peer_text(text: str) -> frozenset[str]:
    return frozenset(text.split())
