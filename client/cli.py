"""`continuum-client`: keys, peers, send and listen from a shell or a script.

    continuum-client [--home DIR] [--relay URL]… [--oracle-key cpk_…] [--keepalive S] COMMAND
      keygen                       create identity.key (0600); print the public key
      whoami                       print the public key
      enroll --oracle cpk_…        trust this oracle (only) to set the peer list
      peers add|remove KEY…        edit the allowed-peer list
      peers list                   print it, one key per line
      send KEY… TEXT|@FILE|-       send one message to all KEYs (- reads stdin); --wait S for
                                   receipts, --queue to only put it in the outbox
      send KEY… --lines            one message per line of stdin, as the lines come
      send KEY @FILE               a file over 48 KiB (or any, with --file) goes as a transfer
                                   (SPEC §17): chunked, resumable, verified, one receipt;
                                   progress on stderr (a terminal, or --progress)
      flush                        send what the outbox holds; collect receipts and notices
      outbox [--json]              messages sent: the relays' answer, each recipient's status
      transfers [--json]           files sent and arriving (SPEC §17): how far each got
      listen                       print messages from peers as they arrive (and drain the
                                   mailbox of a key rotated away from); --handle
                                   METHOD=COMMAND answers calls of METHOD with COMMAND;
                                   keep the oracle's configuration in config.json,
                                   --config-hook CMD applies it; files received are
                                   printed, and moved into --save-dir DIR if given
      call KEY METHOD [JSON|@FILE|-]
                                   call METHOD on a peer; print its answer (--timeout S)
      rotate-key                   move to a new key the current one vouches for; print it
      expose PORT… [--allow KEY]…  serve local TCP ports to peers through streams
      tunnel KEY:PORT [--listen HOST:PORT]
                                   reach a peer's exposed port at a local address

Results go to stdout (one line each, easy to script), diagnostics to
stderr, in words: one line per failed connection attempt, one per dropped
delivery, never a traceback.  Every command that talks to a relay keeps the
home's state file (`state.db`): a message is in the outbox before `send`
tries any relay and is sent by a later `send`, `flush` or `listen` if this
one cannot.  The exit codes are `EXIT_CODES`, printed by `--help`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import aiohttp

from proto import Identity, Kind, PublicKey
from proto.config import JsonObject
from proto.errors import NotEnrolledError, ProtocolError, RevokedError
from proto.rotation import OracleKeyChain
from proto.transfers import Chunk, Manifest
from runtime.files import write_atomically
from runtime.logs import configure_logging, library_logger

from .calls import CallHandler
from .config import CONFIG_FILE, ConfigUpdate
from .config_hook import DEFAULT_HOOK_TIMEOUT_S, ConfigHook, HookFailed
from .device import DEFAULT_TTL_S, Device
from .inbox import Drop, DropReason, InboundMessage
from .transfer_in import InState, ReceivedFile
from .transfer_out import OutState, SentFile, TransferError
from .key_files import KeyFiles
from .peers import PeerList
from .settings import ClientSettings
from .state import DeviceState
from .tracking import SendState, SentLog, SentMessage

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_NO_RELAY = 3
EXIT_TOO_FEW = 4
EXIT_INTERRUPTED = 130
EXIT_CODES = """\
exit codes:
  0    done
  1    refused for good: by a relay (REVOKED, NOT_PEER, OVERSIZE, INVALID_FIELD, …), or a
       message or file that cannot be sent as given (a file over --max-file-bytes, changed
       while it was sent)
  2    usage or set-up problem (bad flag, key, file or setting)
  3    no relay: none connected (listen, flush) or accepted the message within --timeout
       (send; the message stays in the outbox and a later send, flush or listen sends it;
       a file: no chunk accepted within --timeout, and sending it again goes on with it);
       rotate-key: the oracle did not confirm within --timeout (run it again to resume)
  4    listen --count N: fewer than N messages within --timeout
  5    call: no response within --timeout (the peer stayed offline, or did not answer)
  11   call: the peer has no such method (NOT_FOUND)
  12   call: the peer's handler failed (ERROR)
  13   call: the peer refused it (REFUSED)
  14   call: the deadline passed at the peer (TIMEOUT)
  130  interrupted (Ctrl-C)"""
# Handshake refusals that no retry will change: the command ends at once with EXIT_REFUSED.
_PERMANENT_AT_CONNECT = (RevokedError, NotEnrolledError)
# After the outbox is empty, `flush` keeps collecting receipts until this long passes quietly.
_FLUSH_QUIET_S = 1.0
# `send KEY @FILE`: a file larger than this goes as a transfer, a smaller one as one message
# (it fits the default 64 KiB envelope limit with room for sealing).
ONE_MESSAGE_FILE_BYTES = 48 * 1024

T = TypeVar("T")


class CliError(Exception):
    """A problem the user can fix; printed without a traceback."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _parser() -> argparse.ArgumentParser:
    from . import calls_cli, tunnel_cli  # here, not at the top: they import this module
    parser = argparse.ArgumentParser(prog="continuum-client",
                                     description="Continuum device: keys, peers, send, listen.",
                                     epilog=EXIT_CODES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", help="directory with identity.key, peers.json and state.db"
                        " (env CONTINUUM_HOME; default ~/.continuum)")
    parser.add_argument("--relay", action="append", dest="relays", metavar="URL",
                        help="relay URL, ws://HOST:PORT/v1/connect; repeat for failover"
                        " (env CONTINUUM_RELAYS, comma-separated)")
    parser.add_argument("--oracle-key", metavar="cpk_…",
                        help="key whose PEER_CHANGE messages replace the peer list"
                        " (env CONTINUUM_ORACLE_KEY)")
    parser.add_argument("--relay-key", action="append", dest="relay_keys", metavar="cpk_…",
                        help="talk only to relays holding this key; repeat for each relay"
                        " (env CONTINUUM_RELAY_KEYS, comma-separated; default: any relay"
                        " that proves its key)")
    parser.add_argument("--ca-file", metavar="PEM",
                        help="verify wss:// relays against this CA bundle instead of the"
                        " system's (env CONTINUUM_CA_FILE)")
    parser.add_argument("--keepalive", type=float, metavar="SECONDS", dest="keepalive_s",
                        help="ping an idle relay connection this often"
                        " (env CONTINUUM_KEEPALIVE_S; default 20)")
    parser.add_argument("--max-file-bytes", type=int, metavar="BYTES",
                        help="largest file sent or received as a transfer (default 1 GiB;"
                             " env CONTINUUM_MAX_FILE_BYTES)")
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
    send = commands.add_parser(
        "send", help="send a message to one or more peers",
        usage="continuum-client send KEY… (TEXT | @FILE | -) [options]\n"
              "       continuum-client send KEY… --lines [options]")
    send.add_argument("targets", nargs="+", metavar="KEY… MESSAGE",
                      help="recipient keys, then the message: text, @path of a file, or - for"
                      " stdin (with --lines, keys only)")
    send.add_argument("--lines", action="store_true",
                      help="send each line of stdin as one message, as it arrives"
                      " (blank lines are not sent)")
    send.add_argument("--ttl", type=int, default=DEFAULT_TTL_S, help="seconds the relay keeps it")
    send.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                      help="wait this long for return receipts and report per recipient")
    send.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                      help="give up (exit 3, the message stays queued) if no relay accepted it"
                      " within this time; transient refusals are retried until then")
    send.add_argument("--file", action="store_true",
                      help="send @FILE as a transfer whatever its size (one KEY)")
    send.add_argument("--progress", action="store_true",
                      help="show a transfer's progress on stderr even when it is no terminal")
    send.add_argument("--queue", action="store_true",
                      help="only put it in the outbox and exit; a later send, flush or listen"
                      " sends it")
    flush = commands.add_parser("flush", help="send the outbox, collect receipts and notices")
    flush.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                       help="give up (exit 3) after this long")
    outbox = commands.add_parser("outbox", help="list sent messages and what became of them")
    outbox.add_argument("--json", action="store_true", help="one JSON object per message")
    transfers = commands.add_parser("transfers", help="list files sent and arriving, and how"
                                    " far each got")
    transfers.add_argument("--json", action="store_true", help="one JSON object per transfer")
    listen = commands.add_parser("listen", help="print messages from peers")
    listen.add_argument("--count", type=int, help="exit after this many messages")
    listen.add_argument("--timeout", type=float, metavar="SECONDS", help="exit after this long")
    listen.add_argument("--json", action="store_true", help="one JSON object per message")
    calls_cli.add_listen_options(listen)
    calls_cli.add_commands(commands)
    listen.add_argument("--config-hook", metavar="CMD",
                        help="run CMD (through the shell) for each new configuration from the"
                             " oracle: the document on stdin, exit 0 to apply it, stdout (a"
                             " JSON object, if any) is the state reported")
    listen.add_argument("--config-hook-timeout", type=float, default=DEFAULT_HOOK_TIMEOUT_S,
                        metavar="SECONDS", help="a hook still running after this has failed")
    listen.add_argument("--save-dir", type=Path, metavar="DIR",
                        help="move each file received into DIR (else it stays in the home's"
                             " transfers/received/)")
    rotate = commands.add_parser("rotate-key", help="move this device to a new key, keeping"
                                 " its place (name, groups, peers) with the oracle")
    rotate.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                        help="give up (resumable: run again) if the oracle has not confirmed")
    tunnel_cli.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    configure_logging(args.log_level, sys.stderr)  # stdout stays clean for results
    try:
        settings = ClientSettings.resolve(home=args.home, relays=args.relays,
                                          oracle_key=args.oracle_key, log_level=args.log_level,
                                          keepalive_s=args.keepalive_s,
                                          relay_keys=args.relay_keys, ca_file=args.ca_file,
                                          max_file_bytes=args.max_file_bytes)
        sys.exit(_run(args, settings))
    except (CliError, ValueError, ProtocolError) as exc:
        code = exc.exit_code if isinstance(exc, CliError) else EXIT_USAGE
        _say(_message(exc))
        sys.exit(code)
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)


def _run(args: argparse.Namespace, settings: ClientSettings) -> int:
    if args.command == "keygen":
        return _keygen(settings)
    if args.command == "whoami":
        print(_load_identity(settings).public.text)
        return EXIT_OK
    if args.command == "enroll":
        return _enroll(settings, PublicKey.from_text(args.oracle), args.replace)
    if args.command == "peers":
        return _peers(args, settings)
    if args.command == "outbox":
        return _outbox(settings, args.json)
    if args.command == "transfers":
        return _transfers(settings, args.json)
    if args.command == "send":
        return _send_command(args, settings)
    if args.command == "flush":
        return asyncio.run(_flush(settings, args.timeout))
    if args.command == "rotate-key":
        return asyncio.run(_rotate_key(settings, args.timeout))
    if args.command in ("expose", "tunnel"):
        from . import tunnel_cli
        return asyncio.run(tunnel_cli.run(args, settings))
    from . import calls_cli
    if args.command == "call":
        return asyncio.run(calls_cli.run_call(args, settings))
    handlers = calls_cli.parse_handles(args.handle, args.handle_timeout)
    hook = (ConfigHook(args.config_hook, settings.home / CONFIG_FILE, args.config_hook_timeout)
            if args.config_hook else None)
    if args.save_dir is not None and not args.save_dir.is_dir():
        raise CliError(f"--save-dir {args.save_dir} is not a directory")
    return asyncio.run(_listen(settings, args.count, args.timeout, args.json, handlers, hook,
                               args.save_dir))


def _say(line: str) -> None:
    print(f"continuum-client: {line}", file=sys.stderr, flush=True)


def _enroll(settings: ClientSettings, oracle: PublicKey, replace: bool) -> int:
    """Record the oracle key in the home; a different one only on purpose (--replace)."""
    identity = _load_identity(settings)
    current = settings.oracle_path.read_text(encoding="ascii").strip() \
        if settings.oracle_path.exists() else None
    if current not in (None, oracle.text) and not replace:
        raise CliError(f"already enrolled with oracle {current}; use --replace to switch")
    write_atomically(settings.oracle_path, (oracle.text + "\n").encode("ascii"))
    print(f"enrolled with oracle {oracle.text}")
    print(f"ask its administrator to add this device: {identity.public.text}")
    return EXIT_OK


def _keygen(settings: ClientSettings) -> int:
    identity = Identity.generate()
    try:
        identity.save(settings.identity_path)
    except FileExistsError:
        raise CliError(f"{settings.identity_path} already exists; refusing to overwrite"
                       " a device key") from None
    print(identity.public.text)
    return EXIT_OK


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
        return EXIT_OK
    keys = [PublicKey.from_text(text) for text in args.keys]
    if args.peers_command == "add":
        peers.add(keys)
    else:
        peers.remove(keys)
    print(f"{len(peers)} peer(s) in {settings.peers_path}", file=sys.stderr)
    return EXIT_OK


# -- talking to relays ---------------------------------------------------------------------


class _Session:
    """One command's device, with what the user is told while it runs.

    Each failed connection attempt is one line on stderr; a handshake refusal
    no retry can change (REVOKED, NOT_ENROLLED) ends the command (`until_fatal`), except
    NOT_ENROLLED for the new key of a rotation, which lasts until the relays apply the list.
    Calls and configuration are `listen`'s (its handlers and hook): any other command leaves
    them in the mailbox (`takes_commands`).
    """

    def __init__(self, settings: ClientSettings, *, listening: bool = False) -> None:
        if not settings.relays:
            raise CliError("no relay configured: pass --relay URL or set CONTINUUM_RELAYS")
        for url in settings.unencrypted_remote_relays:
            _say(f"warning: {url} is not encrypted and leaves this machine: anyone on the path"
                 " can read and replay the connection; use wss://")
        identity = _load_identity(settings)
        library_logger("continuum.client").info("client_started", **settings.describe())
        if KeyFiles(settings.identity_path).pending() is not None:
            _say("a key rotation is under way: run rotate-key to finish it")
        self._settings = settings
        self._fatal: asyncio.Future[ProtocolError] = asyncio.get_running_loop().create_future()
        self.device = Device(identity, settings.relays, PeerList.load(settings.peers_path),
                             settings.oracle_key, home=settings.home,
                             keepalive_s=settings.keepalive_s,
                             relay_keys=settings.relay_keys, tls=settings.tls_context(),
                             on_oracle_key_change=self._follow_oracle,
                             on_connect_error=self._connect_failed,
                             on_drop=_announce_drop if listening else None,
                             max_transfer_bytes=settings.max_file_bytes,
                             takes_commands=listening)

    def _follow_oracle(self, chain: OracleKeyChain) -> None:
        """The oracle moved to a new key: keep the chain and the key, as `enroll` keeps it."""
        assert chain.current is not None
        write_atomically(self._settings.oracle_chain_path, chain.encode())
        write_atomically(self._settings.oracle_path, (chain.current.text + "\n").encode("ascii"))

    def _connect_failed(self, url: str, error: BaseException) -> None:
        awaiting_list = isinstance(error, NotEnrolledError) and self.device.rotating
        if isinstance(error, _PERMANENT_AT_CONNECT) and not awaiting_list:
            if not self._fatal.done():
                self._fatal.set_result(error)
            return
        _say(f"{url}: {_connect_reason(error)}")

    async def until_fatal(self, work: Awaitable[T]) -> T:
        """Await `work`, unless a relay refuses this device for good first (EXIT_REFUSED)."""
        task = asyncio.ensure_future(work)
        try:
            await asyncio.wait([task, self._fatal], return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():  # refused for good, or our own caller gave up (timeout)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if task.cancelled():
            raise CliError(f"refused: {_message(self._fatal.result())}", EXIT_REFUSED)
        return task.result()


def _connect_reason(error: BaseException) -> str:
    """Why a connection attempt failed, in words ("Connection refused")."""
    if isinstance(error, aiohttp.ClientConnectorError):
        cause = error.os_error
        return f"cannot connect: {os.strerror(cause.errno) if cause.errno else cause}"
    if isinstance(error, aiohttp.WSServerHandshakeError):
        return f"not a relay endpoint (HTTP {error.status})"
    if isinstance(error, TimeoutError):
        return "no answer (timed out)"
    return _message(error) or type(error).__name__


def _announce_drop(drop: Drop) -> None:
    """`listen` tells at once what it dropped, so a missing peer entry is no mystery."""
    sender = drop.envelope.sender.text if drop.envelope is not None else None
    if drop.reason is DropReason.NON_PEER:
        _say(f"dropped a message from {sender}: not a peer (to accept its messages:"
             f" continuum-client peers add {sender})")
    elif drop.reason is DropReason.STALE:
        _say(f"dropped a stale message from {sender}: {drop.detail}")
    else:
        _say(f"dropped a delivery{f' from {sender}' if sender else ''}"
             f" ({drop.reason.value}): {drop.detail}")


def _send_command(args: argparse.Namespace, settings: ClientSettings) -> int:
    transfer = _transfer_path(args)
    if transfer is not None:
        if len(args.targets) != 2:
            raise CliError("a file goes to one peer at a time: send KEY @FILE")
        if args.queue:
            raise CliError("--queue does not apply to files: a transfer needs a relay to start")
        return asyncio.run(_send_file(settings, PublicKey.from_text(args.targets[0]), transfer,
                                      args.ttl, args.wait, args.timeout,
                                      args.progress or sys.stderr.isatty()))
    if args.file:
        raise CliError("--file needs KEY @FILE")
    if args.lines:
        keys, payloads = args.targets, _stdin_lines()
    elif len(args.targets) < 2:
        raise CliError("send needs KEY… and a message (TEXT, @FILE or -), or --lines")
    else:
        keys, payloads = args.targets[:-1], _one(_read_message(args.targets[-1]))
    recipients = [PublicKey.from_text(text) for text in keys]
    if args.queue:
        return asyncio.run(_queue(settings, recipients, payloads, args.ttl))
    return asyncio.run(_send(settings, recipients, payloads, args.ttl, args.wait, args.timeout))


def _transfer_path(args: argparse.Namespace) -> Path | None:
    """The file to send as a transfer: @FILE with --file, or over ONE_MESSAGE_FILE_BYTES."""
    if args.lines or len(args.targets) < 2 or not args.targets[-1].startswith("@"):
        return None
    path = Path(args.targets[-1][1:])
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}") from None
    return path if args.file or size > ONE_MESSAGE_FILE_BYTES else None


async def _send_file(settings: ClientSettings, peer: PublicKey, path: Path, ttl_s: int,
                     wait_s: float, timeout_s: float, show_progress: bool) -> int:
    """Send one file as a transfer; fail (EXIT_NO_RELAY) only after `timeout_s` with no chunk
    accepted, so a large file is not cut short by a timeout meant for one message."""
    session = _Session(settings)
    moved = asyncio.Event()
    meter = _Progress(path.name) if show_progress else None

    def progress(done: int, total: int) -> None:
        moved.set()
        if meter is not None:
            meter.show(done, total)

    async with session.device as device:
        receipts = device.receipts()
        work = asyncio.ensure_future(session.until_fatal(
            device.send_file(peer, path, ttl_s=ttl_s, progress=progress)))
        try:
            while not work.done():
                moved.clear()
                done, _ = await asyncio.wait([work, asyncio.ensure_future(moved.wait())],
                                             timeout=timeout_s,
                                             return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    raise CliError(f"no chunk accepted within {timeout_s:g}s (last error:"
                                   f" {device.last_error or 'none'}); the transfer stays under"
                                   " way: the next send of this file, flush or listen goes on"
                                   " with it", EXIT_NO_RELAY)
            sent: SentFile = work.result()
        except TransferError as exc:
            raise CliError(f"refused: {exc}", EXIT_REFUSED) from None
        finally:
            if meter is not None:
                meter.end()
            if not work.done():
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError, TransferError, CliError):
                    await work
        print(f"accepted file {path.name} ({sent.size} bytes, {sent.chunks} chunks) transfer"
              f" {sent.transfer_id.hex()} manifest {sent.msg_id.hex()} via {device.relay_url}",
              flush=True)
        if wait_s > 0:
            status = "pending"
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_s):
                    async for who, receipt in receipts:
                        if who == peer and receipt.msg_id == sent.msg_id:
                            status = "delivered"
                            break
            print(f"{peer.text} {status}", flush=True)
        await receipts.aclose()
    return EXIT_OK


class _Progress:
    """One line on stderr, rewritten as chunks are accepted."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._shown = False

    def show(self, done: int, total: int) -> None:
        percent = 100 if total == 0 else done * 100 // total
        sys.stderr.write(f"\r{self._name}: {done}/{total} bytes ({percent}%)")
        sys.stderr.flush()
        self._shown = True

    def end(self) -> None:
        if self._shown:
            sys.stderr.write("\n")
            sys.stderr.flush()


async def _one(payload: bytes) -> AsyncIterator[bytes]:
    yield payload


async def _stdin_lines() -> AsyncIterator[bytes]:
    """Lines of stdin as they arrive (a sensor piped in), without newline; blank ones skipped."""
    while line := await asyncio.to_thread(sys.stdin.buffer.readline):
        if line.strip():
            yield line.rstrip(b"\r\n")


def _read_message(argument: str) -> bytes:
    if argument == "-":
        return sys.stdin.buffer.read()
    if not argument.startswith("@"):
        return argument.encode("utf-8")
    try:
        return Path(argument[1:]).read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {argument[1:]}: {exc.strerror}") from None


async def _queue(settings: ClientSettings, recipients: list[PublicKey],
                 payloads: AsyncIterator[bytes], ttl_s: int) -> int:
    device = _Session(settings).device
    try:
        async for payload in payloads:
            outgoing = await _sealed(device.queue(recipients, payload, ttl_s=ttl_s))
            print(f"queued {outgoing.msg_id.hex()}", flush=True)
    finally:
        device.close()
    return EXIT_OK


async def _rotate_key(settings: ClientSettings, timeout_s: float) -> int:
    """Rotate to identity.key.next (created now, or left by an interrupted run)."""
    if settings.oracle_key is None:
        raise CliError("a key rotation needs an oracle: run enroll --oracle cpk_… first")
    files = KeyFiles(settings.identity_path)
    resuming = files.pending() is not None
    session = _Session(settings)
    device = session.device
    try:
        new = files.begin()
    except FileExistsError as exc:
        raise CliError(str(exc)) from None
    _say(f"{'resuming rotation' if resuming else 'rotating'} {device.identity.public.text}"
         f" -> {new.public.text}")
    async with device:
        try:
            async with asyncio.timeout(timeout_s):
                await session.until_fatal(device.rotate_key(new, on_confirmed=files.confirm))
        except TimeoutError:
            raise CliError(f"the oracle did not confirm within {timeout_s:g}s (last error:"
                           f" {device.last_error or 'none'}); run rotate-key again to resume",
                           EXIT_NO_RELAY) from None
        except ProtocolError as exc:
            raise CliError(f"refused: {_message(exc)}", EXIT_REFUSED) from None
    print(new.public.text)
    _say(f"the old key stays in {files.old_path} until listen has drained its mailbox")
    return EXIT_OK


async def _sealed(work: Awaitable[T]) -> T:
    """A message the device cannot even seal (too large, bad ttl) is refused: EXIT_REFUSED."""
    try:
        return await work
    except ProtocolError as exc:
        raise CliError(f"refused: {_message(exc)}", EXIT_REFUSED) from None


async def _send(settings: ClientSettings, recipients: list[PublicKey],
                payloads: AsyncIterator[bytes], ttl_s: int, wait_s: float,
                timeout_s: float) -> int:
    session = _Session(settings)
    async with session.device as device:
        async for payload in payloads:
            try:
                outgoing = await session.until_fatal(
                    device.send(recipients, payload, ttl_s=ttl_s, timeout=timeout_s))
            except TimeoutError:
                raise CliError(f"not accepted within {timeout_s:g}s (last error:"
                               f" {device.last_error or 'none'}); it stays in the outbox:"
                               " a later send, flush or listen sends it",
                               EXIT_NO_RELAY) from None
            except ProtocolError as exc:
                raise CliError(f"refused: {_message(exc)}", EXIT_REFUSED) from None
            print(f"accepted {outgoing.msg_id.hex()} via {device.relay_url}", flush=True)
            if wait_s > 0:
                statuses = await outgoing.wait_receipts(wait_s)
                for key, status in sorted(statuses.items()):
                    print(f"{key.text} {status.value}", flush=True)
    return EXIT_OK


async def _flush(settings: ClientSettings, timeout_s: float) -> int:
    session = _Session(settings)
    async with session.device as device:
        before = {m.msg_id: m.state for m in device.sent_messages()}
        try:
            await session.until_fatal(_flushed(device, timeout_s))
        except TimeoutError:
            pass
        if not device.connected and device.stats.connects == 0:
            raise CliError(f"never connected within {timeout_s:g}s (last error:"
                           f" {device.last_error or 'none'})", EXIT_NO_RELAY)
        refused = False
        for message in device.sent_messages():
            if before.get(message.msg_id) is not SendState.QUEUED \
                    or message.state is SendState.QUEUED:
                continue
            refused |= message.state is SendState.REFUSED
            print(f"{message.state.value} {message.msg_id.hex()}"
                  + (f" {message.error}" if message.error else ""), flush=True)
        left = device.queued
    if left:
        _say(f"{left} message(s) still in the outbox")
        return EXIT_NO_RELAY
    return EXIT_REFUSED if refused else EXIT_OK


async def _flushed(device: Device, timeout_s: float) -> None:
    """Connect, empty the outbox, then collect what the relay has for us until it is quiet."""
    async with asyncio.timeout(timeout_s):
        await device.wait_connected()
        await device.flush()
        while True:
            deliveries = device.stats.deliveries
            await asyncio.sleep(_FLUSH_QUIET_S)
            if device.stats.deliveries == deliveries:
                return


def _outbox(settings: ClientSettings, as_json: bool) -> int:
    if not (settings.home / "state.db").exists():
        return EXIT_OK
    state = DeviceState.in_home(settings.home)
    try:
        for message in SentLog(state=state).history():
            print(_format_sent(message, as_json))
    finally:
        state.close()
    return EXIT_OK


def _transfers(settings: ClientSettings, as_json: bool) -> int:
    """Every transfer the state file remembers, sent ones first; read without connecting."""
    if not (settings.home / "state.db").exists():
        return EXIT_OK
    state = DeviceState.in_home(settings.home)
    try:
        queued = [Chunk.decode(row.plaintext).transfer_id for row in state.outgoing()
                  if row.kind == Kind.TRANSFER_CHUNK and row.plaintext is not None]
        for out in (row for name in OutState for row in state.transfers_out(name)):
            manifest = Manifest.decode(out.manifest)
            accepted = out.next_index - queued.count(out.transfer_id)
            print(_format_transfer("out", manifest, PublicKey(out.recipient), out.state,
                                   accepted, out.error, as_json))
        for arriving in (row for name in InState for row in state.transfers_in(name)):
            manifest = Manifest.decode(arriving.manifest)
            done = (manifest.chunk_count if arriving.state in (InState.COMPLETE, InState.SURFACED)
                    else arriving.received)
            print(_format_transfer("in", manifest, PublicKey(arriving.sender), arriving.state,
                                   done, None, as_json))
    finally:
        state.close()
    return EXIT_OK


def _format_transfer(direction: str, manifest: Manifest, peer: PublicKey, state: str,
                     chunks: int, error: str | None, as_json: bool) -> str:
    """`chunks`: accepted by a relay (out), or on disk (in)."""
    if as_json:
        return json.dumps({"direction": direction, "transfer_id": manifest.transfer_id.hex(),
                           "peer": peer.text, "file": manifest.name, "size": manifest.size,
                           "state": state, "chunks": chunks,
                           "chunk_count": manifest.chunk_count, "error": error})
    return (f"{direction} {manifest.transfer_id.hex()} {manifest.name} ({manifest.size} bytes)"
            f" {'to' if direction == 'out' else 'from'} {peer.text} {state}"
            f" {chunks}/{manifest.chunk_count} chunks" + (f" ({error})" if error else ""))


def _format_sent(message: SentMessage, as_json: bool) -> str:
    recipients = {key.text: status.value for key, status in message.recipients.items()}
    if as_json:
        return json.dumps({"msg_id": message.msg_id.hex(), "created_at_ms": message.created_at_ms,
                           "expires_at_ms": message.expires_at_ms, "state": message.state.value,
                           "error": message.error, "recipients": recipients})
    when = datetime.fromtimestamp(message.created_at_ms / 1000, UTC).isoformat(timespec="seconds")
    fates = " ".join(f"{key}={status}" for key, status in recipients.items())
    error = f" ({message.error})" if message.error else ""
    return f"{message.msg_id.hex()} {when} {message.state.value}{error} {fates}"


async def _listen(settings: ClientSettings, count: int | None, timeout_s: float | None,
                  as_json: bool, handlers: dict[str, CallHandler] | None = None,
                  hook: ConfigHook | None = None, save_dir: Path | None = None) -> int:
    received = 0
    files = KeyFiles(settings.identity_path)
    session = _Session(settings, listening=True)
    session.device.on_config(_announce_config(hook))
    async with session.device as device:
        for method, handler in (handlers or {}).items():
            device.on_call(method, handler)
        old = files.draining()
        if old is not None:  # a rotation left the old key's mailbox to drain
            device.drain(old)
        try:
            async with asyncio.timeout(timeout_s):
                await session.until_fatal(device.wait_connected())
                _say(f"listening as {device.identity.public.text} on {device.relay_url}")
                async for item in _arrivals(device):
                    if isinstance(item, ReceivedFile):
                        print(_format_file(item, _save(item, save_dir), as_json), flush=True)
                    else:
                        print(_format(item, as_json), flush=True)
                    received += 1
                    if count is not None and received >= count:
                        break
        except TimeoutError:
            if device.stats.connects == 0:
                raise CliError(f"never connected within {timeout_s:g}s (last error:"
                               f" {device.last_error or 'none'})", EXIT_NO_RELAY) from None
        if old is not None and not device.draining:
            files.drained()
        dropped = {name: value for name, value in device.stats.as_dict().items()
                   if name.startswith(("dropped_", "duplicates")) and value}
        if dropped:
            _say("dropped: " + " ".join(f"{k}={v}" for k, v in dropped.items()))
    if count is not None and received < count:
        return EXIT_TOO_FEW
    return EXIT_OK


def _announce_config(hook: ConfigHook | None) -> Callable[[ConfigUpdate], Awaitable[JsonObject]]:
    """`listen`'s configuration handler: the hook if any, and one line on stderr either way
    (the device keeps the document in config.json once this returned)."""
    async def apply(update: ConfigUpdate) -> JsonObject:
        try:
            reported = await hook(update) if hook is not None else {}
        except HookFailed as exc:
            _say(f"configuration {update.stamp} not applied: {exc}")
            raise
        _say(f"configuration {update.stamp} applied")
        return reported
    return apply


async def _arrivals(device: Device) -> AsyncIterator[InboundMessage | ReceivedFile]:
    """Messages and files as they come, one taken at a time from each source."""
    sources = (device.messages(), device.files())
    pending = {asyncio.ensure_future(anext(source)): source for source in sources}
    try:
        while True:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                source = pending.pop(task)
                yield task.result()
                pending[asyncio.ensure_future(anext(source))] = source
    finally:
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await task
        for source in sources:
            await source.aclose()


def _save(received: ReceivedFile, save_dir: Path | None) -> Path:
    """Move a received file into `save_dir` under its name, never over an existing file."""
    if save_dir is None:
        return received.path
    target = _claim_name(save_dir, received.name)
    try:
        shutil.move(received.path, target)  # a rename over the claimed empty file, or a copy
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    return target


def _claim_name(directory: Path, name: str) -> Path:
    """`directory/name`, or `name.` and a random suffix beside an existing file, claimed by
    creating it empty and exclusively.  Exclusive, so that two listeners sharing a directory
    never both take one name; random, so that a peer's thousandth file of one name costs one
    try, not a thousand (numbering NAME.1, NAME.2, … tried every number in turn)."""
    target = directory / name
    try:
        os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        return target
    except FileExistsError:
        descriptor, path = tempfile.mkstemp(prefix=f"{name}.", dir=directory)
        os.close(descriptor)
        return Path(path)


def _format_file(received: ReceivedFile, path: Path, as_json: bool) -> str:
    if as_json:
        return json.dumps({"from": received.sender.text, "msg_id": received.msg_id.hex(),
                           "transfer_id": received.transfer_id.hex(), "file": received.name,
                           "media_type": received.media_type, "size": received.size,
                           "path": str(path)})
    return (f"{received.sender.text} {received.msg_id.hex()} file {received.name}"
            f" ({received.size} bytes) saved to {path}")


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
