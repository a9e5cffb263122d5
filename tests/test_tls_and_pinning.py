"""Knowing the relay: wss:// served by the relay itself, and devices that pin relay keys."""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cli_support import new_home, run_cli_async
from client import DeliveryStatus, Device, PeerList
from client.backoff import Backoff
from client.settings import ClientSettings
from continuum.server import RelayServer
from proto import Identity
from proto.errors import InvalidFieldError
from tally import ATTACKS_REJECTED, TALLY
from tls_support import self_signed


@contextlib.asynccontextmanager
async def devices(url: str, **options: object) -> AsyncIterator[tuple[Device, Device, Identity]]:
    alice, bob = Identity.generate(), Identity.generate()
    fast = Backoff(0.05, 0.2)
    async with Device(alice, [url], PeerList([bob.public]), backoff=fast, **options) as a, \
            Device(bob, [url], PeerList([alice.public]), backoff=fast, **options) as b:
        yield a, b, bob


async def test_a_relay_serves_wss_and_devices_verify_its_certificate(start_relay,
                                                                     tmp_path) -> None:
    cert, key = self_signed(tmp_path)
    server: RelayServer = await start_relay(tls_cert=str(cert), tls_key=str(key))
    assert server.url.startswith("wss://")
    trusting = ssl.create_default_context(cafile=str(cert))
    async with devices(server.url, tls=trusting) as (a, b, bob):
        async with asyncio.timeout(10):
            outgoing = await a.send([bob.public], b"over TLS")
        async with asyncio.timeout(10):
            async for message in b.messages():
                assert message.payload == b"over TLS"
                break
        assert await outgoing.wait_receipts(timeout=10) == {bob.public: DeliveryStatus.DELIVERED}


async def test_a_device_that_does_not_trust_the_certificate_never_connects(start_relay,
                                                                            tmp_path) -> None:
    cert, key = self_signed(tmp_path)
    server = await start_relay(tls_cert=str(cert), tls_key=str(key))
    async with devices(server.url) as (a, _b, _bob):  # the system store: no such CA
        async with asyncio.timeout(10):
            while a.stats.connect_failures < 2:
                await asyncio.sleep(0.05)
        assert not a.connected and "certificate" in (a.last_error or "").lower()
    TALLY[ATTACKS_REJECTED] += 1


async def test_a_pinned_device_talks_only_to_the_relay_key_it_was_given(relay) -> None:
    """Before: a device signed whatever relay key a CHALLENGE named, so any server holding
    any key passed the handshake and could forge ACCEPTED and EXPIRY."""
    other = Identity.generate().public
    async with devices(relay.url, relay_keys=[other]) as (a, _b, _bob):
        async with asyncio.timeout(10):
            while a.stats.connect_failures < 2:
                await asyncio.sleep(0.05)
        assert not a.connected and "not one this device trusts" in (a.last_error or "")
    TALLY[ATTACKS_REJECTED] += 1
    assert relay.relay is not None
    async with devices(relay.url, relay_keys=[relay.relay.identity.public]) as (a, _b, _bob):
        async with asyncio.timeout(10):
            await a.wait_connected()


@pytest.mark.parametrize("cert_only", [True, False])
def test_tls_settings_go_in_pairs(cert_only: bool) -> None:
    from continuum.settings import Settings
    with pytest.raises(ValueError, match="tls_cert and tls_key go together"):
        Settings(tls_cert="a.pem" if cert_only else "", tls_key="" if cert_only else "k.pem"
                 ).validate()


async def test_the_cli_pins_relay_keys_and_trusts_a_private_ca(start_relay, tmp_path) -> None:
    """`continuum-client --relay-key … --ca-file …`: the library's pinning and TLS, from a shell."""
    cert, key = self_signed(tmp_path)
    server: RelayServer = await start_relay(tls_cert=str(cert), tls_key=str(key))
    assert server.relay is not None
    home = tmp_path / "alice"
    new_home(home)
    bob = Identity.generate().public.text
    send = ("--home", str(home), "--relay", server.url, "send", bob, "pinned", "--timeout", "3")
    right = ("--relay-key", server.relay.identity.public.text, "--ca-file", str(cert))
    code, out, err = await run_cli_async(*right, *send)
    assert code == 0, err

    wrong_key = ("--relay-key", Identity.generate().public.text, "--ca-file", str(cert))
    code, out, err = await run_cli_async(*wrong_key, *send)
    assert code == 3 and "not one this device trusts" in err
    code, out, err = await run_cli_async(*send)  # no --ca-file: the system store
    assert code == 3 and "certificate" in err.lower()
    TALLY[ATTACKS_REJECTED] += 2

    env = {**os.environ, "CONTINUUM_RELAY_KEYS": f"{Identity.generate().public.text},"
           f" {server.relay.identity.public.text}", "CONTINUUM_CA_FILE": str(cert)}
    code, out, err = await run_cli_async(*send, env=env)
    assert code == 0, err


def test_pinned_keys_and_ca_file_come_from_flags_or_the_environment(tmp_path: Path) -> None:
    first, second = Identity.generate().public, Identity.generate().public
    from_env = ClientSettings.resolve(home=None, relays=None, oracle_key=None,
                                      log_level="warning", environ={
                                          "CONTINUUM_RELAY_KEYS": f"{first.text},{second.text}",
                                          "CONTINUUM_CA_FILE": "/nowhere/ca.pem"})
    assert from_env.relay_keys == {first, second}
    assert from_env.ca_file == Path("/nowhere/ca.pem")
    with pytest.raises(ValueError, match="/nowhere/ca.pem"):
        from_env.tls_context()
    flags = ClientSettings.resolve(home=None, relays=None, oracle_key=None, log_level="warning",
                                   relay_keys=[second.text], environ={
                                       "CONTINUUM_RELAY_KEYS": first.text})
    assert flags.relay_keys == {second} and flags.ca_file is None and flags.tls_context() is None
    unpinned = ClientSettings.resolve(home=None, relays=None, oracle_key=None,
                                      log_level="warning", environ={})
    assert unpinned.relay_keys is None
    with pytest.raises(InvalidFieldError):
        ClientSettings.resolve(home=None, relays=None, oracle_key=None, log_level="warning",
                               relay_keys=[first.text[:-1]], environ={})
