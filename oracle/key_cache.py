"""Device keys parsed once: text form → `PublicKey`, shared by the publisher and the pusher.

Parsing a key checks that it is a valid curve point, about 18 µs; a list of
1,000 peers sealed for each of 1,000 members parsed a million keys (18 s of
the event loop) for one member added.  The cache holds every key seen, so it
is bounded by the keys in the database.
"""

from __future__ import annotations

from proto import PublicKey


class KeyCache:
    def __init__(self) -> None:
        self._keys: dict[str, PublicKey] = {}

    def __call__(self, text: str) -> PublicKey:
        key = self._keys.get(text)
        if key is None:
            key = self._keys[text] = PublicKey.from_text(text)
        return key
