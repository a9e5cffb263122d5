"""The tunnel's TCP side (`client.tcp_side.TcpSide`) over real loopback sockets: pieces in
order, a half-close both ways, a reset told apart from an end, and a bound on what it holds
unread."""

from __future__ import annotations

import asyncio
import os
import socket
import struct

import pytest

from client.tcp_side import TcpSide

LIMIT = 256 * 1024


async def _pair() -> tuple[TcpSide, asyncio.StreamReader, asyncio.StreamWriter,
                           asyncio.Server]:
    """A TcpSide accepting one connection from a plain asyncio client."""
    accepted: asyncio.Future[TcpSide] = asyncio.get_running_loop().create_future()
    server = await asyncio.get_running_loop().create_server(
        lambda: TcpSide(LIMIT, on_connected=accepted.set_result), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    return await asyncio.wait_for(accepted, 5), reader, writer, server


async def _read_all(side: TcpSide) -> bytes:
    received = bytearray()
    while piece := await asyncio.wait_for(side.read(), 5):
        received += piece
    return bytes(received)


async def test_pieces_arrive_in_order_and_a_half_close_works_both_ways() -> None:
    side, reader, writer, server = await _pair()
    payload = os.urandom(3 * 1024 * 1024 + 7)
    writer.write(payload)
    writer.write_eof()  # the client's FIN: the side reads to the end, and may still answer
    assert await _read_all(side) == payload
    assert await side.read() == b""  # stays at the end
    side.write(b"answer after the client's FIN")
    await side.drain()
    side.write_eof()
    assert await asyncio.wait_for(reader.read(), 5) == b"answer after the client's FIN"
    writer.close()
    await asyncio.wait_for(side.close(), 5)
    server.close()


async def test_a_reset_is_an_error_never_the_end_of_the_data() -> None:
    side, _reader, writer, server = await _pair()
    writer.write(b"partial")
    await writer.drain()
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()  # RST
    with pytest.raises(ConnectionResetError):  # never read as a clean end of data
        while await asyncio.wait_for(side.read(), 5):
            pass
    server.close()


async def test_reset_sends_the_peer_a_reset_and_drain_fails_once_the_socket_is_gone() -> None:
    side, reader, _writer, server = await _pair()
    side.reset()
    with pytest.raises(ConnectionResetError):  # not a clean close
        await asyncio.wait_for(reader.read(), 5)
    await asyncio.wait_for(side.closed, 5)
    with pytest.raises(ConnectionResetError):
        await side.drain()
    server.close()


async def test_what_it_holds_unread_is_bounded_and_reading_resumes() -> None:
    """A client that writes far more than the side takes: past `limit` the side stops
    reading its socket (the kernel's buffers fill and the client waits), and reading again
    lets everything through, intact."""
    side, _reader, writer, server = await _pair()
    payload = os.urandom(24 * 1024 * 1024)
    writing = asyncio.create_task(_write(writer, payload))
    await asyncio.sleep(1.0)
    assert not writing.done()  # the client is held back
    assert side.held <= LIMIT + 256 * 1024  # the limit plus at most one piece (asyncio's read)
    assert await _read_all(side) == payload
    await writing
    server.close()


async def _write(writer: asyncio.StreamWriter, payload: bytes) -> None:
    writer.write(payload)
    await writer.drain()
    writer.write_eof()
