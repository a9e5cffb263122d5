"""Region names: where a device's mailbox lives (SPEC §19).

One worldwide network is a set of regions, each with its own mailbox store;
every device has a home region, named in the oracle's signed access list, and
its mailbox lives in that region's store whichever relay it talks to.  A
region is named by a short lower-case word, spelt the same way in the access
list, in relay and oracle settings, in metrics labels and on the dashboard, so
the one rule is here.
"""

from __future__ import annotations

import re

from .errors import InvalidFieldError

# Enough for every continent several times over; the access list numbers them in one byte.
MAX_REGIONS = 64
MAX_REGION_NAME_CHARS = 32
_NAME = re.compile(r"[a-z][a-z0-9-]{0,%d}" % (MAX_REGION_NAME_CHARS - 1))


def is_region_name(text: object) -> bool:
    """A lower-case letter, then up to 31 lower-case letters, digits or '-'."""
    return type(text) is str and _NAME.fullmatch(text) is not None


def region_name(text: object, what: str = "region") -> str:
    """`text` if it is a region name, else InvalidFieldError saying what a name is."""
    if not is_region_name(text):
        raise InvalidFieldError(
            f"{what} must be a lower-case letter followed by at most"
            f" {MAX_REGION_NAME_CHARS - 1} lower-case letters, digits or '-', not {text!r}")
    assert isinstance(text, str)
    return text
