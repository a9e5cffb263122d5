"""An oracle subprocess for benchmarks: its database (SQLite file or a fresh PostgreSQL
database), its command line (this checkout's code or another's), and waiting until it serves."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from common import free_port, stop_process_group

POSTGRES_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
CHECKOUT = Path(__file__).resolve().parent.parent
GROUP_SIZE = 10  # devices per peer group in a filled fleet


@contextlib.contextmanager
def database(tmp: str, postgres: bool) -> Iterator[str]:
    """The oracle's database URL: a SQLite file in `tmp`, or a fresh PostgreSQL database
    that is dropped afterwards."""
    if not postgres:
        yield f"sqlite:///{tmp}/oracle.db"
        return
    import asyncpg
    name = "bench_" + uuid.uuid4().hex[:12]

    async def admin(sql: str) -> None:
        connection = await asyncpg.connect(POSTGRES_ADMIN_DSN)
        try:
            await connection.execute(sql)
        finally:
            await connection.close()
    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    try:
        yield POSTGRES_ADMIN_DSN.rsplit("/", 1)[0] + "/" + name
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def oracle_command(baseline: str | None) -> tuple[list[str], dict[str, str]]:
    """`python -m oracle` of this checkout, or of the `baseline` checkout, and its environment.

    `-P` keeps the working directory off sys.path: `-m` would put it first, and a run from
    this checkout's top directory would then measure this code whatever PYTHONPATH says.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(baseline or CHECKOUT).resolve())
    return [sys.executable, "-P", "-m", "oracle"], env


@dataclass(frozen=True)
class Oracle:
    """How to run one benchmark oracle: its command line, environment and URL."""

    command: list[str]
    env: dict[str, str]
    base: str

    def cli(self, *args: str) -> str:
        """Run a `continuum-oracle` subcommand (create-admin, show-key, …); its stdout."""
        return subprocess.run([*self.command, *args], env=self.env, check=True,
                              capture_output=True, text=True, timeout=60).stdout.strip()

    def write_token(self, name: str) -> str:
        """A `write` API token (devices and groups), printed once by `create-token`.

        A baseline from before token scopes refuses `--scope` (its tokens were all
        admins): it is asked without one.
        """
        try:
            printed = self.cli("create-token", name, "--scope", "write")
        except subprocess.CalledProcessError:
            printed = self.cli("create-token", name)
        return printed.rsplit(" ", 1)[-1]


def configure(tmp: str, database: str, baseline: str | None = None,
              **settings: str) -> Oracle:
    """An oracle on a free port of 127.0.0.1 over `database`, its key in `tmp`; `settings`
    are more CONTINUUM_ORACLE_<NAME> variables (relay_keys=…)."""
    port = free_port()
    command, env = oracle_command(baseline)
    env.update({"CONTINUUM_ORACLE_DATABASE": database,
                "CONTINUUM_ORACLE_IDENTITY_FILE": f"{tmp}/oracle.key",
                "CONTINUUM_ORACLE_HOST": "127.0.0.1", "CONTINUUM_ORACLE_PORT": str(port),
                "CONTINUUM_ORACLE_LOG_LEVEL": "error",
                **{f"CONTINUUM_ORACLE_{name.upper()}": value for name, value in settings.items()}})
    return Oracle(command, env, f"http://127.0.0.1:{port}")


@contextlib.contextmanager
def serving(oracle: Oracle, log_path: str) -> Iterator[subprocess.Popen[bytes]]:
    """`serve` in a process group of its own, healthy before this yields, stopped after."""
    with open(log_path, "wb") as log:
        process = subprocess.Popen([*oracle.command, "serve"], env=oracle.env, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(oracle.base, process)
        yield process
    finally:
        stop_process_group(process, 15, grace_s=10)


def wait_healthy(base: str, oracle: subprocess.Popen[bytes], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if oracle.poll() is not None:
            raise RuntimeError(f"oracle exited with {oracle.returncode}")
        try:
            with urllib.request.urlopen(f"{base}/healthz", timeout=1):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.05)
    raise TimeoutError(f"oracle not healthy within {timeout_s}s")


async def fill_presence(database: str, keys: list[str]) -> float:
    """Every other device online on one relay process with a few messages, the others
    offline since enrolment; every group expected to check in hourly and enrolment moved two
    hours back, so the offline half is silent.  Returns the seconds the silence watch's
    first pass over this fleet took (it finds and records the silent devices)."""
    from oracle.db import open_database
    from oracle.silence import SilenceWatch
    from runtime.clock import now_ms

    db = await open_database(database)
    now = now_ms()
    instance, relay = "00" * 16, "cpk_bench_relay"
    try:
        async with db.transaction() as conn:
            await conn.execute("UPDATE devices SET enrolled_at_ms = enrolled_at_ms - 7200000")
            await conn.executemany(
                "INSERT INTO group_checkin (group_id, interval_s) VALUES ($1, 3600)",
                [(f"g{n:06d}",) for n in range((len(keys) + GROUP_SIZE - 1) // GROUP_SIZE)])
            online = [(key, n % 4) for n, key in enumerate(keys) if n % 2 == 0]
            await conn.executemany(
                "INSERT INTO presence_history (device_key, instance, connected_at_ms, relay_key,"
                " sent, received, refused, confirmed_sequence) VALUES ($1, $2, $3, $4, $5, $5,"
                " 0, 1)", [(key, instance, now - 60_000, relay, sent) for key, sent in online])
            await conn.executemany(
                "INSERT INTO device_presence (device_key, online, relay_key, instance,"
                " connected_at_ms, last_seen_ms, sent, received, refused)"
                " VALUES ($1, 1, $2, $3, $4, $4, $5, $5, 0)",
                [(key, relay, instance, now - 60_000, sent) for key, sent in online])
        if database.startswith("postgresql"):
            await db.execute("ANALYZE")
        started = time.perf_counter()
        await SilenceWatch(db).check(now_ms())
        return time.perf_counter() - started
    finally:
        await db.close()


async def fill_fleet(database: str, devices: int) -> list[str]:
    """`devices` devices with tags, in groups of GROUP_SIZE, inserted directly (the API would
    take minutes); returns their keys in name order."""
    from oracle.db import open_database  # this checkout's, once the caller put it on the path
    from proto import Identity
    from runtime.clock import now_ms

    db = await open_database(database)
    keys = [Identity.generate().public.text for _ in range(devices)]
    now = now_ms()
    try:
        async with db.transaction() as conn:
            for number, key in enumerate(keys):
                tags = f"site-{number % 10}" + (" camera" if number % 100 == 0 else "")
                await conn.execute("INSERT INTO devices (key, name, tags, enrolled_at_ms)"
                                   " VALUES ($1, $2, $3, $4)", key, f"device-{number:06d}",
                                   " ".join(sorted(tags.split())), now + number)
                group = f"g{number // GROUP_SIZE:06d}"
                if number % GROUP_SIZE == 0:
                    await conn.execute("INSERT INTO peer_groups (id, name, created_at_ms)"
                                       " VALUES ($1, $2, $3)", group, f"group-{group}", now)
                await conn.execute("INSERT INTO memberships (group_id, device_key)"
                                   " VALUES ($1, $2)", group, key)
        if database.startswith("postgresql"):
            # Autovacuum would gather statistics after this bulk insert within a minute;
            # without them the planner guesses, and the first minute is not the steady state.
            await db.execute("ANALYZE")
    finally:
        await db.close()
    return keys
