"""What an administrator may type: keys, names and tags, checked before anything is stored.

The registry checks every value it is given and the API checks the keys in
its paths, with the same rules and messages; each parser returns the
canonical form (a key in its one text spelling, a trimmed name, sorted tags)
or raises InvalidInput saying what is wrong.
"""

from __future__ import annotations

import re

from proto import PublicKey
from proto.errors import InvalidFieldError

from .errors import InvalidInput

_TAG = re.compile(r"^[a-z0-9][a-z0-9._:-]{0,31}$")
MAX_NAME_CHARS = 100
MAX_TAGS = 16


def parse_key(text: object) -> str:
    """The canonical cpk_… spelling, or InvalidInput naming the problem (typo, checksum)."""
    if not isinstance(text, str):
        raise InvalidInput("key must be a cpk_… string")
    try:
        return PublicKey.from_text(text.strip()).text
    except InvalidFieldError as exc:
        raise InvalidInput(exc.message) from None


def parse_name(text: object, what: str) -> str:
    if not isinstance(text, str) or not text.strip() or len(text.strip()) > MAX_NAME_CHARS:
        raise InvalidInput(f"{what} must be 1..{MAX_NAME_CHARS} characters")
    return text.strip()


def parse_tags(value: object) -> tuple[str, ...]:
    """Tags from a list or a comma/space separated string; lower case, deduplicated."""
    if isinstance(value, str):
        value = re.split(r"[\s,]+", value)
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise InvalidInput("tags must be a list of strings")
    tags = sorted({t.strip().lower() for t in value if t.strip()})
    if len(tags) > MAX_TAGS or not all(_TAG.match(t) for t in tags):
        raise InvalidInput(f"at most {MAX_TAGS} tags of 1..32 characters [a-z0-9._:-]")
    return tuple(tags)
