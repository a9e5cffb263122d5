"""Pure decisions about peer lists: who may talk to whom, and who must be told.

No database here: the registry loads memberships and the last list each
device was sent, and these functions say what every device's list should be
and which devices need a new version.  Deriving every list from scratch on
each change (instead of patching lists) means no sequence of edits can leave
a list that the groups do not justify.

Lists are handled in their storage form (sorted keys joined by spaces), not as
sets: a group of 1,000 gives 1,000 lists of 999 keys, and building, sorting and
comparing a million-key set per change kept the oracle's event loop busy for
seconds.  Devices with the same groups share one sorted list of members, and
each one's own list is that text with its own key cut out, compared with the
stored text as a string.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping

from proto.payloads import MAX_PEERS

__all__ = ["MAX_PEERS", "changed_lists", "decode_peer_text", "derive_peer_lists",
           "encode_peer_text", "peer_count"]


def derive_peer_lists(groups_of: Mapping[str, Iterable[str]],
                      active_members: Mapping[str, Iterable[str]]) -> dict[str, str]:
    """Each device's list in storage form: the other active members of all its groups.

    `groups_of` maps each device to decide about (active ones only: a revoked
    device gets no list) to its group ids; `active_members` maps every one of
    those groups to its active members (revoked devices appear in nobody's list).
    """
    by_groups: dict[frozenset[str], tuple[list[str], str, list[int]]] = {}
    lists: dict[str, str] = {}
    for device, groups in groups_of.items():
        ids = frozenset(groups)
        shared = by_groups.get(ids)
        if shared is None:
            members = sorted({m for g in ids for m in active_members.get(g, ())})
            starts, offset = [], 0
            for member in members:
                starts.append(offset)
                offset += len(member) + 1
            shared = by_groups[ids] = (members, " ".join(members), starts)
        members, text, starts = shared
        lists[device] = _without(members, text, starts, device)
    return lists


def _without(members: list[str], text: str, starts: list[int], device: str) -> str:
    """`text` (the sorted `members` joined) with `device` cut out, if it is there."""
    at = bisect.bisect_left(members, device)
    if at == len(members) or members[at] != device:
        return text
    start, end = starts[at], starts[at] + len(device)
    if at + 1 < len(members):
        return text[:start] + text[end + 1:]
    return text[:max(0, start - 1)]


def changed_lists(last_sent: Mapping[str, str], desired: Mapping[str, str]
                  ) -> dict[str, str]:
    """The devices of `desired` whose list differs from the last one issued to them.

    A device that was never sent a list counts as having an empty one, so a
    device in no group is not sent a pointless empty first version.
    """
    return {device: want for device, want in desired.items()
            if (last_sent.get(device) or "") != want}


def peer_count(text: str) -> int:
    """How many keys a list in storage form holds."""
    return text.count(" ") + 1 if text else 0


def encode_peer_text(peers: Iterable[str]) -> str:
    """Storage form of a list: sorted keys separated by spaces (keys contain none)."""
    return " ".join(sorted(peers))


def decode_peer_text(text: str) -> frozenset[str]:
    return frozenset(text.split())
