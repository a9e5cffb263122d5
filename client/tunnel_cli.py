"""`continuum-client expose` and `tunnel`: the CLI's side of `tunnel` (one job: parse, run, say).

    continuum-client expose PORT… [--allow cpk_…]… [--host 127.0.0.1]
    continuum-client tunnel cpk_…:PORT [--listen 127.0.0.1:LOCAL]

Both run until interrupted.  `expose` prints one line on stdout once its
relay connection is up (`exposing tcp/PORT… as KEY via URL`) and one line on
stderr per refused stream; `tunnel` prints `listening on HOST:PORT -> KEY:PORT`
once it listens, and one line on stderr per connection it could not carry.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress

from proto import PublicKey
from proto.frames import MAX_CREDIT

from .cli import EXIT_OK, CliError, _message, _say, _Session
from .settings import ClientSettings
from .stream_rules import DEFAULT_WINDOW
from .tunnel import expose, forward, service_for


def add_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    exposing = commands.add_parser(
        "expose", help="serve local TCP ports to peers, through streams (until interrupted)")
    exposing.add_argument("ports", nargs="+", type=int, metavar="PORT",
                          help="the local TCP ports peers may reach; no other")
    exposing.add_argument("--allow", action="append", metavar="cpk_…",
                          help="only this peer may (repeatable; default: every peer)")
    exposing.add_argument("--host", default="127.0.0.1",
                          help="where the ports are served (default 127.0.0.1)")
    tunnel = commands.add_parser(
        "tunnel", help="reach a peer's exposed TCP port at a local address (until interrupted)")
    tunnel.add_argument("target", metavar="PEER:PORT", help="cpk_… key and port of the peer")
    tunnel.add_argument("--listen", default="127.0.0.1:0", metavar="HOST:PORT",
                        help="local address to listen on (default 127.0.0.1, a free port)")
    for command in (exposing, tunnel):
        command.add_argument("--window", type=int, default=DEFAULT_WINDOW, metavar="BYTES",
                             help="bytes the other end may send per connection before this"
                                  f" side reads (default {DEFAULT_WINDOW}; relays bound it,"
                                  " 4 MiB by default)")


async def run(args: argparse.Namespace, settings: ClientSettings) -> int:
    if args.command == "expose":
        return await _expose(args, settings)
    return await _tunnel(args, settings)


async def _expose(args: argparse.Namespace, settings: ClientSettings) -> int:
    for port in args.ports:
        _port(port)
    allowed = None if not args.allow else [PublicKey.from_text(text) for text in args.allow]
    session = _Session(settings)
    device = session.device
    for key in allowed or ():
        if key not in device.peers:
            _say(f"warning: {key.text} is allowed but is not a peer: its streams are refused"
                 f" until: continuum-client peers add {key.text}")
    expose(device, args.ports, host=args.host, allowed=allowed, window=_window(args.window),
           on_refused=lambda peer, why: _say(f"refused a stream from {peer.text}: {why}"))
    services = " ".join(service_for(port) for port in args.ports)
    async with device:
        await session.until_fatal(device.wait_connected())
        print(f"exposing {services} of {args.host} as {device.identity.public.text}"
              f" via {device.relay_url}", flush=True)
        await session.until_fatal(asyncio.Event().wait())
    return EXIT_OK


async def _tunnel(args: argparse.Namespace, settings: ClientSettings) -> int:
    peer_text, colon, port_text = args.target.rpartition(":")
    if not colon or not port_text.isdigit():
        raise CliError(f"{args.target!r} is not PEER:PORT (cpk_…:22)")
    peer, port = PublicKey.from_text(peer_text), _port(int(port_text))
    host, colon, local = args.listen.rpartition(":")
    if not colon or not local.isdigit():
        raise CliError(f"--listen {args.listen!r} is not HOST:PORT (127.0.0.1:8022)")
    host = host.strip("[]")
    session = _Session(settings)
    device = session.device
    if peer not in device.peers:
        _say(f"warning: {peer.text} is not a peer: its device refuses streams from"
             " non-peers both ways, add it with: continuum-client peers add KEY")
    async with device:
        try:
            server = await forward(device, peer, port, host=host, local_port=int(local),
                                   window=_window(args.window),
                                   on_failed=lambda exc: _say(
                                       f"a connection to {peer.text}:{port} failed:"
                                       f" {_message(exc) or type(exc).__name__}"))
        except OSError as exc:
            raise CliError(f"cannot listen on {args.listen}: {exc.strerror}") from None
        if not _is_loopback(host):
            _say(f"warning: {host} is not a loopback address: whoever reaches it reaches"
                 f" {peer.text}:{port} as this device")
        name = server.sockets[0].getsockname()
        print(f"listening on {name[0]}:{name[1]} -> {peer.text}:{port}", flush=True)
        try:
            await session.until_fatal(server.serve_forever())
        finally:
            server.close()
    return EXIT_OK


def _window(window: int) -> int:
    if not 1024 <= window <= MAX_CREDIT:
        raise CliError(f"--window {window} must be between 1024 and {MAX_CREDIT} bytes")
    return window


def _port(port: int) -> int:
    if not 1 <= port <= 65535:
        raise CliError(f"{port} is not a TCP port (1-65535)")
    return port


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
