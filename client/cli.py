"""`continuum-client`: keys, peers, send and listen from a shell.

    continuum-client [--home DIR] [--relay URL]… [--oracle-key cpk_…] COMMAND
      keygen                       create identity.key (0600); print the public key
      whoami                       print the public key
      enroll --oracle cpk_…        trust this oracle (only) to set the peer list
      peers add|remove KEY…        edit the allowed-peer list
      peers list                   print it, one key per line
      send KEY… TEXT|@FILE         send one message to all KEYs; --wait S for receipts
      listen                       print messages from peers as they arrive (and drain the
                                   mailbox of a key rotated away from)
      rotate-key                   move to a new key the current one vouches for; print it

Results go to stdout (one line each, easy to script), diagnostics to
stderr.  Exit codes: 0 ok, 1 refused (by the relay, or a bad message),
2 usage or set-up problem, 3 no relay accepted the message in time.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

import structlog

from proto import Identity, PublicKey
from proto.errors import ProtocolError
from proto.rotation import OracleKeyChain
from runtime.logs import configure_logging

from .device import DEFAULT_TTL_S, Device
from .inbox import InboundMessage
from .key_files import KeyFiles, write_atomically
from .peers import PeerList
from .settings import ClientSettings

EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_NOT_ACCEPTED = 3


class CliError(Exception):
    """A problem the user can fix; printed without a traceback."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="continuum-client",
                                     description="Continuum device: keys, peers, send, listen.")
    parser.add_argument("--home", help="directory with identity.key and peers.json"
                        " (env CONTINUUM_HOME; default ~/.continuum)")
    parser.add_argument("--relay", action="append", dest="relays", metavar="URL",
                        help="relay URL, ws://HOST:PORT/v1/connect; repeat for failover"
                        " (env CONTINUUM_RELAYS, comma-separated)")
    parser.add_argument("--oracle-key", metavar="cpk_…",
                        help="key whose PEER_CHANGE messages replace the peer list"
                        " (env CONTINUUM_ORACLE_KEY)")
    parser.add_argument("--log-level", default="warning",
                        choices=["debug", "info", "warning", "error"])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("keygen", help="create this device's key pair")
    commands.add_parser("whoami", help="print this device's public key")
    enroll = commands.add_parser("enroll", help="trust an oracle to set the peer list")
    enroll.add_argument("--oracle", required=True, metavar="cpk_…", help="the oracle's key")
    enroll.add_argument("--replace", action="store_true",
                        help="switch to another oracle than the one already enrolled with")
    peers = commands.add_parser("peers", help="edit or show the allowed-peer list")
    peer_commands = peers.add_subparsers(dest="peers_command", required=True)
    for name in ("add", "remove"):
        peer_commands.add_parser(name).add_argument("keys", nargs="+", metavar="KEY")
    peer_commands.add_parser("list")
    send = commands.add_parser("send", help="send one message to one or more peers")
    send.add_argument("recipients", nargs="+", metavar="KEY")
    send.add_argument("message", metavar="TEXT|@FILE", help="the text, or @path to send a file")
    send.add_argument("--ttl", type=int, default=DEFAULT_TTL_S, help="seconds the relay keeps it")
    send.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                      help="wait this long for return receipts and report per recipient")
    send.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                      help="give up if no relay accepted it within this time")
    listen = commands.add_parser("listen", help="print messages from peers")
    listen.add_argument("--count", type=int, help="exit after this many messages")
    listen.add_argument("--timeout", type=float, metavar="SECONDS", help="exit after this long")
    listen.add_argument("--json", action="store_true", help="one JSON object per message")
    rotate = commands.add_parser("rotate-key", help="move this device to a new key, keeping"
                                 " its place (name, groups, peers) with the oracle")
    rotate.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                        help="give up (resumable: run again) if the oracle has not confirmed")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    configure_logging(args.log_level, sys.stderr)  # stdout stays clean for results
    try:
        settings = ClientSettings.resolve(home=args.home, relays=args.relays,
                                          oracle_key=args.oracle_key, log_level=args.log_level)
        sys.exit(_run(args, settings))
    except (CliError, ValueError, ProtocolError) as exc:
        code = exc.exit_code if isinstance(exc, CliError) else EXIT_USAGE
        print(f"continuum-client: {_message(exc)}", file=sys.stderr)
        sys.exit(code)
    except KeyboardInterrupt:
        sys.exit(130)


def _run(args: argparse.Namespace, settings: ClientSettings) -> int:
    if args.command == "keygen":
        return _keygen(settings)
    if args.command == "whoami":
        print(_load_identity(settings).public.text)
        return 0
    if args.command == "enroll":
        return _enroll(settings, PublicKey.from_text(args.oracle), args.replace)
    if args.command == "peers":
        return _peers(args, settings)
    if args.command == "send":
        payload = _read_message(args.message)
        recipients = [PublicKey.from_text(text) for text in args.recipients]
        return asyncio.run(_send(settings, recipients, payload, args.ttl, args.wait, args.timeout))
    if args.command == "rotate-key":
        return asyncio.run(_rotate_key(settings, args.timeout))
    return asyncio.run(_listen(settings, args.count, args.timeout, args.json))


def _enroll(settings: ClientSettings, oracle: PublicKey, replace: bool) -> int:
    """Record the oracle key in the home; a different one only on purpose (--replace)."""
    identity = _load_identity(settings)
    current = settings.oracle_path.read_text(encoding="ascii").strip() \
        if settings.oracle_path.exists() else None
    if current not in (None, oracle.text) and not replace:
        raise CliError(f"already enrolled with oracle {current}; use --replace to switch")
    settings.oracle_path.write_text(oracle.text + "\n", encoding="ascii")
    print(f"enrolled with oracle {oracle.text}")
    print(f"ask its administrator to add this device: {identity.public.text}")
    return 0


def _keygen(settings: ClientSettings) -> int:
    identity = Identity.generate()
    try:
        identity.save(settings.identity_path)
    except FileExistsError:
        raise CliError(f"{settings.identity_path} already exists; refusing to overwrite"
                       " a device key") from None
    print(identity.public.text)
    return 0


def _load_identity(settings: ClientSettings) -> Identity:
    try:
        return Identity.load(settings.identity_path)
    except FileNotFoundError:
        raise CliError(f"no key at {settings.identity_path}; run: continuum-client"
                       f" --home {settings.home} keygen") from None
    except PermissionError as exc:
        raise CliError(str(exc)) from None


def _peers(args: argparse.Namespace, settings: ClientSettings) -> int:
    peers = PeerList.load(settings.peers_path)
    if args.peers_command == "list":
        for key in peers:
            print(key.text)
        return 0
    keys = [PublicKey.from_text(text) for text in args.keys]
    if args.peers_command == "add":
        peers.add(keys)
    else:
        peers.remove(keys)
    print(f"{len(peers)} peer(s) in {settings.peers_path}", file=sys.stderr)
    return 0


def _read_message(argument: str) -> bytes:
    if not argument.startswith("@"):
        return argument.encode("utf-8")
    try:
        return Path(argument[1:]).read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {argument[1:]}: {exc.strerror}") from None


def _device(settings: ClientSettings) -> Device:
    if not settings.relays:
        raise CliError("no relay configured: pass --relay URL or set CONTINUUM_RELAYS")
    identity = _load_identity(settings)
    log = structlog.get_logger("continuum.client")
    log.info("client_started", **settings.describe())
    if KeyFiles(settings.identity_path).pending() is not None:
        log.warning("key_rotation_pending", detail="run rotate-key to finish it")

    def follow_oracle(chain: OracleKeyChain) -> None:
        """The oracle moved to a new key: keep the chain and the key, as `enroll` keeps it."""
        assert chain.current is not None
        write_atomically(settings.oracle_chain_path, chain.encode())
        write_atomically(settings.oracle_path, (chain.current.text + "\n").encode("ascii"))

    return Device(identity, settings.relays, PeerList.load(settings.peers_path),
                  settings.oracle_key, on_oracle_key_change=follow_oracle)


async def _rotate_key(settings: ClientSettings, timeout_s: float) -> int:
    """Rotate to identity.key.next (created now, or left by an interrupted run)."""
    if settings.oracle_key is None:
        raise CliError("a key rotation needs an oracle: run enroll --oracle cpk_… first")
    files = KeyFiles(settings.identity_path)
    resuming = files.pending() is not None
    device = _device(settings)
    try:
        new = files.begin()
    except FileExistsError as exc:
        raise CliError(str(exc)) from None
    print(f"{'resuming rotation' if resuming else 'rotating'} {device.identity.public.text}"
          f" -> {new.public.text}", file=sys.stderr, flush=True)
    async with device:
        try:
            async with asyncio.timeout(timeout_s):
                await device.rotate_key(new, on_confirmed=files.confirm)
        except TimeoutError:
            raise CliError(f"the oracle did not confirm within {timeout_s:g}s (last error:"
                           f" {device.last_error or 'none'}); run rotate-key again to resume",
                           EXIT_NOT_ACCEPTED) from None
        except ProtocolError as exc:
            raise CliError(f"refused: {_message(exc)}", EXIT_REFUSED) from None
    print(new.public.text)
    print(f"the old key stays in {files.old_path} until listen has drained its mailbox",
          file=sys.stderr)
    return 0


async def _send(settings: ClientSettings, recipients: list[PublicKey], payload: bytes,
                ttl_s: int, wait_s: float, timeout_s: float) -> int:
    async with _device(settings) as device:
        try:
            async with asyncio.timeout(timeout_s):
                outgoing = await device.send(recipients, payload, ttl_s=ttl_s)
        except TimeoutError:
            raise CliError(f"not accepted within {timeout_s:g}s"
                           f" (last error: {device.last_error or 'none'})",
                           EXIT_NOT_ACCEPTED) from None
        except ProtocolError as exc:
            raise CliError(f"refused: {_message(exc)}", EXIT_REFUSED) from None
        print(f"accepted {outgoing.msg_id.hex()} via {device.relay_url}", flush=True)
        if wait_s > 0:
            statuses = await outgoing.wait_receipts(wait_s)
            for key, status in sorted(statuses.items()):
                print(f"{key.text} {status.value}")
    return 0


async def _listen(settings: ClientSettings, count: int | None, timeout_s: float | None,
                  as_json: bool) -> int:
    received = 0
    files = KeyFiles(settings.identity_path)
    async with _device(settings) as device:
        old = files.draining()
        if old is not None:  # a rotation left the old key's mailbox to drain
            device.drain(old)
        try:
            async with asyncio.timeout(timeout_s):
                await device.wait_connected()
                print(f"listening as {device.identity.public.text} on {device.relay_url}",
                      file=sys.stderr, flush=True)
                async for message in device.messages():
                    print(_format(message, as_json), flush=True)
                    received += 1
                    if count is not None and received >= count:
                        break
        except TimeoutError:
            pass
        if old is not None and not device.draining:
            files.drained()
        dropped = {name: value for name, value in device.stats.as_dict().items()
                   if name.startswith(("dropped_", "duplicates")) and value}
        if dropped:
            print("dropped: " + " ".join(f"{k}={v}" for k, v in dropped.items()),
                  file=sys.stderr)
    return 0


def _format(message: InboundMessage, as_json: bool) -> str:
    try:
        text: str | None = message.payload.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if as_json:
        body = {"text": text} if text is not None else {
            "base64": base64.b64encode(message.payload).decode("ascii")}
        return json.dumps({"from": message.sender.text, "msg_id": message.msg_id.hex(),
                           "created_at_ms": message.created_at_ms, **body})
    when = datetime.fromtimestamp(message.created_at_ms / 1000, UTC).isoformat(timespec="seconds")
    shown = text if text is not None else f"<{len(message.payload)} bytes, not UTF-8>"
    return f"{when} {message.sender.text} {message.msg_id.hex()} {shown}"


def _message(exc: BaseException) -> str:
    if isinstance(exc, ProtocolError):
        return f"{exc.code.name}: {exc.message}"
    return str(exc)
