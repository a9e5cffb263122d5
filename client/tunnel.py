"""Tunnels: a device's own TCP services, reached by its peers through streams (SPEC §16).

`expose` serves, on the device, the local TCP ports it names, to peers only
(and, if given, only to the peers allowed): each stream a peer opens for
service "tcp/PORT" becomes one TCP connection to 127.0.0.1:PORT (or the host
given).  `forward` listens on a local address on the user's side: each TCP
connection accepted there becomes one stream to "tcp/PORT" on the peer.  The
device never listens on the network and opens no inbound port.

What crosses maps both ways:

- data, in order, with flow control end to end (a slow reader at either end
  slows the writer at the other; nothing piles up in the tunnel);
- a half-close: EOF from one TCP side is that stream direction's FIN, and a
  FIN becomes `write_eof` (shutdown) on the other TCP side, so protocols that
  close their sending side first (HTTP/1.0 clients, `nc -N`) work;
- errors: a stream that ends without FIN (the peer disconnected, a chunk did
  not open, the service went away) resets the local TCP connection, so an
  application sees a reset, never a clean end of truncated data; a TCP reset
  aborts the stream with its reason.

A port the device does not expose, a peer it does not allow, or a service
that refuses the connection refuse the stream (`StreamRefusedError` at the
user's side, whose TCP connection is then reset).  A burst of connections
beyond the bounds on opens in flight (`StreamLimitError`, `RateLimitedError`)
waits and retries, as a slow connect would, for up to 30 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable, Collection

from proto import PublicKey
from proto.errors import ProtocolError, RateLimitedError, StreamLimitError
from runtime.logs import library_logger

from .device import Device
from .stream_rules import DEFAULT_WINDOW
from .streams import Stream, StreamRequest
from .tcp_side import TcpSide

log = library_logger("continuum.client")

_SERVICE = re.compile(r"^tcp/([1-9][0-9]{0,4})$")
CONNECT_TIMEOUT_S = 10.0
OPEN_TIMEOUT_S = 30.0


def service_for(port: int) -> str:
    """The stream service that names a TCP port."""
    if not 1 <= port <= 65535:
        raise ValueError(f"{port} is not a TCP port")
    return f"tcp/{port}"


def port_of(service: str) -> int | None:
    """The TCP port a service names, None if it names none."""
    match = _SERVICE.match(service)
    if match is None or int(match.group(1)) > 65535:
        return None
    return int(match.group(1))


def refusal(service: str, peer: PublicKey, ports: Collection[int],
            allowed: Collection[PublicKey] | None) -> str | None:
    """Why `peer` may not reach `service` on this device; None if it may.  (The device
    takes streams from its peers only: that is checked before, by the stream rules.)"""
    port = port_of(service)
    if port is None or port not in ports:
        return f"this device does not expose {service}"
    if allowed is not None and peer not in allowed:
        return f"{peer.text} is not allowed to reach {service} on this device"
    return None


async def pump(stream: Stream, side: TcpSide) -> None:
    """Carry one TCP connection over one stream until both directions ended or one broke."""

    async def up() -> None:  # TCP → stream
        try:
            while data := await side.read():
                await stream.write(data)
        except (ConnectionError, OSError) as exc:
            stream.abort(f"the TCP connection was reset: {exc}")
            raise
        await stream.close()  # EOF: our FIN, the other side still sends

    async def down() -> None:  # stream → TCP
        while data := await stream.read():
            side.write(data)
            await side.drain()
        side.write_eof()

    tasks = [asyncio.create_task(up()), asyncio.create_task(down())]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        failed = next((t.exception() for t in done if t.exception() is not None), None)
        if failed is not None:
            if isinstance(failed, ProtocolError):
                log.info("tunnel_stream_broken", peer=stream.peer.text, error=failed.message)
            side.reset()  # never a clean end of truncated data
            stream.abort(f"the tunnel's TCP side failed: {failed}")
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        await side.close()


def expose(device: Device, ports: Collection[int], *, host: str = "127.0.0.1",
           allowed: Collection[PublicKey] | None = None, window: int = DEFAULT_WINDOW,
           on_refused: Callable[[PublicKey, str], None] | None = None) -> None:
    """Serve `ports` on `host` to the device's peers (and only `allowed`, if given), from
    now on; `on_refused(peer, why)` hears of each refusal.  `window`: bytes each stream's
    peer may send before this side reads (`Device.open_stream`)."""
    chosen = frozenset(ports)
    allow = None if allowed is None else frozenset(allowed)

    async def serve(request: StreamRequest) -> None:
        why = refusal(request.service, request.peer, chosen, allow)
        if why is None:
            port = port_of(request.service)
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT_S):
                    _, side = await asyncio.get_running_loop().create_connection(
                        TcpSide, host, port)
            except (OSError, TimeoutError) as exc:
                why = f"{host}:{port} refused the connection: {exc.strerror or 'timed out'}" \
                    if isinstance(exc, OSError) else f"{host}:{port} did not answer"
        if why is not None:
            if on_refused is not None:
                on_refused(request.peer, why)
            await request.refuse(why)
            return
        try:
            stream = await request.accept(window=window)
        except ProtocolError:  # the opener gave up meanwhile
            side.reset()
            return
        await pump(stream, side)

    device.on_stream(serve)


async def forward(device: Device, peer: PublicKey, port: int, *, host: str = "127.0.0.1",
                  local_port: int = 0, window: int = DEFAULT_WINDOW,
                  on_failed: Callable[[BaseException], None] | None = None) -> asyncio.Server:
    """Listen on `host:local_port`; each connection there becomes a stream to `peer`'s
    `port`.  Returns the listening server (its socket tells the port chosen for 0)."""
    service = service_for(port)

    async def connected(side: TcpSide) -> None:
        try:
            stream = await _open(device, peer, service, window)
        except (ProtocolError, TimeoutError) as exc:
            if on_failed is not None:
                on_failed(exc)
            side.reset()
            return
        await pump(stream, side)

    handlers: set[asyncio.Task[None]] = set()  # held here: the loop keeps only weak ones

    def start(side: TcpSide) -> None:
        handler = asyncio.create_task(connected(side))
        handlers.add(handler)
        handler.add_done_callback(handlers.discard)

    return await asyncio.get_running_loop().create_server(
        lambda: TcpSide(on_connected=start), host, local_port)


async def _open(device: Device, peer: PublicKey, service: str, window: int) -> Stream:
    """Open the stream for one TCP connection; a bound that says "retry later" (a burst of
    connections beyond the relay's or the peer's opens in flight) is retried with backoff
    until OPEN_TIMEOUT_S, like a slow connect, rather than failing the connection."""
    async with asyncio.timeout(OPEN_TIMEOUT_S):
        delay = 0.05
        while True:
            try:
                return await device.open_stream(peer, service, window=window)
            except (StreamLimitError, RateLimitedError):
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
