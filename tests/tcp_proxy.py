"""A TCP proxy on 127.0.0.1 that delays every chunk, for tests that need a slow network.

Real sockets both ways: the relay talks to Redis through it exactly as it
would through a slow link, so races that only show under latency (a store
call that takes 400 ms while an access list changes) are reproduced rather
than imagined.  `delay_s` may be changed while connections are open, and so
may `blocked`: while it is True nothing is forwarded either way (the bytes are
dropped, as by a firewall that drops packets; open connections stay open and
silent), which is how a relay loses its oracle without being told.
`counted` is how many client chunks contained `count` (e.g. b"GET /v1/…": one
HTTP request each), to show a client is not busy-looping.
"""

from __future__ import annotations

import asyncio
import contextlib


class DelayProxy:
    """Forward 127.0.0.1:<port> to `target_port`, each chunk `delay_s` late in each direction."""

    def __init__(self, target_port: int, delay_s: float = 0.0, count: bytes = b"") -> None:
        self.target_port = target_port
        self.delay_s = delay_s
        self.blocked = False
        self.count = count
        self.counted = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> DelayProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, client_reader: asyncio.StreamReader,
                     client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(
                "127.0.0.1", self.target_port)
        except OSError:
            client_writer.close()
            self._tasks.discard(task)
            return
        try:
            await asyncio.gather(self._pipe(client_reader, upstream_writer, counts=True),
                                 self._pipe(upstream_reader, client_writer))
        finally:
            for writer in (client_writer, upstream_writer):
                writer.close()
            self._tasks.discard(task)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    counts: bool = False) -> None:
        """Copy chunks in order; each leaves `delay_s` after it arrived (a queue, so the delay
        is latency, not a throughput cap)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def send() -> None:
            while True:
                due, chunk = await queue.get()
                if not chunk:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                await asyncio.sleep(max(0.0, due - loop.time()))
                writer.write(chunk)
                await writer.drain()

        sender = asyncio.create_task(send())
        try:
            while True:
                chunk = await reader.read(65536)
                if chunk and self.blocked:
                    continue  # dropped
                if counts and self.count and self.count in chunk:
                    self.counted += 1
                await queue.put((loop.time() + self.delay_s, chunk))
                if not chunk:
                    break
            await sender
        except (ConnectionError, OSError):
            pass
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):
                await sender
