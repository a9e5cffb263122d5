"""The CLI's one typed settings object: flags, then CONTINUUM_* variables, then defaults.

The home directory holds everything a device keeps between runs:

    identity.key   the private key, 0600, written once (`Identity.save` refuses to overwrite)
    peers.json     the allowed-peer list and its oracle version (see `peers`)
    oracle.pub     the oracle's public key, written by `enroll`: from then on only
                   peer lists signed by that key change peers.json
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from proto import PublicKey

IDENTITY_FILE = "identity.key"
PEERS_FILE = "peers.json"
ORACLE_FILE = "oracle.pub"


@dataclass(frozen=True)
class ClientSettings:
    home: Path
    relays: tuple[str, ...]
    oracle_key: PublicKey | None
    log_level: str

    @property
    def identity_path(self) -> Path:
        return self.home / IDENTITY_FILE

    @property
    def peers_path(self) -> Path:
        return self.home / PEERS_FILE

    @property
    def oracle_path(self) -> Path:
        return self.home / ORACLE_FILE

    @classmethod
    def resolve(cls, *, home: str | None, relays: list[str] | None, oracle_key: str | None,
                log_level: str, environ: Mapping[str, str] = os.environ) -> ClientSettings:
        """Combine flags (None: not given) with the environment; ValueError names a bad value."""
        home_text = home or environ.get("CONTINUUM_HOME") or "~/.continuum"
        relay_urls = relays or [url.strip() for url in
                                environ.get("CONTINUUM_RELAYS", "").split(",") if url.strip()]
        for url in relay_urls:
            if not url.startswith(("ws://", "wss://")):
                raise ValueError(f"relay URL {url!r} must start with ws:// or wss://")
        home_path = Path(home_text).expanduser()
        key_text = (oracle_key or environ.get("CONTINUUM_ORACLE_KEY")
                    or _read_text(home_path / ORACLE_FILE))
        return cls(home_path, tuple(relay_urls),
                   PublicKey.from_text(key_text) if key_text else None, log_level)

    def describe(self) -> dict[str, object]:
        """What is in force, for the start-up log line (nothing here is secret)."""
        return {"home": str(self.home), "relays": list(self.relays),
                "oracle_key": self.oracle_key.text if self.oracle_key else None,
                "log_level": self.log_level}


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return ""
