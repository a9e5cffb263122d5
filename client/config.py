"""The configuration a device applied: the oracle's document, its stamp and oracle (SPEC §21).

The oracle sends CONFIG envelopes whose stamp (epoch, version) only grows;
the device applies one only if it stands NEWER than the one it applied
(`peers.rank`, the rule of peer lists), so a re-delivery or a replayed older
document never undoes a newer one.  With a home the applied configuration is
kept in `config.json` there, written atomically and on disk before the
device reports it, so the rule holds across restarts:

    {"config": {…}, "epoch": 1712345678901, "oracle": "cpk_…", "reported": {…}, "version": 4}

`config` is the document exactly as the oracle merged it (SPEC §21, "Merge");
`reported` what the application reported for it (sent again on a re-delivery).
Without a home it lives in memory: a replay after a restart is then refused
only once its envelope is stale (created_at + ttl + skew).
"""

from __future__ import annotations

import json
from pathlib import Path

from proto import PublicKey
from proto.access import Stamp
from proto.config import ConfigPush, JsonObject, parse_document
from proto.errors import ProtocolError
from runtime.files import write_atomically

from .peers import Standing, rank

CONFIG_FILE = "config.json"


# What an `on_config` callback is given: the oracle's push as decoded, its merged
# document and stamp (one type for both: the device adds nothing to what the oracle sent).
ConfigUpdate = ConfigPush


class AppliedConfig:
    """The configuration in force on this device, with the stamp and oracle it came from."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.stamp = Stamp(0, 0)
        self.oracle: PublicKey | None = None
        self.document: JsonObject = {}
        self.reported: JsonObject = {}

    @classmethod
    def in_home(cls, home: Path) -> AppliedConfig:
        """The one kept in a device's home (`config.json`), none applied if absent."""
        applied = cls(home / CONFIG_FILE)
        if applied.path is not None and applied.path.exists():
            applied._load(applied.path)
        return applied

    def _load(self, path: Path) -> None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise ValueError("expected a JSON object")
            epoch, version = data.get("epoch", 0), data.get("version", 0)
            for name, number in (("epoch", epoch), ("version", version)):
                if type(number) is not int or not 0 <= number < 2**63:
                    raise ValueError(f"{name} must be a non-negative integer")
            oracle = PublicKey.from_text(data["oracle"]) if "oracle" in data else None
            document = parse_document(json.dumps(data.get("config", {})))
            reported = parse_document(json.dumps(data.get("reported", {})), "reported state")
        except (OSError, ValueError, TypeError, ProtocolError) as exc:
            raise ValueError(f"{path}: {getattr(exc, 'message', exc)}") from None
        self.stamp, self.oracle = Stamp(epoch, version), oracle
        self.document, self.reported = document, reported

    def standing(self, stamp: Stamp, oracle: PublicKey) -> Standing:
        return rank(self.stamp, self.oracle, stamp, oracle)

    def apply(self, update: ConfigUpdate, oracle: PublicKey, reported: JsonObject) -> None:
        """Hold `update` as applied, with what the application reported (on disk first)."""
        previous = self.stamp, self.oracle, self.document, self.reported
        self.stamp, self.oracle = update.stamp, oracle
        self.document, self.reported = update.document, reported
        try:
            self._save()
        except BaseException:
            self.stamp, self.oracle, self.document, self.reported = previous
            raise

    def follow_oracle(self, former: PublicKey, current: PublicKey) -> None:
        """The oracle rotated its key (SPEC §15): its documents go on counting from ours."""
        if self.oracle == former:
            self.oracle = current
            self._save()

    def _save(self) -> None:
        if self.path is None:
            return
        record = {"epoch": self.stamp.epoch, "version": self.stamp.version,
                  **({"oracle": self.oracle.text} if self.oracle is not None else {}),
                  "config": self.document, "reported": self.reported}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(record, indent=2, ensure_ascii=False, sort_keys=True) + "\n"
        write_atomically(self.path, text.encode("utf-8"))
