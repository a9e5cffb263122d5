"""Tunnels as a user runs them: `continuum-client expose` and `tunnel` as real processes,
real relay processes (one with the embedded store, or two replicas on Redis), and real
TCP services (a web server, a streaming echo, OpenSSH's sshd)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from cli_support import CliProcess, peer_homes, run_cli
from relay_process import RelayProcess
from sshd_server import PrivateSshd
from web_server import serving


@dataclass
class Setting:
    device_relay: str
    user_relay: str


@pytest.fixture(params=["embedded", "redis"])
async def relays(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Setting]:
    """The device and the user on one relay, or each on its own replica of one Redis."""
    if request.param == "embedded":
        relay = await RelayProcess(log_path=tmp_path / "relay.log").start()
        try:
            yield Setting(relay.url, relay.url)
        finally:
            relay.stop()
        return
    url = request.getfixturevalue("redis_url")
    first = await RelayProcess("--store", url, log_path=tmp_path / "relay1.log").start()
    second = await RelayProcess("--store", url, log_path=tmp_path / "relay2.log").start()
    try:
        yield Setting(first.url, second.url)
    finally:
        first.stop()
        second.stop()


@dataclass
class Tunnel:
    device_key: str
    user_key: str
    expose: CliProcess
    tunnel: CliProcess
    port: int

    def stop(self) -> None:
        self.tunnel.stop()
        self.expose.stop()


async def start_tunnel(tmp_path: Path, relays: Setting, service_port: int, *,
                       expose_args: tuple[str, ...] = (), target_port: int | None = None,
                       homes: tuple = ()) -> Tunnel:
    """The README's three commands: expose on the device, tunnel on the user's side."""
    (device, device_key), (user, user_key) = homes or peer_homes(tmp_path, "device", "user")
    expose = CliProcess(device, "--relay", relays.device_relay, "expose", str(service_port),
                        *expose_args)
    await expose.wait_output(lambda out, err: "exposing" in out)
    tunnel = CliProcess(user, "--relay", relays.user_relay, "tunnel",
                        f"{device_key}:{target_port or service_port}", "--listen", "127.0.0.1:0")
    await tunnel.wait_output(lambda out, err: "listening on" in out)
    port = int(re.search(r"listening on 127\.0\.0\.1:(\d+)", tunnel.stdout).group(1))
    return Tunnel(device_key, user_key, expose, tunnel, port)


@pytest.fixture
async def web_page() -> AsyncIterator[tuple[int, bytes]]:
    """A web server on a free port: `/` a page, `/big` 4 MiB of random bytes."""
    big = os.urandom(4 * 1024 * 1024)

    async def page(_: web.Request) -> web.Response:
        return web.Response(text="<h1>device status: ok</h1>", content_type="text/html")

    async def download(_: web.Request) -> web.Response:
        return web.Response(body=big)

    app = web.Application()
    app.router.add_get("/", page)
    app.router.add_get("/big", download)
    async with serving(app) as port:
        yield port, big


@pytest.fixture
async def echo_server() -> AsyncIterator[int]:
    """A streaming echo: sends back everything, closes its side at the client's EOF."""
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def test_a_devices_web_page_through_a_tunnel(tmp_path: Path, relays: Setting,
                                                   web_page: tuple[int, bytes]) -> None:
    port, big = web_page
    tunnel = await start_tunnel(tmp_path, relays, port)
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{tunnel.port}/") as response:
                assert response.status == 200
                assert await response.text() == "<h1>device status: ok</h1>"
            async with http.get(f"http://127.0.0.1:{tunnel.port}/big") as response:
                body = await response.read()
        assert hashlib.sha256(body).digest() == hashlib.sha256(big).digest()
    finally:
        tunnel.stop()


async def test_a_streaming_echo_with_half_close(tmp_path: Path, relays: Setting,
                                                echo_server: int) -> None:
    """The client sends 2 MiB and closes its sending side; the echo answers all of it and
    then closes: EOF crossed the tunnel both ways, in order, after all the data."""
    tunnel = await start_tunnel(tmp_path, relays, echo_server)
    try:
        payload = os.urandom(2 * 1024 * 1024)
        reader, writer = await asyncio.open_connection("127.0.0.1", tunnel.port)

        async def send() -> None:
            for offset in range(0, len(payload), 50_000):
                writer.write(payload[offset:offset + 50_000])
                await writer.drain()
            writer.write_eof()

        sender = asyncio.create_task(send())
        echoed = await asyncio.wait_for(reader.read(-1), 60)  # until the echo's EOF
        await sender
        writer.close()
        assert echoed == payload
    finally:
        tunnel.stop()


async def connection_is_reset(port: int) -> bool:
    """Connect to the tunnel's local port and see it reset (not closed as if all was said).

    A tunnel that knows the stream is refused resets at once, which on a busy machine can
    be before our connect() has even returned: that is a reset too."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionResetError:
        return True
    writer.write(b"GET / HTTP/1.0\r\n\r\n")
    try:
        await asyncio.wait_for(reader.read(), 30)
    except ConnectionResetError:
        return True
    finally:
        writer.close()
    return False


async def test_only_the_ports_exposed_and_only_to_peers_allowed(
        tmp_path: Path, relays: Setting, web_page: tuple[int, bytes]) -> None:
    port, _ = web_page
    homes = peer_homes(tmp_path, "device", "user", "other")
    (device, device_key), (user, user_key), (other, other_key) = homes
    # Exposed to `other` only: the user, a peer, is refused.
    tunnel = await start_tunnel(tmp_path, relays, port, homes=homes[:2],
                                expose_args=("--allow", other_key))
    try:
        assert await connection_is_reset(tunnel.port)
        await tunnel.expose.wait_output(lambda out, err: "is not allowed to reach" in err)
        await tunnel.tunnel.wait_output(lambda out, err: "STREAM_REFUSED" in err)
    finally:
        tunnel.stop()
    # A port the device does not expose.
    tunnel = await start_tunnel(tmp_path, relays, port, homes=homes[:2],
                                target_port=port + 1 if port < 65535 else port - 1)
    try:
        assert await connection_is_reset(tunnel.port)
        await tunnel.expose.wait_output(lambda out, err: "does not expose" in err)
    finally:
        tunnel.stop()
    # A stranger: the device does not take streams from keys that are not its peers.
    stranger = tmp_path / "stranger"
    stranger_key = run_cli(stranger, "keygen").stdout.strip()
    assert run_cli(stranger, "peers", "add", device_key).returncode == 0
    expose = CliProcess(device, "--relay", relays.device_relay, "expose", str(port))
    await expose.wait_output(lambda out, err: "exposing" in out)
    tunnel_process = CliProcess(stranger, "--relay", relays.user_relay, "tunnel",
                                f"{device_key}:{port}", "--listen", "127.0.0.1:0")
    try:
        await tunnel_process.wait_output(lambda out, err: "listening on" in out)
        local = int(re.search(r":(\d+) ->", tunnel_process.stdout).group(1))
        assert await connection_is_reset(local)
        await tunnel_process.wait_output(lambda out, err: "not a peer" in err)
        assert stranger_key not in expose.stdout
    finally:
        tunnel_process.stop()
        expose.stop()


async def test_a_service_that_refuses_the_connection_refuses_the_stream(
        tmp_path: Path, relays: Setting) -> None:
    from relay_process import free_port
    closed = free_port()  # nothing listens there
    tunnel = await start_tunnel(tmp_path, relays, closed)
    try:
        assert await connection_is_reset(tunnel.port)
        await tunnel.expose.wait_output(lambda out, err: "refused the connection" in err)
    finally:
        tunnel.stop()


async def test_a_device_killed_mid_transfer_resets_the_users_connection(
        tmp_path: Path, relays: Setting, echo_server: int) -> None:
    """SIGKILL the exposing device while data flows: the user's TCP connection is reset,
    never ended as if the data were complete."""
    tunnel = await start_tunnel(tmp_path, relays, echo_server)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", tunnel.port)
        writer.write(b"x" * 100_000)
        await writer.drain()
        assert len(await reader.readexactly(100_000)) == 100_000
        tunnel.expose.kill()
        with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)) as caught:
            while True:
                writer.write(b"y" * 10_000)
                await writer.drain()
                await asyncio.wait_for(reader.readexactly(10_000), 30)
        if isinstance(caught.value, asyncio.IncompleteReadError):
            pytest.fail("the connection ended cleanly: a cut looked like an end")
        writer.close()
        await tunnel.tunnel.wait_output(lambda out, err: "listening on" in out)
    finally:
        tunnel.stop()


async def test_ssh_through_a_tunnel_to_a_private_sshd(tmp_path: Path, relays: Setting) -> None:
    """`ssh -p LOCAL 127.0.0.1` reaches the device's sshd (Debian's OpenSSH, started on a
    free port with a throwaway host key) through the relays."""
    with PrivateSshd() as sshd:
        tunnel = await start_tunnel(tmp_path, relays, sshd.port)
        try:
            payload = os.urandom(1024 * 1024)
            process = await asyncio.create_subprocess_exec(
                *sshd.ssh_command(tunnel.port, "echo connected; sha256sum"),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(process.communicate(payload), 60)
            assert process.returncode == 0, err.decode()
            lines = out.decode().splitlines()
            assert lines[0] == "connected"
            assert lines[1].split()[0] == hashlib.sha256(payload).hexdigest()
        finally:
            tunnel.stop()


def test_usage_errors_are_one_line_and_exit_2(tmp_path: Path) -> None:
    """Bad targets, ports and listen addresses are refused before anything runs; a local
    port already taken is refused when the tunnel cannot listen."""
    from relay_process import free_port
    home = tmp_path / "me"
    key = run_cli(home, "keygen").stdout.strip()
    dead = f"ws://127.0.0.1:{free_port()}/v1/connect"  # nothing listens: no relay needed
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    busy = taken.getsockname()[1]
    try:
        for args, words in [
            (("tunnel", "nokey"), "is not PEER:PORT"),
            (("tunnel", f"{key}:http"), "is not PEER:PORT"),
            (("tunnel", f"{key}:70000"), "is not a TCP port"),
            (("tunnel", "cpk_bad:22"), "INVALID_FIELD"),
            (("tunnel", f"{key}:22", "--listen", "nowhere"), "is not HOST:PORT"),
            (("tunnel", f"{key}:22", "--listen", f"127.0.0.1:{busy}"), "cannot listen"),
            (("tunnel", f"{key}:22", "--window", "10"), "--window"),
            (("expose", "0"), "is not a TCP port"),
            (("expose", "22", "--allow", "cpk_bad"), "INVALID_FIELD"),
        ]:
            result = run_cli(home, "--relay", dead, *args, timeout=30)
            assert result.returncode == 2, (args, result.stderr)
            assert words in result.stderr and len(result.stderr.splitlines()) <= 2, \
                (args, result.stderr)
    finally:
        taken.close()


async def test_a_burst_of_connections_beyond_the_bounds_on_opens_all_get_through(
        tmp_path: Path, echo_server: int) -> None:
    """20 connections at once through a relay that lets a device wait for 2 answers at a
    time: the opens it refuses (STREAM_LIMIT) are retried, so each connection is carried."""
    relay = await RelayProcess("--max-pending-streams-per-device", "2",
                               log_path=tmp_path / "relay.log").start()
    try:
        tunnel = await start_tunnel(tmp_path, Setting(relay.url, relay.url), echo_server)
        try:
            async def one(i: int) -> bytes:
                reader, writer = await asyncio.open_connection("127.0.0.1", tunnel.port)
                writer.write(f"connection {i}".encode())
                writer.write_eof()
                data = await asyncio.wait_for(reader.read(), 60)
                writer.close()
                return data

            answers = await asyncio.gather(*(one(i) for i in range(20)))
            assert answers == [f"connection {i}".encode() for i in range(20)]
        finally:
            tunnel.stop()
    finally:
        relay.stop()
