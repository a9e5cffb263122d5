"""Slow and surplus connections to the oracle, over real sockets on 127.0.0.1.

A request must be complete within request_timeout_s (headers from connect, body after the
headers) or its socket is closed, and sockets over max_connections are aborted at accept;
a handler that itself takes longer than the timeout is not cut off.
"""

from __future__ import annotations

import asyncio
import hashlib
import time

import aiohttp
from oracle_support import eventually, oracle_settings
from tally import ATTACKS_REJECTED, TALLY

from oracle import OracleServer

TIMEOUT_S = 0.5
# Slack for a loaded machine on top of each bound; the bounds tested are seconds, not hours.
SLACK_S = 2.0


async def _until_closed(reader: asyncio.StreamReader, limit_s: float) -> bytes:
    """Everything the server sends until it closes the socket (or resets it)."""
    received = b""
    try:
        async with asyncio.timeout(limit_s):
            while chunk := await reader.read(4096):
                received += chunk
    except ConnectionResetError:
        pass
    return received


async def _healthz(server: OracleServer) -> int:
    async with aiohttp.ClientSession() as http, http.get(server.url + "/healthz") as response:
        return response.status


async def test_half_sent_headers_are_closed_within_the_timeout(tmp_path) -> None:
    async with OracleServer(oracle_settings(tmp_path, request_timeout_s=TIMEOUT_S)) as server:
        half_line_reader, half_line = await asyncio.open_connection("127.0.0.1", server.port)
        half_line.write(b"GET /heal")
        trickle_reader, trickle = await asyncio.open_connection("127.0.0.1", server.port)
        trickle.write(b"GET /healthz HTTP/1.1\r\nHost: oracle\r\n")
        started = time.monotonic()

        async def keep_trickling() -> None:  # one header line every 100 ms, never the blank line
            for n in range(100):
                await asyncio.sleep(0.1)
                trickle.write(b"X-Slow-%d: 1\r\n" % n)

        trickler = asyncio.create_task(keep_trickling())
        try:
            assert await _until_closed(half_line_reader, TIMEOUT_S + SLACK_S) == b""
            assert await _until_closed(trickle_reader, TIMEOUT_S + SLACK_S) == b""
            assert time.monotonic() - started >= TIMEOUT_S * 0.9  # closed by the timer
            TALLY[ATTACKS_REJECTED] += 2
        finally:
            trickler.cancel()
            half_line.close()
            trickle.close()
        assert await _healthz(server) == 200


async def test_a_trickled_body_is_answered_408_and_closed(tmp_path) -> None:
    async with OracleServer(oracle_settings(tmp_path, request_timeout_s=TIMEOUT_S)) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"POST /login HTTP/1.1\r\nHost: oracle\r\n"
                     b"Content-Type: application/x-www-form-urlencoded\r\n"
                     b"Content-Length: 1000\r\n\r\nusername=admin")

        async def keep_trickling() -> None:
            for _ in range(100):
                await asyncio.sleep(0.1)
                writer.write(b"a")

        trickler = asyncio.create_task(keep_trickling())
        try:
            # Headers in, the body read within the timeout, unread body discarded within another.
            received = await _until_closed(reader, 2 * TIMEOUT_S + SLACK_S)
        finally:
            trickler.cancel()
            writer.close()
        assert received.startswith(b"HTTP/1.1 408 "), received[:80]
        TALLY[ATTACKS_REJECTED] += 1
        assert await _healthz(server) == 200


async def test_sockets_over_the_cap_are_aborted_at_accept(tmp_path) -> None:
    settings = oracle_settings(tmp_path, max_connections=3, request_timeout_s=30.0)
    async with OracleServer(settings) as server:
        cap = server.connections
        assert cap is not None
        idle = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(3)]
        await eventually(lambda: _true(cap.open == 3))
        surplus_reader, surplus = await asyncio.open_connection("127.0.0.1", server.port)
        surplus.write(b"GET /healthz HTTP/1.1\r\nHost: oracle\r\n\r\n")
        assert await _until_closed(surplus_reader, SLACK_S) == b""
        surplus.close()
        assert cap.refused >= 1 and cap.open == 3
        TALLY[ATTACKS_REJECTED] += 1
        for _, writer in idle:
            writer.close()
        await eventually(lambda: _true(cap.open == 0))
        assert await _healthz(server) == 200


async def test_a_handler_slower_than_the_timeout_still_answers(tmp_path, monkeypatch) -> None:
    real_scrypt = hashlib.scrypt

    def slow_scrypt(*args, **kwargs):  # type: ignore[no-untyped-def]
        time.sleep(3 * TIMEOUT_S)
        return real_scrypt(*args, **kwargs)

    async with OracleServer(oracle_settings(tmp_path, request_timeout_s=TIMEOUT_S)) as server:
        await server.create_admin("admin", "right password")
        monkeypatch.setattr(hashlib, "scrypt", slow_scrypt)
        async with aiohttp.ClientSession() as http, \
                http.post(server.url + "/login", allow_redirects=False,
                          data={"username": "admin", "password": "right password"}) as response:
            assert response.status == 303


async def _true(value: bool) -> bool:
    return value
