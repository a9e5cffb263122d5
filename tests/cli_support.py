"""`continuum-client` as a user runs it: separate processes, real files, killed like a device."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from child_process import ChildProcess

CLIENT = str(Path(sys.executable).parent / "continuum-client")


def run_cli(home: Path, *args: str, env: dict[str, str] | None = None, input: str | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLIENT, "--home", str(home), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, input=input)


async def run_cli_async(*args: str, env: dict[str, str] | None = None, input: bytes | None = None,
                        timeout: float = 60) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        CLIENT, *args, stdin=asyncio.subprocess.PIPE if input is not None else None,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
    try:
        async with asyncio.timeout(timeout):
            stdout, stderr = await process.communicate(input)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


def new_home(path: Path) -> str:
    result = run_cli(path, "keygen")
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def peer_homes(tmp_path: Path, *names: str) -> tuple[tuple[Path, str], ...]:
    """Homes that all have each other as peers: ((home, public key text), …)."""
    homes = tuple((tmp_path / name, new_home(tmp_path / name)) for name in names)
    for home, _key in homes:
        others = [key for other, key in homes if other != home]
        if others:
            assert run_cli(home, "peers", "add", *others).returncode == 0
    return homes


class CliProcess(ChildProcess):
    """A `continuum-client` run in the background, output to files, stopped by its PID."""

    def __init__(self, home: Path, *args: str, stdin: int | None = None) -> None:
        self.out_path = home.parent / f"{home.name}-{id(self)}.out"
        self.err_path = home.parent / f"{home.name}-{id(self)}.err"
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.process = subprocess.Popen([CLIENT, "--home", str(home), *args], stdin=stdin,
                                            stdout=out, stderr=err)

    @property
    def stdout(self) -> str:
        return self.out_path.read_text()

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()

    async def wait_output(self, condition: Callable[[str, str], bool],
                          timeout: float = 30.0) -> None:
        """Until `condition(stdout, stderr)` holds; fails if the process exits first."""
        async with asyncio.timeout(timeout):
            while not condition(self.stdout, self.stderr):
                assert self.process is not None
                if self.process.poll() is not None and not condition(self.stdout, self.stderr):
                    raise AssertionError(f"exited {self.process.returncode}: {self.stderr}")
                await asyncio.sleep(0.02)


def outbox_rows(home: Path) -> list[bytes]:
    """Envelope bytes in the home's outbox, read as another process would (the file is WAL).

    Not read-only: after a SIGKILL mid-write the first reader must rebuild the WAL index,
    which a read-only connection cannot (it fails, and an empty answer here once hid
    durable messages from the test that counts them)."""
    path = home / "state.db"
    if not path.exists():
        return []
    db = sqlite3.connect(path)
    try:
        return [raw for (raw,) in db.execute("SELECT envelope FROM outbox ORDER BY seq")]
    except sqlite3.OperationalError as exc:
        if "no such table" not in str(exc):
            raise
        return []  # the schema is not written yet
    finally:
        db.close()


def sent_listing(home: Path) -> dict[str, dict[str, object]]:
    """`outbox --json`, by msg_id."""
    result = run_cli(home, "outbox", "--json")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    return {row["msg_id"]: row for row in rows}
