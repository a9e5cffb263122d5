"""The README's tunnel to a device's web page, its three lines run as written in a shell.

Only what cannot be the same on a shared test machine changes: the ports (free ones
instead of 8080 and 9080), `$C` (this environment's `continuum-client`) and HOME (a
temporary directory). The keys and peer lists are set up first, as "A device" shows.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from aiohttp import web

from cli_support import CLIENT, peer_homes
from readme_support import readme_block, without_comments
from relay_process import RelayProcess, free_port


async def test_the_readme_tunnel_to_a_web_page_works_as_written(tmp_path: Path) -> None:
    lines = without_comments(readme_block("Streams and tunnels"))
    assert len(lines) == 3 and "expose 8080" in lines[0] and "curl" in lines[2]
    web_port, local_port = free_port(), free_port()

    async def page(_: web.Request) -> web.Response:
        return web.Response(text="<h1>pump 3: running</h1>", content_type="text/html")

    app = web.Application()
    app.router.add_get("/", page)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", web_port).start()
    relay = await RelayProcess().start()
    env = {**os.environ, "HOME": str(tmp_path), "C": CLIENT, "CONTINUUM_RELAYS": relay.url}
    peer_homes(tmp_path, ".device", ".me")  # ~/.device and ~/.me, each the other's peer
    shells: list[asyncio.subprocess.Process] = []

    async def shell(line: str) -> asyncio.subprocess.Process:
        line = line.replace("8080", str(web_port)).replace("9080", str(local_port))
        process = await asyncio.create_subprocess_exec(
            "bash", "-c", f"exec {line}" if not line.startswith("curl") else line, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        shells.append(process)
        return process

    async def first_line(process: asyncio.subprocess.Process, words: str) -> str:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
        assert words in line, line
        return line

    try:
        await first_line(await shell(lines[0]), "exposing tcp/")
        await first_line(await shell(lines[1]), "listening on 127.0.0.1:")
        curl = await shell(lines[2])
        out, err = await asyncio.wait_for(curl.communicate(), 30)
        assert curl.returncode == 0, err
        assert out.decode() == "<h1>pump 3: running</h1>"
    finally:
        for process in shells:
            if process.returncode is None:
                process.kill()
                await process.wait()
        relay.stop()
        await runner.cleanup()
