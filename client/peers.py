"""The allowed-peer list: the only keys whose messages a device surfaces.

A person edits it with `continuum-client peers …`; the oracle replaces it with
signed PEER_CHANGE envelopes whose `version` only grows.  The version is kept
with the list so a re-delivered or replayed older change can never undo a
newer one, across restarts too.  Local edits keep the version: the oracle's
next change wins over them.

File form (JSON, written atomically so a crash never leaves half a list):

    {"version": 3, "peers": ["cpk_…", "cpk_…"]}
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from proto import PublicKey
from proto.errors import ProtocolError


class PeerList:
    """A set of public keys plus the oracle version it came from; saved on every change."""

    def __init__(self, peers: Iterable[PublicKey] = (), version: int = 0,
                 path: Path | None = None) -> None:
        self._peers = set(peers)
        self.version = version
        self.path = path

    @classmethod
    def load(cls, path: Path) -> PeerList:
        """Read `path`, or start empty (bound to `path`) if it does not exist yet."""
        if not path.exists():
            return cls(path=path)
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not isinstance(data.get("peers"), list):
            raise ValueError(f"{path}: expected {{\"version\": int, \"peers\": [cpk_…]}}")
        version = data.get("version", 0)
        if type(version) is not int or version < 0:
            raise ValueError(f"{path}: version must be a non-negative integer")
        try:
            keys = [PublicKey.from_text(text) for text in data["peers"]]
        except ProtocolError as exc:
            raise ValueError(f"{path}: {exc.message}") from None
        return cls(keys, version, path)

    def __contains__(self, key: object) -> bool:
        return key in self._peers

    def __iter__(self) -> Iterator[PublicKey]:
        return iter(sorted(self._peers))

    def __len__(self) -> int:
        return len(self._peers)

    def add(self, keys: Iterable[PublicKey]) -> None:
        self._peers.update(keys)
        self._save()

    def remove(self, keys: Iterable[PublicKey]) -> None:
        self._peers.difference_update(keys)
        self._save()

    def replace(self, version: int, peers: Iterable[PublicKey]) -> bool:
        """Adopt the oracle's list if `version` is newer; False (unchanged) otherwise."""
        if version <= self.version:
            return False
        self._peers = set(peers)
        self.version = version
        self._save()
        return True

    def _save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        document = {"version": self.version, "peers": [key.text for key in self]}
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        os.replace(temporary, self.path)
