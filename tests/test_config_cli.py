"""`continuum-client listen` keeps the oracle's configuration and runs `--config-hook` (SPEC §21):
a real relay process, the CLI as a user runs it, the oracle as a library device."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cli_support import CliProcess, new_home, run_cli
from relay_process import RelayProcess

from client import Device, PeerList
from proto import Identity, Kind, PublicKey, seal_envelope
from proto.config import ConfigPush, ConfigReport

pytestmark = pytest.mark.timeout(90)

# The hook: fails when told to, else writes what it got where the test looks and reports it.
HOOK = """
import json, os, sys
document = json.load(sys.stdin)
if document.get("fail"):
    sys.exit(3)
with open(os.environ["HOOK_LOG"], "a") as log:
    log.write(json.dumps({"version": os.environ["CONTINUUM_CONFIG_VERSION"],
                          "file": os.environ["CONTINUUM_CONFIG_FILE"],
                          "document": document}) + "\\n")
print(json.dumps({"applied": document["n"]}))
"""


@pytest.fixture
async def relay_process(tmp_path: Path) -> AsyncIterator[RelayProcess]:
    relay = await RelayProcess(log_path=tmp_path / "relay.log").start()
    yield relay
    relay.stop()


async def test_listen_stores_the_config_runs_the_hook_and_reports_its_output(
        tmp_path: Path, relay_process: RelayProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    device_key = PublicKey.from_text(new_home(home))
    oracle = Identity.generate()
    assert run_cli(home, "enroll", "--oracle", oracle.public.text).returncode == 0
    (tmp_path / "hook.py").write_text(HOOK)
    monkeypatch.setenv("HOOK_LOG", str(tmp_path / "hook.log"))
    hook = f"{sys.executable} {tmp_path / 'hook.py'}"
    listener = CliProcess(home, "--relay", relay_process.url, "listen", "--config-hook", hook)
    try:
        async with Device(oracle, [relay_process.url], PeerList([device_key])) as as_oracle:
            reports = as_oracle.config_reports()
            await as_oracle.wait_connected(10)

            async def push(version: int, document: dict) -> ConfigReport:
                envelope = seal_envelope(oracle, Kind.CONFIG, [device_key],
                                         ConfigPush(7, version, document).encode(), ttl_s=600,
                                         now_ms=time.time_ns() // 1_000_000)
                await as_oracle.send_envelope(envelope, timeout=10)
                async with asyncio.timeout(20):
                    sender, report = await anext(reports)
                assert sender == device_key
                return report

            assert await push(1, {"n": 1, "nested": {"k": [1, 2]}}) == \
                ConfigReport(7, 1, {"applied": 1})
            stored = json.loads((home / "config.json").read_text())
            assert stored["config"] == {"n": 1, "nested": {"k": [1, 2]}}
            assert (stored["epoch"], stored["version"]) == (7, 1)
            logged = [json.loads(line) for line in (tmp_path / "hook.log").read_text().splitlines()]
            assert logged == [{"version": "1", "file": str(home / "config.json"),
                               "document": {"n": 1, "nested": {"k": [1, 2]}}}]
            # A hook that fails applies nothing: the report names the version still in force.
            assert await push(2, {"n": 2, "fail": True}) == ConfigReport(7, 1, {"applied": 1})
            assert json.loads((home / "config.json").read_text())["version"] == 1
            assert await push(3, {"n": 3}) == ConfigReport(7, 3, {"applied": 3})
            await reports.aclose()
        await listener.wait_output(lambda out, err: "configuration 7.3 applied" in err)
        assert "configuration 7.2 not applied: the config hook exited with status 3" in \
            listener.stderr
    finally:
        listener.stop()
    # What listen left in the home: the newest configuration applied.
    assert json.loads((home / "config.json").read_text())["config"] == {"n": 3}


async def test_other_commands_leave_configuration_and_calls_for_listen_and_its_hook(
        tmp_path: Path, relay_process: RelayProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    """Any other command that connects (here `call`, from cron say) took the waiting CONFIG:
    config.json written and the oracle told it was in force, with no hook run; `listen
    --config-hook` then held that stamp and never ran its hook.  Now it waits in the mailbox
    for `listen` (calls likewise: `test_client_library.py`, `takes_commands`)."""
    home = tmp_path / "home"
    device_key = PublicKey.from_text(new_home(home))
    oracle, caller = Identity.generate(), Identity.generate()
    assert run_cli(home, "enroll", "--oracle", oracle.public.text).returncode == 0
    (tmp_path / "hook.py").write_text(HOOK)
    monkeypatch.setenv("HOOK_LOG", str(tmp_path / "hook.log"))
    async with Device(oracle, [relay_process.url], PeerList([device_key])) as as_oracle:
        reports = as_oracle.config_reports()
        await as_oracle.wait_connected(10)
        envelope = seal_envelope(oracle, Kind.CONFIG, [device_key],
                                 ConfigPush(7, 1, {"n": 1}).encode(), ttl_s=600,
                                 now_ms=time.time_ns() // 1_000_000)
        await as_oracle.send_envelope(envelope, timeout=10)
        done = run_cli(home, "--relay", relay_process.url, "call", caller.public.text, "ping",
                       "--timeout", "3")
        assert done.returncode != 0  # the caller is away: a timeout, not the point here
        assert not (home / "config.json").exists()
        hook = f"{sys.executable} {tmp_path / 'hook.py'}"
        listener = CliProcess(home, "--relay", relay_process.url, "listen", "--config-hook",
                              hook)
        try:
            async with asyncio.timeout(20):
                sender, report = await anext(reports)
            assert (sender, report) == (device_key, ConfigReport(7, 1, {"applied": 1}))
        finally:
            listener.stop()
    logged = [json.loads(line) for line in (tmp_path / "hook.log").read_text().splitlines()]
    assert [entry["document"] for entry in logged] == [{"n": 1}]
