"""The CLI's one typed settings object: flags, then CONTINUUM_* variables, then defaults.

The home directory holds everything a device keeps between runs:

    identity.key   the private key, 0600, written once (`Identity.save` refuses to overwrite);
                   with `identity.key.next` / `.old` during a key rotation (`key_files`)
    peers.json     the allowed-peer list and its oracle version (see `peers`)
    oracle.pub     the oracle's public key, written by `enroll`: from then on only
                   peer lists signed by that key change peers.json
    oracle.chain   the oracle's key chain, once the oracle rotated its key (SPEC §15):
                   the oracle key in force is where it leads from the configured one,
                   so a flag or variable naming an older oracle key still works
    state.db       the outbox, the messages sent and their fate, the messages already
                   handled, the files being sent and received (`state`; SQLite, with its
                   -wal and -shm files), 0600
    transfers/     files arriving (`partial/`) and verified, waiting to be taken
                   (`received/`), SPEC §17
"""

from __future__ import annotations

import math
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from proto import PublicKey
from proto.rotation import OracleKeyChain
from runtime.tls import is_loopback_host, verifying_context

from .connection import DEFAULT_KEEPALIVE_S
from .peers import PEERS_FILE
from .transfer_in import DEFAULT_MAX_TRANSFER_BYTES

IDENTITY_FILE = "identity.key"
ORACLE_FILE = "oracle.pub"
ORACLE_CHAIN_FILE = "oracle.chain"


@dataclass(frozen=True)
class ClientSettings:
    home: Path
    relays: tuple[str, ...]
    oracle_key: PublicKey | None
    log_level: str
    # Seconds between our pings on an idle connection (battery-powered devices: longer).
    keepalive_s: float = DEFAULT_KEEPALIVE_S
    # The relay keys this device accepts (None: any relay that proves its key, SPEC §4).
    relay_keys: frozenset[PublicKey] | None = None
    # A CA bundle wss:// relays are verified against instead of the system's (a private CA).
    ca_file: Path | None = None
    # The largest file sent or received as a transfer (SPEC §17).
    max_file_bytes: int = DEFAULT_MAX_TRANSFER_BYTES

    def tls_context(self) -> ssl.SSLContext | None:
        """The context for `wss://` relays: None keeps the system's trust store."""
        return None if self.ca_file is None else verifying_context(str(self.ca_file))

    @property
    def identity_path(self) -> Path:
        return self.home / IDENTITY_FILE

    @property
    def peers_path(self) -> Path:
        return self.home / PEERS_FILE

    @property
    def oracle_path(self) -> Path:
        return self.home / ORACLE_FILE

    @property
    def oracle_chain_path(self) -> Path:
        return self.home / ORACLE_CHAIN_FILE

    @property
    def unencrypted_remote_relays(self) -> list[str]:
        """`ws://` URLs to hosts other than this machine: readable and changeable on the path."""
        return [url for url in self.relays
                if url.startswith("ws://") and not is_loopback_host(urlsplit(url).hostname or "")]

    @classmethod
    def resolve(cls, *, home: str | None, relays: list[str] | None, oracle_key: str | None,
                log_level: str, keepalive_s: float | None = None,
                relay_keys: list[str] | None = None, ca_file: str | None = None,
                max_file_bytes: int | None = None,
                environ: Mapping[str, str] = os.environ) -> ClientSettings:
        """Combine flags (None: not given) with the environment; ValueError names a bad value."""
        home_text = home or environ.get("CONTINUUM_HOME") or "~/.continuum"
        relay_urls = relays or _list(environ.get("CONTINUUM_RELAYS"))
        for url in relay_urls:
            if not url.startswith(("ws://", "wss://")):
                raise ValueError(f"relay URL {url!r} must start with ws:// or wss://")
        home_path = Path(home_text).expanduser()
        key_text = (oracle_key or environ.get("CONTINUUM_ORACLE_KEY")
                    or _read_text(home_path / ORACLE_FILE))
        key = PublicKey.from_text(key_text) if key_text else None
        chain_path = home_path / ORACLE_CHAIN_FILE
        if key is not None and chain_path.exists():
            key = OracleKeyChain.decode(chain_path.read_bytes()).follow(key)
        keepalive = keepalive_s if keepalive_s is not None else _seconds(
            environ.get("CONTINUUM_KEEPALIVE_S"), DEFAULT_KEEPALIVE_S)
        if not (math.isfinite(keepalive) and keepalive > 0):
            raise ValueError(f"keepalive must be a positive number of seconds, not {keepalive}")
        pinned_texts = relay_keys or _list(environ.get("CONTINUUM_RELAY_KEYS"))
        pinned = frozenset(PublicKey.from_text(text) for text in pinned_texts) or None
        ca_text = ca_file or environ.get("CONTINUUM_CA_FILE")
        max_file = max_file_bytes if max_file_bytes is not None else _bytes(
            environ.get("CONTINUUM_MAX_FILE_BYTES"), DEFAULT_MAX_TRANSFER_BYTES)
        if max_file < 1:
            raise ValueError(f"the maximum file size must be at least 1 byte, not {max_file}")
        return cls(home_path, tuple(relay_urls), key, log_level, keepalive, pinned,
                   Path(ca_text).expanduser() if ca_text else None, max_file)

    def describe(self) -> dict[str, object]:
        """What is in force, for the start-up log line (nothing here is secret)."""
        return {"home": str(self.home), "relays": list(self.relays),
                "oracle_key": self.oracle_key.text if self.oracle_key else None,
                "log_level": self.log_level, "keepalive_s": self.keepalive_s,
                "relay_keys": (None if self.relay_keys is None
                               else sorted(key.text for key in self.relay_keys)),
                "ca_file": str(self.ca_file) if self.ca_file else None,
                "max_file_bytes": self.max_file_bytes}


def _list(text: str | None) -> list[str]:
    """A comma-separated variable's items, blanks dropped."""
    return [item.strip() for item in (text or "").split(",") if item.strip()]


def _seconds(text: str | None, default: float) -> float:
    if not text:
        return default
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"CONTINUUM_KEEPALIVE_S must be a number of seconds, not {text!r}")\
            from None


def _bytes(text: str | None, default: int) -> int:
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"CONTINUUM_MAX_FILE_BYTES must be a whole number of bytes, not"
                         f" {text!r}") from None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return ""
