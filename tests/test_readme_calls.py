"""The README's calls, its three lines run as written in a shell: only `$C` (this
environment's `continuum-client`) and HOME (a temporary directory) change. The keys and peer
lists are set up first, as "A device" shows."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from cli_support import CLIENT, peer_homes
from readme_support import readme_block, without_comments
from relay_process import RelayProcess


async def test_the_readme_calls_work_as_written(tmp_path: Path) -> None:
    lines = without_comments(readme_block("Calls"))
    assert len(lines) == 3 and "--handle" in lines[0] and " call " in lines[1]
    relay = await RelayProcess(log_path=tmp_path / "relay.log").start()
    env = {**os.environ, "HOME": str(tmp_path), "C": CLIENT, "CONTINUUM_RELAYS": relay.url}
    peer_homes(tmp_path, ".device", ".me")  # ~/.device and ~/.me, each the other's peer
    listener = await asyncio.create_subprocess_exec(
        "bash", "-c", f"exec {lines[0]}", env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    try:
        assert listener.stderr is not None
        async with asyncio.timeout(30):
            while b"listening as" not in await listener.stderr.readline():
                assert listener.returncode is None, "listen exited"
        outputs = []
        for line in lines[1:]:
            shell = await asyncio.create_subprocess_exec(
                "bash", "-c", line, env=env, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE)
            async with asyncio.timeout(60):
                out, err = await shell.communicate()
            assert shell.returncode == 0, err.decode()
            outputs.append(out.decode())
        assert "load average" in outputs[0]
        assert outputs[1] == '{"led": "on"}\n'
    finally:
        if listener.returncode is None:
            listener.kill()
            await listener.wait()
        relay.stop()
