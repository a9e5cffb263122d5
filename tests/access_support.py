"""What tests of the relay's access list ask of a relay from outside: its state, metrics,
log lines, and whether a key gets in; and of a relay in this process, its store's fetches."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from wire import RawDevice

from continuum.server import RelayServer
from proto import Identity
from proto.errors import ProtocolError


async def admission(url: str, identity: Identity) -> str:
    """"WELCOME" if the relay lets `identity` in, else the code of its refusal."""
    try:
        async with await RawDevice.connect(url, identity):
            return "WELCOME"
    except ProtocolError as exc:
        return exc.code.name


async def healthz(base_url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(f"{base_url}/healthz") as response:
        assert response.status == 200, response.status
        return await response.json()


async def metric(base_url: str, name: str, **labels: str) -> float | None:
    """One sample of the relay's /metrics, by sample name and labels; None if absent."""
    async with aiohttp.ClientSession() as http, http.get(f"{base_url}/metrics") as response:
        text = await response.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


def store_fetches(server: RelayServer) -> float:
    """How many mailbox fetches an in-process relay has made (its store's own timing count)."""
    assert server.relay is not None
    return server.relay.metrics.registry.get_sample_value(
        "continuum_store_operation_seconds_count", {"operation": "fetch"}) or 0.0


def log_events(path: Path, event: str) -> list[dict[str, Any]]:
    """The JSON log lines of one event a relay process wrote to `path`."""
    lines = path.read_text().splitlines() if path.exists() else []
    found = []
    for line in lines:
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("event") == event:
                found.append(record)
    return found
