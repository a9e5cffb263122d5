"""Presence over HTTP: relays' signed reports in, check-in intervals set, and the watch task.

`POST /v1/presence` takes one `PresenceReport` (SPEC §20) from a relay that
may fetch the access list (`relay_auth`), at most MAX_CONCURRENT_REPORTS at a
time: beyond that a relay hears 503 with `Retry-After` and backs off, so
relays returning after an oracle restart queue at their end, not in the
oracle's memory.  It answers `{"snapshot": bool}`: whether the oracle wants
every connection from this relay process next.

The watch (one task per oracle) runs every `silence_check_s`: it ends the
connections of relay processes whose lease passed, finds devices fallen
silent or heard from again, and hands the change to the webhook.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web

from proto.errors import DecodeError, OversizeError, ProtocolError
from proto.presence import PRESENCE_PATH, PresenceReport
from runtime.clock import now_ms
from runtime.tasks import cancel_and_wait

from .auth import ACTOR
from .context import ORACLE_KEY, OracleContext
from .errors import InvalidInput
from .metrics import METRICS_KEY
from .presence import ReportRefused
from .silence import parse_interval
from .validation import parse_key
from .webhook import SilenceWebhook

MAX_CONCURRENT_REPORTS = 4
_BUSY_RETRY_S = 5


@dataclass
class _Watch:
    """What the watch keeps across rounds: when the oracle started, and the webhook if any."""

    busy: asyncio.Semaphore
    started_ms: int = 0
    webhook: SilenceWebhook | None = None


_WATCH_KEY = web.AppKey("presence_watch", _Watch)


async def presence_report(request: web.Request) -> web.Response:
    oracle: OracleContext = request.app[ORACLE_KEY]
    counted = request.app[METRICS_KEY].presence_reports
    busy = request.app[_WATCH_KEY].busy
    if busy.locked():
        counted.labels("busy").inc()
        return web.json_response({"error": "busy applying other reports; retry"}, status=503,
                                 headers={"Retry-After": str(_BUSY_RETRY_S)})
    async with busy:
        body = await request.read()
        now = now_ms()
        try:
            # The key first: a stranger's report costs no decoding and no signature check.
            oracle.relay_auth.check_allowed(PresenceReport.claimed_relay(body))
            report = PresenceReport.verify(body, oracle.identity.public, now, oracle.chain.former)
            oracle.relay_auth.admit(report.relay, report.nonce, now)
        except ProtocolError as exc:
            status = 413 if isinstance(exc, OversizeError) else (
                400 if isinstance(exc, DecodeError) else 401)
            counted.labels("refused").inc()
            oracle.log.warning("presence_report_refused", status=status, error=exc.message)
            return web.json_response({"error": exc.message}, status=status)
        try:
            wants_snapshot = await oracle.presence.apply(report, now_ms())
        except ReportRefused as exc:
            counted.labels("refused").inc()
            oracle.log.warning("presence_report_refused", status=exc.status, error=str(exc))
            return web.json_response({"error": str(exc)}, status=exc.status)
    counted.labels("applied").inc()
    return web.json_response({"snapshot": wants_snapshot})


async def _interval(request: web.Request) -> int | None:
    try:
        body = await request.json()
    except ValueError:
        raise InvalidInput("request body must be JSON") from None
    if not isinstance(body, dict) or "interval_s" not in body:
        raise InvalidInput('request body must be {"interval_s": seconds or null}')
    return parse_interval(body["interval_s"])


async def set_device_checkin(request: web.Request) -> web.Response:
    """A device's own expected check-in interval (null: none; its groups' then apply)."""
    oracle = request.app[ORACLE_KEY]
    key = parse_key(request.match_info["key"])
    await oracle.checkins.set_device(key, await _interval(request), request[ACTOR])
    return web.json_response((await oracle.checkins.of_device(key)).to_json())


async def set_group_checkin(request: web.Request) -> web.Response:
    """A group's expected check-in interval, for each member without one of its own."""
    oracle = request.app[ORACLE_KEY]
    group_id = request.match_info["group_id"]
    await oracle.checkins.set_group(group_id, await _interval(request), request[ACTOR])
    return web.json_response({"interval_s": await oracle.checkins.of_group(group_id)})


async def watch_once(app: web.Application) -> None:
    """One round of the watch: leases, then silence (which reads what the leases ended)."""
    oracle, watch = app[ORACLE_KEY], app[_WATCH_KEY]
    now = now_ms()
    await oracle.presence.expire_leases(now, watch.started_ms)
    change = await oracle.silence.check(now)
    if change.silent or change.recovered:
        oracle.log.info("silence_changed", silent=len(change.silent),
                        recovered=len(change.recovered))
        if watch.webhook is not None:
            watch.webhook.notify(change)


async def _watch_forever(app: web.Application) -> None:
    oracle = app[ORACLE_KEY]
    while True:
        await asyncio.sleep(oracle.settings.silence_check_s)
        try:
            await watch_once(app)
        except Exception:  # a database hiccup must not end the watch for good
            oracle.log.exception("presence_watch_failed")


async def _background(app: web.Application) -> AsyncIterator[None]:
    """Start the watch (and the webhook) with the app; stop them with it."""
    oracle, watch = app[ORACLE_KEY], app[_WATCH_KEY]
    watch.started_ms = now_ms()
    webhook = None
    if oracle.settings.silence_webhook_url:
        posts = app[METRICS_KEY].webhook_posts
        webhook = SilenceWebhook(oracle.settings.silence_webhook_url, oracle.identity,
                                 oracle.settings.silence_webhook_attempts, oracle.log,
                                 lambda result: posts.labels(result).inc())
        watch.webhook = webhook
        await webhook.start()
    task = asyncio.create_task(_watch_forever(app), name="presence-watch")
    yield
    await cancel_and_wait(task)
    if webhook is not None:
        await webhook.stop()


def add_routes(app: web.Application) -> None:
    app[_WATCH_KEY] = _Watch(asyncio.Semaphore(MAX_CONCURRENT_REPORTS))
    app.router.add_post(PRESENCE_PATH, presence_report)
    app.router.add_put("/v1/devices/{key}/check-in", set_device_checkin)
    app.router.add_put("/v1/groups/{group_id}/check-in", set_group_checkin)
    app.cleanup_ctx.append(_background)
