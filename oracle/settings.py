"""The oracle's one typed settings object, from CLI flags and CONTINUUM_ORACLE_* variables.

Flags win over environment variables, which win over defaults; `describe()`
is printed at start with secrets masked (a PostgreSQL DSN may carry a password).
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass, field, fields, replace
from typing import Any

from continuum.settings import parse_bool

ENV_PREFIX = "CONTINUUM_ORACLE_"


@dataclass(frozen=True)
class OracleSettings:
    host: str = "127.0.0.1"
    port: int = 8480
    # sqlite:///path (zero set-up default) or postgresql://user@host/db.
    database: str = "sqlite:///oracle.db"
    # The oracle's Ed25519 key file (0600), created on first start.
    identity_file: str = "oracle.key"
    # Continuum relays the oracle connects to as a device (ws://…/v1/connect), repeatable.
    relays: tuple[str, ...] = field(default_factory=tuple)
    # How long a relay's long-poll for a newer access list is held open.
    longpoll_s: float = 25.0
    # Lifetime of a peer-change envelope in an offline device's mailbox.
    push_ttl_s: int = 7 * 24 * 3600
    # How long one peer-change send may wait for a relay before it is retried later.
    send_timeout_s: float = 5.0
    # Re-seal a stored envelope older than this (relays refuse stale created_at).
    reseal_after_s: int = 120
    session_ttl_s: int = 12 * 3600
    # Set when the dashboard is served over HTTPS, so the session cookie is Secure.
    secure_cookies: bool = False
    log_level: str = "info"

    def describe(self) -> dict[str, object]:
        """Settings as printed at start: a password in the database DSN is masked."""
        shown = {f.name: getattr(self, f.name) for f in fields(self)}
        shown["database"] = re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", self.database)
        shown["relays"] = list(self.relays)
        return shown

    def validate(self) -> None:
        problems = [message for message, ok in [
            ("port must be 0..65535", 0 <= self.port <= 65535),
            ("longpoll_s must be in (0, 120]", 0 < self.longpoll_s <= 120),
            ("push_ttl_s must be >= 60", self.push_ttl_s >= 60),
            ("reseal_after_s must be >= 1", self.reseal_after_s >= 1),
            ("send_timeout_s must be > 0", self.send_timeout_s > 0),
            ("relays must be ws:// or wss:// URLs",
             all(r.startswith(("ws://", "wss://")) for r in self.relays)),
        ] if not ok]
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def from_sources(cls, argv: list[str] | None = None,
                     environ: dict[str, str] | None = None,
                     parser: argparse.ArgumentParser | None = None,
                     ) -> tuple[OracleSettings, argparse.Namespace]:
        """Parse flags (`--relay` repeatable) over CONTINUUM_ORACLE_* variables (RELAYS comma-separated).

        Returns the settings and the parsed namespace, which also holds any
        positional arguments the caller added to `parser`.
        """
        environ = dict(os.environ if environ is None else environ)
        parser = parser or argparse.ArgumentParser(prog="continuum-oracle serve")
        settings = cls()
        values: dict[str, Any] = {}
        for f in fields(cls):
            env_name = ENV_PREFIX + f.name.upper()
            default = getattr(settings, f.name)
            if f.name == "relays":
                env_relays = tuple(r.strip() for r in environ.get(env_name, "").split(",") if r.strip())
                parser.add_argument("--relay", action="append", dest="relays", default=None,
                                    help=f"relay URL, repeatable (env {env_name}, comma-separated)")
                values["relays"] = env_relays
                continue
            parse = parse_bool if type(default) is bool else type(default)
            if env_name in environ:
                try:
                    values[f.name] = parse(environ[env_name])
                except ValueError:
                    parser.error(f"{env_name}={environ[env_name]!r} is not a valid {type(default).__name__}")
            parser.add_argument("--" + f.name.replace("_", "-"), type=parse, default=None,
                                dest=f.name, help=f"(env {env_name}; default {default!r})")
        args = parser.parse_args(argv)
        for name, value in vars(args).items():
            if value is not None and name in {f.name for f in fields(cls)}:
                values[name] = tuple(value) if name == "relays" else value
        result = replace(settings, **values)
        try:
            result.validate()
        except ValueError as exc:
            parser.error(str(exc))
        return result, args

