"""The allowed-peer list: the only keys whose messages a device surfaces.

A person edits it with `continuum-client peers …`; the oracle replaces it with
signed PEER_CHANGE envelopes whose stamp (epoch, version) only grows.  The
stamp is kept with the list, and so is the oracle that issued it, so a
re-delivered or replayed older change can never undo a newer one, across
restarts too, while the first list of a *different* oracle (after
`enroll --replace`) is taken whatever its count: versions of two oracles are
not comparable.  Local edits keep the stamp: the oracle's next change wins
over them.

File form (JSON, replaced atomically and on disk before the device receipts
it, so neither a crash nor a power cut leaves half a list or a receipt for a
list it does not hold; `oracle` and `epoch` appear once an oracle's list is
held):

    {"version": 3, "peers": ["cpk_…", "cpk_…"], "oracle": "cpk_…", "epoch": 1712345678901}
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from enum import Enum
from pathlib import Path

from proto import PublicKey
from proto.access import Stamp
from proto.errors import ProtocolError
from runtime.files import write_atomically

# The file in a device's home (the CLI's and the library's alike).
PEERS_FILE = "peers.json"


class Standing(Enum):
    """How an oracle's list compares with the one held."""

    NEWER = "newer"  # replaces the held list
    HELD = "held"  # the very list held now (a re-delivery)
    OLDER = "older"  # behind the held list: a replay, or an oracle that went back


def rank(held: Stamp, held_oracle: PublicKey | None, stamp: Stamp,
         oracle: PublicKey | None) -> Standing:
    """Where a document stamped `stamp` by `oracle` stands against one held from
    `held_oracle`: the rule of every stamped word of the oracle (peer lists, configuration).

    Another oracle's is NEWER (the device was enrolled with a new oracle, whose
    count starts afresh); one held of unknown origin is compared by stamp alone.
    """
    if held_oracle is not None and oracle != held_oracle:
        return Standing.NEWER
    if stamp > held:
        return Standing.NEWER
    return Standing.HELD if stamp == held else Standing.OLDER


class PeerList:
    """A set of public keys plus the stamp and oracle it came from; saved on every change."""

    def __init__(self, peers: Iterable[PublicKey] = (), version: int = 0,
                 path: Path | None = None, *, epoch: int = 0,
                 oracle: PublicKey | None = None) -> None:
        self._peers = set(peers)
        self.version = version
        self.epoch = epoch
        self.oracle = oracle
        self.path = path

    @classmethod
    def in_home(cls, home: Path) -> PeerList:
        """The list kept in a device's home (`peers.json`), empty if there is none yet."""
        return cls.load(home / PEERS_FILE)

    @classmethod
    def load(cls, path: Path) -> PeerList:
        """Read `path`, or start empty (bound to `path`) if it does not exist yet."""
        if not path.exists():
            return cls(path=path)
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not isinstance(data.get("peers"), list):
            raise ValueError(f"{path}: expected {{\"version\": int, \"peers\": [cpk_…]}}")
        version, epoch = data.get("version", 0), data.get("epoch", 0)
        for name, number in (("version", version), ("epoch", epoch)):
            if type(number) is not int or number < 0:
                raise ValueError(f"{path}: {name} must be a non-negative integer")
        try:
            keys = [PublicKey.from_text(text) for text in data["peers"]]
            oracle = PublicKey.from_text(data["oracle"]) if "oracle" in data else None
        except (ProtocolError, TypeError) as exc:
            raise ValueError(f"{path}: {getattr(exc, 'message', exc)}") from None
        return cls(keys, version, path, epoch=epoch, oracle=oracle)

    @property
    def stamp(self) -> Stamp:
        return Stamp(self.epoch, self.version)

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

    def standing(self, stamp: Stamp, oracle: PublicKey | None = None) -> Standing:
        """Where a list stamped `stamp` by `oracle` stands against the held one.

        A list from another oracle than the one the held list came from is
        NEWER: the device was enrolled with a new oracle, whose count starts
        afresh.  A held list of unknown origin (a local list, or a file from
        before oracles were recorded) is compared by stamp alone.
        """
        return rank(self.stamp, self.oracle, stamp, oracle)

    def replace(self, version: int, peers: Iterable[PublicKey], *, epoch: int = 0,
                oracle: PublicKey | None = None) -> bool:
        """Adopt the oracle's list if it stands NEWER; False (unchanged) otherwise."""
        if self.standing(Stamp(epoch, version), oracle) is not Standing.NEWER:
            return False
        self._peers = set(peers)
        self.version, self.epoch, self.oracle = version, epoch, oracle
        self._save()
        return True

    def follow_oracle(self, former: PublicKey, current: PublicKey) -> None:
        """The oracle rotated from `former` to `current` (SPEC §15): the held list stays, and
        the new key's lists are ranked against its stamp, as the same oracle's are."""
        if self.oracle == former:
            self.oracle = current
            self._save()

    def _save(self) -> None:
        if self.path is None:
            return
        document: dict[str, object] = {"version": self.version,
                                       "peers": [key.text for key in self]}
        if self.oracle is not None:
            document["oracle"] = self.oracle.text
        if self.epoch:
            document["epoch"] = self.epoch
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(self.path, (json.dumps(document, indent=2) + "\n").encode("utf-8"))
