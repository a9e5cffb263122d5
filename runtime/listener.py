"""The listening sockets: every accepted TCP socket counted until it is really gone, and
work for peers not yet authenticated kept from delaying the connections already served.

aiohttp's own sites accept without limit, and a socket that never completes a
request (slowloris) reaches no handler, middleware or connection gate; a
socket whose handler has ended can still hold unsent data in the kernel.  So
both services count here, the first code that sees an accepted socket: from
accept() until the transport reports it lost, whatever state the socket dies
in (in a TLS handshake too, which must finish within the request timeout).
One over the cap, or over its client address's share of it, is reset at once,
before aiohttp allocates anything for it.

Why our own accept loop rather than `loop.create_server`: asyncio accepts up to
its backlog (100) sockets each time the listening socket is readable and
starts them all in the same turn, so a flood of new connections arrives as
bursts of a hundred upgrade requests and handshakes, and a frame from an
established device waits behind all of them (a known device's p99 was 10-15x
its idle figure under a flood of refused handshakes, benchmarks/hostile.py).
With a `TurnBudget` (the relay), accepts and reads of sockets whose peer has
not proved who it is yet (every socket until the application calls `trust`
on its transport) are steps of one shared budget: a few per turn, none
right after an authenticated device's read, in arrival order.  However many
such sockets there are and however fast they send, each turn carries at most
that many of their steps.  The rest waits in the kernel (the listen queue,
unread socket buffers), where it costs the process nothing.  Without one
(the oracle) the loop still takes one socket per turn.

Only public API: `loop.sock_accept` and `loop.connect_accepted_socket`, with
aiohttp's `runner.server` as the protocol factory that `SocketCap` wraps.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import ssl
import struct
import time
from collections import deque
from collections.abc import Callable

import structlog

from .client_address import Network, client_unit, is_trusted

# How many connections the kernel keeps waiting for accept(): a flood fills it and
# honest SYNs are retried by their kernels, as with any server; beyond a few
# thousand it would only hold more of a flood.
LISTEN_BACKLOG = 1024
# After accept() failed for want of descriptors or memory, wait this long (as asyncio does).
_ACCEPT_RETRY_S = 1.0
_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_RESET_ON_CLOSE = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST


class TurnBudget:
    """Unauthenticated work yields to authenticated work: a few steps per event-loop turn,
    and none for up to `yield_s` after an authenticated peer's read; the rest wait, in order.

    A step is one accept or one read of a socket whose peer is not yet trusted
    (each read starts at most one more step of its handler, so bounding reads
    bounds that work too).  The budget of `per_turn` steps is refilled by a
    callback that runs at the start of the next turn, before its I/O, or, when
    an authenticated socket was read less than `yield_s` ago, once `yield_s`
    has passed since that read: a device's frame and the few turns its
    delivery takes then run with no newcomer's step between them.

    So newcomers get every idle turn, and under any authenticated load at least
    `per_turn` steps per `yield_s` of time: a refill that comes later than that
    (a long, busy turn) grants the steps of the time that passed, up to
    `_MAX_BANKED` refills' worth.  Waiters are resumed in arrival order, none
    starved.
    """

    __slots__ = ("per_turn", "yield_s", "_left", "_waiting", "_refill_due", "_last_trusted",
                 "_last_refill")

    # At most this many refills' steps in one turn, however long the turn before it was.
    _MAX_BANKED = 16

    def __init__(self, per_turn: int, yield_s: float) -> None:
        if per_turn < 1 or yield_s <= 0:
            raise ValueError("a turn budget needs a step per turn and a yield > 0")
        self.per_turn = per_turn
        self.yield_s = yield_s
        self._left = per_turn
        # Each waiter resumes its step and says whether it took it (False: it went away).
        self._waiting: deque[Callable[[], bool]] = deque()
        self._refill_due = False
        self._last_trusted = float("-inf")
        self._last_refill = time.monotonic()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def trusted_read(self) -> None:
        """An authenticated socket was read: newcomers wait until its work is done."""
        self._last_trusted = time.monotonic()
        self._left = 0

    def take(self) -> bool:
        """Spend one step of this turn now if one is left; False: `wait` instead."""
        if self._left <= 0:
            return False
        self._left -= 1
        self._schedule_refill()
        return True

    def wait(self, resume: Callable[[], bool]) -> None:
        """Run `resume` in a later turn, after the waiters before it."""
        self._waiting.append(resume)
        self._schedule_refill()

    async def step(self) -> None:
        """Return once a step of some turn is ours (the accept loop's way to take one)."""
        if self.take():
            return
        ready = asyncio.get_running_loop().create_future()

        def resume() -> bool:
            if ready.done():  # cancelled meanwhile
                return False
            ready.set_result(None)
            return True

        self.wait(resume)
        await ready

    def _schedule_refill(self) -> None:
        if self._refill_due:
            return
        self._refill_due = True
        loop = asyncio.get_running_loop()
        delay = self._last_trusted + self.yield_s - time.monotonic()
        if delay > 0:
            loop.call_later(delay, self._refill)
        else:
            loop.call_soon(self._refill)

    def _refill(self) -> None:
        now = time.monotonic()
        periods = min(max(1, int((now - self._last_refill) / self.yield_s)), self._MAX_BANKED)
        self._refill_due = False
        self._last_refill = now
        self._left = self.per_turn * periods
        while self._left > 0 and self._waiting:
            if self._waiting.popleft()():
                self._left -= 1
        if self._waiting:
            self._schedule_refill()


class SocketCap:
    """A protocol factory around `inner`'s: at most `limit` sockets open at once, and at most
    `per_address` of them from one client address.

    A client address is what `client_unit` makes of the peer's address (an IPv4
    address, an IPv6 /64).  Without a share per address, one client holding
    half-sent requests (each reopened as soon as the request timeout closes
    it) kept every socket, and every other client, relays polling for the
    access list included, was refused at accept.  With it, one address holds
    at most `per_address`; it takes `limit / per_address` addresses to fill the cap.

    Peers in `unbounded` (the trusted proxies) have no share: behind a proxy
    every socket comes from it, each carrying a different client, and a proxy
    (ingress-nginx, the chart's) reads a client's whole request headers before
    it opens an upstream connection, so slow clients are held, and bounded, at
    the proxy, not here.  Capping the proxy's address would cap the whole
    fleet at one client's share.  Their sockets still count toward `limit`.

    `on_refused(first, address)` is called for every socket refused, with
    `address` None when `limit` was reached and the client address when its
    share was; `first` is True for the first refusal of an episode (since the
    last socket admitted, for that address when it is given), so a caller can
    log once and count always.
    """

    def __init__(self, inner: Callable[[], asyncio.Protocol], limit: int,
                 on_refused: Callable[[bool, str | None], None] = lambda first, address: None,
                 budget: TurnBudget | None = None, per_address: int | None = None,
                 unbounded: tuple[Network, ...] = ()) -> None:
        self._inner = inner
        self.limit = limit
        # Without a share, every socket is counted under one key: no address is parsed on
        # each accept (the relay's case, where the gate bounds addresses after the upgrade).
        self._shared = per_address is not None
        self.per_address = limit if per_address is None else min(per_address, limit)
        self.budget = budget  # None: every socket is served as soon as it has data
        self._on_refused = on_refused
        self._unbounded = unbounded
        self.open = 0
        self.refused = 0
        self._refusing = False
        self._by_address: dict[str, int] = {}  # client address -> its open sockets
        self._refusing_addresses: set[str] = set()  # each also in _by_address

    def admit(self, peer: str = "") -> str | None:
        """Count one socket accepted from `peer` in, returning the client address it is counted
        under (`release` it with that), or None: it must be refused (a cap is reached)."""
        address = self._unit(peer)
        held = self._by_address.get(address, 0)
        if self.open >= self.limit:
            self._refuse(None, not self._refusing)
            self._refusing = True
            return None
        if held >= self.per_address and not is_trusted(peer, self._unbounded):
            self._refuse(address, address not in self._refusing_addresses)
            self._refusing_addresses.add(address)
            return None
        self.open += 1
        self._by_address[address] = held + 1
        self._refusing = False
        self._refusing_addresses.discard(address)
        return address

    def release(self, address: str) -> None:
        """One socket counted under `address` is gone (call once per `admit`)."""
        self.open -= 1
        held = self._by_address.get(address, 0) - 1
        if held > 0:
            self._by_address[address] = held
        else:
            self._by_address.pop(address, None)
            self._refusing_addresses.discard(address)

    def held_by(self, peer: str) -> int:
        """The sockets open from `peer`'s client address."""
        return self._by_address.get(self._unit(peer), 0)

    def protocol(self, address: str = "") -> _Counted:
        """The protocol of one socket admitted under `address`; it counts the socket out when
        it is lost."""
        return _Counted(self, address)

    def _unit(self, peer: str) -> str:
        return client_unit(peer) if self._shared else ""

    def _refuse(self, address: str | None, first: bool) -> None:
        self.refused += 1
        self._on_refused(first, address)


class _Counted(asyncio.Protocol):
    """Forwards every protocol event to the inner protocol, created once the socket is live.

    `release` counts the socket out once: from `connection_lost`, or from the
    listener when the socket died before the transport reported it made (a TLS
    handshake that failed or timed out never reaches `connection_made`).
    Until `trust`, each read spends a step of the cap's `TurnBudget`; a read
    that finds none left is held, with the socket paused, until its turn comes.
    """

    __slots__ = ("_cap", "_address", "_inner", "_released", "_transport", "_trusted", "_held",
                 "_held_eof")

    def __init__(self, cap: SocketCap, address: str) -> None:
        self._cap = cap
        self._address = address
        self._inner: asyncio.Protocol | None = None
        self._released = False
        self._transport: asyncio.Transport | None = None
        self._trusted = False
        self._held: bytes | None = None
        self._held_eof = False  # the peer's EOF came after held data: deliver it after them

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._cap.release(self._address)

    def trust(self) -> None:
        self._trusted = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._inner = self._cap._inner()
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.release()
        self._held = None
        inner, self._inner = self._inner, None
        if inner is not None:
            inner.connection_lost(exc)
        transport, self._transport = self._transport, None
        _break_cycles(inner, transport)

    def data_received(self, data: bytes) -> None:
        if self._inner is None:
            return
        if self._held is not None:  # read before the pause took effect: keep the order
            self._held += data
            return
        budget = self._cap.budget
        if budget is None:
            self._inner.data_received(data)
            return
        if self._trusted:
            budget.trusted_read()
            self._inner.data_received(data)
            return
        if budget.take():
            self._inner.data_received(data)
            return
        self._held = data
        assert self._transport is not None
        self._transport.pause_reading()
        budget.wait(self._resume)

    def _resume(self) -> bool:
        data, self._held = self._held, None
        if data is None or self._inner is None or self._transport is None:
            return False  # lost while it waited
        self._transport.resume_reading()
        self._inner.data_received(data)
        if self._held_eof:
            self._held_eof = False
            if not self.eof_received():
                self._transport.close()
        return True

    def eof_received(self) -> bool | None:
        if self._held is not None:
            self._held_eof = True
            return True  # half-open until the held data and this EOF are delivered
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()


def _break_cycles(protocol: asyncio.Protocol | None,
                  transport: asyncio.Transport | None) -> None:
    """Drop the two references that keep a lost connection's objects in reference cycles.

    asyncio's socket transport keeps a bound method of itself (`_read_ready_cb`)
    and aiohttp's request handler keeps one of the WebSocket it upgraded to
    (`_data_received_cb`, the heartbeat's), so a closed connection (about 50
    objects) is freed only by the garbage collector, not when its last
    reference goes.  Under a flood of refused handshakes (~1,800/s) that was
    a collection of thousands of objects every ~80 ms, each 1-3 ms long,
    falling between a known device's frame and its delivery: its p99 was
    2.3-3.0x idle, and 1.1-1.4x with the cycles broken (benchmarks/hostile.py
    --only verify).  The freeing then happens within the step that closed the
    connection, which the turn budget already bounds.  Both are private
    attributes, touched only if present and only once the connection is gone
    (no callback of either can run again); without them the collector frees
    the cycles as before.
    """
    if protocol is not None and hasattr(protocol, "_data_received_cb"):
        protocol._data_received_cb = None
    if transport is not None and hasattr(transport, "_read_ready_cb"):
        transport._read_ready_cb = None


def trust(transport: asyncio.BaseTransport | None) -> None:
    """The peer on `transport` proved who it is: its reads no longer wait for a turn budget."""
    protocol = transport.get_protocol() if transport is not None else None
    if isinstance(protocol, _Counted):
        protocol.trust()


class Listener:
    """The listening sockets of one service and their accept loops; `close` stops accepting
    (connections already made are the application's to close)."""

    def __init__(self, cap: SocketCap, sockets: list[socket.socket],
                 tls: ssl.SSLContext | None, tls_handshake_timeout_s: float) -> None:
        self._cap = cap
        self.sockets = sockets
        self._tls = tls
        self._tls_handshake_timeout_s = tls_handshake_timeout_s
        self._log = structlog.get_logger("continuum.listener")
        self._connecting: set[asyncio.Task[None]] = set()  # sockets whose transport is not made
        self._accepting = [asyncio.create_task(self._accept_forever(sock), name="accept")
                           for sock in sockets]

    async def _accept_forever(self, listening: socket.socket) -> None:
        loop, budget = asyncio.get_running_loop(), self._cap.budget
        while True:
            if budget is None:
                # Still one socket per turn: what established connections have ready goes
                # first (see the module docstring).
                await asyncio.sleep(0)
            else:
                await budget.step()
            try:
                conn, peer = await loop.sock_accept(listening)
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                continue
            except OSError as exc:
                if exc.errno not in _OUT_OF_RESOURCES:
                    raise
                self._log.warning("accept_out_of_resources", error=exc.strerror)
                await asyncio.sleep(_ACCEPT_RETRY_S)
                continue
            self._start(conn, peer[0] if isinstance(peer, tuple) else "")

    def _start(self, conn: socket.socket, peer: str) -> None:
        address = self._cap.admit(peer)
        if address is None:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
            conn.close()
            return
        conn.setblocking(False)
        # Making the transport takes a turn (a TLS handshake, round trips): beside the
        # accept loop, so the loop may take the next socket in this same turn.
        task = asyncio.create_task(self._connect(conn, address), name="connect")
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)

    async def _connect(self, conn: socket.socket, address: str) -> None:
        made: list[_Counted] = []

        def protocol() -> _Counted:
            made.append(self._cap.protocol(address))
            return made[0]

        loop = asyncio.get_running_loop()
        try:
            if self._tls is None:
                await loop.connect_accepted_socket(protocol, conn)
            else:
                await loop.connect_accepted_socket(
                    protocol, conn, ssl=self._tls,
                    ssl_handshake_timeout=self._tls_handshake_timeout_s)
        except BaseException as exc:
            # The socket died before the transport said it was made (a TLS handshake that
            # failed or timed out, a stop): nothing will report it lost, so count it out
            # here (a no-op if connection_lost already did).
            if made:
                made[0].release()
            else:
                self._cap.release(address)
            conn.close()
            if not isinstance(exc, Exception):
                raise

    def close(self) -> None:
        """Stop accepting: cancel the accept loops and unfinished connects, close the sockets."""
        for task in (*self._accepting, *self._connecting):
            task.cancel()
        for sock in self.sockets:
            sock.close()

    async def wait_closed(self) -> None:
        await asyncio.gather(*self._accepting, *self._connecting, return_exceptions=True)


async def listen(cap: SocketCap, host: str, port: int, tls: ssl.SSLContext | None = None,
                 tls_handshake_timeout_s: float = 10.0) -> Listener:
    """Serve `cap`'s protocols on every address `host` names, on `port` (0: a free one),
    over TLS with `tls`; a TLS handshake must finish within `tls_handshake_timeout_s`."""
    infos = await asyncio.get_running_loop().getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    return Listener(cap, _bind(infos), tls, tls_handshake_timeout_s)


def bind_listening(host: str, port: int) -> list[socket.socket]:
    """The listening sockets `listen` would make, made now (blocking name lookup), for
    processes forked next to share: each accepts from the same kernel queue (`Listener`)."""
    return _bind(socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                    flags=socket.AI_PASSIVE))


def _bind(infos: list[tuple]) -> list[socket.socket]:
    """One non-blocking listening socket per distinct address in `infos`."""
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                # One socket per family, as asyncio does: no dual-stack surprises.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.close()
        raise
    return sockets
