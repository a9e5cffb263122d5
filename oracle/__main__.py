"""`continuum-oracle` / `python -m oracle`: serve, create-admin, create-token, show-key,
rotate-key."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import signal
import sys
from pathlib import Path

from runtime.clock import now_ms
from runtime.logs import EventSampler, configure_logging

from .audit import Actor
from .auth import TOKEN_SCOPES, Auth
from .db import open_database
from .errors import OracleError
from .identity import load_identity, rotate
from .server import OracleServer
from .settings import OracleSettings


# Lines anyone can make the oracle write without cost to themselves: a login form posted
# from another site or while its address is locked out (no password check either way),
# a presence report refused.  A few a second of each are kept, the next one carrying how
# many were dropped (`suppressed`); continuum_oracle_presence_reports_total still counts
# every report.  Refused logins (a password check each, throttled) are all kept.
SAMPLED_EVENTS = {"login_cross_site": (), "login_throttled": (),
                  "presence_report_refused": ("status",)}
SAMPLED_LINES_PER_S = 5


async def _serve(settings: OracleSettings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with OracleServer(settings) as server:
        print(f"continuum oracle {server.identity.public.text} listening on {server.url}",
              file=sys.stderr, flush=True)
        await stop.wait()


async def _with_auth(settings: OracleSettings, action: str, name: str,
                     scope: str | None = None) -> str:
    db = await open_database(settings.database)
    try:
        auth = Auth(db, settings.session_ttl_s)
        actor = Actor(f"cli:{getpass.getuser()}", "cli")  # the audit log's "who"
        if action == "create-admin":
            return await auth.create_admin(name, actor=actor)
        # No admin made it, so no admin's deletion revokes it: revoke it by name.
        return await auth.create_api_token(name, scope, actor)
    finally:
        await db.close()


# command → (what it does, its positional argument or None)
COMMANDS = {
    "serve": ("run the oracle: dashboard, API, access list, peer-change pushes", None),
    "create-admin": ("create an administrator; prints a generated password once", "username"),
    "create-token": ("create an API bearer token (--scope read: GETs and /metrics; write:"
                     " also devices and groups); prints it once", "name"),
    "show-key": ("print the oracle's public key (cpk_…) to configure devices and relays", None),
    "rotate-key": ("with the oracle stopped: move it to a new key its current one signs for;"
                   " relays and devices follow", None),
}


def _usage() -> str:
    lines = ["usage: continuum-oracle COMMAND [options]   (COMMAND --help for its options)", ""]
    lines += [f"  {name:13s} {text}" for name, (text, _) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(_usage(), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    command, rest = argv[0], argv[1:]
    text, positional = COMMANDS[command]
    parser = argparse.ArgumentParser(prog=f"continuum-oracle {command}", description=text)
    if positional:
        parser.add_argument(positional)
    if command == "create-token":
        parser.add_argument("--scope", required=True, choices=TOKEN_SCOPES,
                            help="read: GET requests and /metrics only (a Prometheus scrape);"
                                 " write: also manage devices and groups. No token manages"
                                 " admins or tokens.")
    settings, args = OracleSettings.from_sources(rest, parser=parser)
    configure_logging(settings.log_level,
                      sampler=EventSampler(SAMPLED_EVENTS, per_s=SAMPLED_LINES_PER_S))
    try:
        if command == "serve":
            asyncio.run(_serve(settings))
        elif command == "show-key":
            print(load_identity(Path(settings.identity_file))[0].public.text)
        elif command == "rotate-key":
            change = rotate(Path(settings.identity_file), now_ms())
            print(f"rotated {change.old.text} -> {change.new.text}", file=sys.stderr)
            print(change.new.text)
        else:
            name = getattr(args, positional or "")
            secret = asyncio.run(_with_auth(settings, command, name,
                                            getattr(args, "scope", None)))
            label = "password" if command == "create-admin" else "token"
            print(f"{label} for {name!r} (shown once): {secret}")
    except OracleError as exc:
        sys.exit(f"continuum-oracle: {exc.message}")
    except OSError as exc:
        sys.exit(f"continuum-oracle: cannot start: {exc}")


if __name__ == "__main__":
    main()
