"""POST each change of the silent set to an operator's URL, without ever holding the oracle up.

`notify` only queues (bounded: past `max_batches` the oldest batch is
dropped and counted); one task posts the batches in order, each with a
timeout, retrying a failure (a refused connection, a timeout, any status but
2xx; a redirect is a failure, never followed) with doubling waits, `attempts`
tries in all, then giving it up and counting it.  The body is JSON:

    {"event": "silent" | "recovered", "at_ms": …, "oracle_key": "cpk_…",
     "devices": [{"key", "name", "silent_since_ms", "last_seen_ms", "interval_s"}, …]}

at most `MAX_DEVICES_PER_POST` devices per POST (a fleet falling silent at
once is several POSTs).

Each POST is signed by the oracle's key, so a receiver acts only on what the
oracle said (not on anyone who learned the URL):

    Continuum-Signature: ed25519=<base64url of Ed25519 over WEBHOOK_DOMAIN ‖ body>

`verify_webhook` checks it; `at_ms` lets a receiver refuse a replayed POST.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from collections import deque
from collections.abc import Callable
from typing import Any

import aiohttp
import structlog

from proto import Identity, PublicKey
from proto.errors import SignatureError
from runtime.clock import now_ms
from runtime.tasks import cancel_and_wait

from .silence import SilenceChange, SilentDevice

MAX_DEVICES_PER_POST = 1000
SIGNATURE_HEADER = "Continuum-Signature"
# What the oracle's key signs for a webhook, and nothing else it signs starts so.
WEBHOOK_DOMAIN = b"continuum/v1/silence-webhook\x00"
_SCHEME = "ed25519="
_TIMEOUT_S = 10.0
_FIRST_RETRY_S, _MAX_RETRY_S = 1.0, 60.0


def sign_webhook(identity: Identity, body: bytes) -> str:
    """The signature header's value for `body`, by the oracle's key."""
    signature = identity.sign(WEBHOOK_DOMAIN + body)
    return _SCHEME + base64.urlsafe_b64encode(signature).decode().rstrip("=")


def verify_webhook(oracle_key: PublicKey, body: bytes, header: str | None) -> None:
    """Raise SignatureError unless `header` is the oracle key's signature of `body`."""
    if header is None or not header.startswith(_SCHEME):
        raise SignatureError(f"no {SIGNATURE_HEADER}: {_SCHEME}… header")
    text = header[len(_SCHEME):]
    try:
        signature = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise SignatureError(f"{SIGNATURE_HEADER} is not base64url") from None
    oracle_key.verify(WEBHOOK_DOMAIN + body, signature)


class SilenceWebhook:
    def __init__(self, url: str, identity: Identity, attempts: int,
                 log: structlog.typing.FilteringBoundLogger,
                 counted: Callable[[str], None] = lambda result: None,
                 max_batches: int = 100, first_retry_s: float = _FIRST_RETRY_S) -> None:
        self._url = url
        self._identity = identity
        self._attempts = attempts
        self._log = log
        self._counted = counted  # "delivered", "failed" (gave up) or "dropped" (queue full)
        self._first_retry_s = first_retry_s
        self._batches: deque[dict[str, Any]] = deque()
        self._max_batches = max_batches
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def notify(self, change: SilenceChange) -> None:
        """Queue the change's POSTs; returns at once."""
        for event, devices in (("silent", change.silent), ("recovered", change.recovered)):
            for start in range(0, len(devices), MAX_DEVICES_PER_POST):
                self._queue(event, devices[start:start + MAX_DEVICES_PER_POST])

    def _queue(self, event: str, devices: list[SilentDevice]) -> None:
        if len(self._batches) >= self._max_batches:
            self._batches.popleft()
            self._counted("dropped")
            self._log.warning("silence_webhook_queue_full", dropped=1, limit=self._max_batches)
        self._batches.append({"event": event, "at_ms": now_ms(),
                              "oracle_key": self._identity.public.text,
                              "devices": [d.to_json() for d in devices]})
        self._ready.set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="silence-webhook")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def _run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while True:
                await self._ready.wait()
                if not self._batches:
                    self._ready.clear()
                    continue
                try:
                    await self._deliver(http, self._batches.popleft())
                except Exception:  # a bug here must not end every later notice
                    self._counted("failed")
                    self._log.exception("silence_webhook_crashed")

    async def _deliver(self, http: aiohttp.ClientSession, batch: dict[str, Any]) -> None:
        wait_s = self._first_retry_s
        body = json.dumps(batch, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json",
                   SIGNATURE_HEADER: sign_webhook(self._identity, body)}
        for attempt in range(1, self._attempts + 1):
            try:
                # Never followed: a redirect would carry the signed body and its headers to
                # wherever the answer points (an internal address the oracle can reach).
                async with http.post(self._url, data=body, headers=headers,
                                     allow_redirects=False) as response:
                    if 200 <= response.status < 300:
                        self._counted("delivered")
                        return
                    problem = f"HTTP {response.status}" + (
                        " (a redirect: not followed)" if 300 <= response.status < 400 else "")
            except (aiohttp.ClientError, TimeoutError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
            self._log.warning("silence_webhook_failed", attempt=attempt, of=self._attempts,
                              error=problem, devices=len(batch["devices"]))
            if attempt < self._attempts:
                await asyncio.sleep(wait_s)
                wait_s = min(_MAX_RETRY_S, 2 * wait_s)
        self._counted("failed")
        self._log.error("silence_webhook_gave_up", change=batch["event"],
                        devices=len(batch["devices"]), attempts=self._attempts)
