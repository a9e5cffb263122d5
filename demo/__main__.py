"""`continuum-demo`: the whole system on one machine, showing each guarantee as it happens.

Starts a relay (embedded store) that admits only keys the oracle enrolled,
the oracle with its dashboard, and two devices.  The oracle puts both devices
in one peer group and pushes their peer lists; then alice sends bob a message
and gets his signed receipt, bob goes offline, alice sends again, and bob
gets it from his mailbox when he reconnects.  The services keep running for
the dashboard until Ctrl-C (or exit at once with --once).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from client import DeliveryStatus, Device, PeerList
from continuum.server import RelayServer, Settings
from oracle.server import OracleServer, OracleSettings
from proto import Identity, PublicKey
from runtime.logs import configure_logging

STEP_TIMEOUT_S = 15.0


def say(text: str) -> None:
    print(text, flush=True)


def free_port(preferred: int) -> int:
    """`preferred` if nothing listens there, else any free port: a second demo still starts."""
    for port in (preferred, 0):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return probe.getsockname()[1]
    raise OSError("no free port on 127.0.0.1")


async def wait_for(condition, what: str) -> None:  # type: ignore[no-untyped-def]
    """Poll a cheap in-process condition; the demo fails loudly instead of hanging."""
    async with asyncio.timeout(STEP_TIMEOUT_S):
        while not condition():
            await asyncio.sleep(0.02)
    say(f"  ✓ {what}")


@contextlib.asynccontextmanager
async def device(name: str, identity: Identity, relay: str, oracle: PublicKey,
                 home: Path) -> AsyncIterator[Device]:
    peers = PeerList.load(home / f"{name}-peers.json")
    async with Device(identity, [relay], peers=peers, oracle_key=oracle) as dev:
        await asyncio.wait_for(dev.wait_connected(), STEP_TIMEOUT_S)
        yield dev


async def next_message(dev: Device) -> bytes:
    async with asyncio.timeout(STEP_TIMEOUT_S):
        async for message in dev.messages():
            return message.payload
    raise RuntimeError("message stream ended")


async def run(args: argparse.Namespace) -> None:
    home = Path(args.dir or tempfile.mkdtemp(prefix="continuum-demo-"))
    home.mkdir(parents=True, exist_ok=True)
    if (home / "oracle.db").exists():
        raise RuntimeError(f"{home} already holds a demo's state; give an empty --dir")
    relay_port, oracle_port = free_port(args.relay_port), free_port(args.oracle_port)
    relay_url = f"ws://127.0.0.1:{relay_port}/v1/connect"
    oracle = OracleServer(OracleSettings(
        port=oracle_port, database=f"sqlite:///{home / 'oracle.db'}",
        identity_file=str(home / "oracle.key"), relays=(relay_url,), log_level="warning"))
    relay = RelayServer(Settings(
        port=relay_port, store=f"sqlite:///{home / 'relay.db'}",
        oracle_url=f"http://127.0.0.1:{oracle_port}", oracle_key=oracle.identity.public.text,
        require_enrollment=True, log_level="warning"))

    async with oracle, relay:
        password = await oracle.create_admin("admin")
        say(f"relay      {relay.url}   (store: {home / 'relay.db'}, enrolled keys only)")
        say(f"oracle     {oracle.url}/   key {oracle.identity.public.text}")
        say(f"dashboard  {oracle.url}/login   user admin   password {password}")
        say(f"state      {home}")

        alice, bob = Identity.generate(), Identity.generate()
        say("\n1. The oracle enrolls alice and bob and puts them in one peer group")
        registry = oracle.oracle.registry  # type: ignore[union-attr]
        await registry.enroll(alice.public.text, "alice", ["demo"])
        await registry.enroll(bob.public.text, "bob", ["demo"])
        group = await registry.create_group("demo-pair")
        async with device("alice", alice, relay.url, oracle.identity.public, home) as a, \
                device("bob", bob, relay.url, oracle.identity.public, home) as b:
            await registry.add_member(group.id, alice.public.text)
            await registry.add_member(group.id, bob.public.text)
            await wait_for(lambda: bob.public in a.peers and alice.public in b.peers,
                           "both devices received their signed peer lists through the relay")

            say("\n2. alice sends bob a message while both are online")
            sent = await a.send([bob.public], b"hello bob, it's alice", ttl_s=3600)
            say(f"  ✓ relay accepted message {sent.msg_id.hex()}")
            say(f"  ✓ bob decrypted: {(await next_message(b)).decode()!r}")
            status = (await sent.wait_receipts(timeout=STEP_TIMEOUT_S))[bob.public]
            say(f"  ✓ alice got bob's signed receipt: {status.value}")

        say("\n3. bob goes offline; alice sends again")
        async with device("alice", alice, relay.url, oracle.identity.public, home) as a:
            offline = await a.send([bob.public], b"are you there, bob?", ttl_s=3600)
            pending = (await offline.wait_receipts(timeout=1.0))[bob.public]
            say(f"  ✓ relay stored it in bob's mailbox; receipt status: {pending.value}")
            say("\n4. bob reconnects and gets it from his mailbox")
            async with device("bob", bob, relay.url, oracle.identity.public, home) as b:
                say(f"  ✓ bob decrypted: {(await next_message(b)).decode()!r}")
                status = (await offline.wait_receipts(timeout=STEP_TIMEOUT_S))[bob.public]
                say(f"  ✓ alice got bob's signed receipt: {status.value}")
        if status is not DeliveryStatus.DELIVERED:
            raise RuntimeError(f"expected a delivered receipt, got {status.value}")

        say("\nDemo complete: end-to-end encrypted, signed, receipted, stored while offline.")
        if args.once:
            return
        say(f"Services keep running; open {oracle.url}/login. Ctrl-C to stop.")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="continuum-demo", description=__doc__.split("\n")[0])
    parser.add_argument("--dir", help="where keys and databases go (default: a new temp dir)")
    parser.add_argument("--relay-port", type=int, default=8470)
    parser.add_argument("--oracle-port", type=int, default=8480)
    parser.add_argument("--once", action="store_true", help="exit after the demo instead of serving")
    parser.add_argument("--log-level", default="error",
                        help="service logs (JSON) at this level and above; the start-up race"
                             " between relay and oracle warns once at 'warning'")
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    try:
        asyncio.run(run(args))
    except (RuntimeError, TimeoutError, OSError) as exc:
        sys.exit(f"continuum-demo failed: {type(exc).__name__}: {exc}")


if __name__ == "__main__":
    main()
