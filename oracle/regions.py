"""The regions of one worldwide network, as the oracle assigns devices to them (SPEC §19).

Every device has a home region: the region whose store holds its mailbox,
whichever relay it uses.  The oracle assigns it (new devices, and keys it
does not place at all, such as its own, are homed in the oracle's own
region: where the relays it pushes through are) and publishes it in the
signed access list; an administrator may move a device or a whole group
elsewhere.  After a move the list names the former home for `move_drain_ms`,
so that relays move the mail still waiting there: a window as long as the
longest TTL relays accept (and their clock window), after which whatever was
stored there before the move has expired, its senders told.
"""

from __future__ import annotations

from dataclasses import dataclass

from proto.regions import region_name
from proto.errors import InvalidFieldError

from .errors import InvalidInput


@dataclass(frozen=True)
class Regions:
    """`default` is the oracle's own region; `names` every region, sorted."""

    default: str
    names: tuple[str, ...]
    move_drain_ms: int

    def parse(self, value: object) -> str:
        """A region this network has, or InvalidInput naming the ones it has."""
        try:
            name = region_name(value)
        except InvalidFieldError as exc:
            raise InvalidInput(exc.message) from None
        if name not in self.names:
            raise InvalidInput(f"no region {name!r} here: the regions are"
                               f" {', '.join(self.names)}")
        return name
