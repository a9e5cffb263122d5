"""The oracle's Prometheus metrics at /metrics: requests by route and status, devices by
state, online and silent, the push queue, presence reports and the silence webhook, and
how many relays are long-polling the access list right now.

Each application gets its own registry (tests run several oracles in one
process).  Requests are labelled by route template (`/v1/devices/{key}`),
never by raw path, so hostile URLs cannot mint label values; device counts
are read from the database when scraped, which is one pass over the devices
table, as cheap as the dashboard's summary.  /metrics needs an admin's
session or API token like every other non-public route: scrapers send an
API token as a bearer token.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from proto.access import ACCESS_LIST_PATH

from .context import ORACLE_KEY

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
METRICS_PATH = "/metrics"
UNMATCHED = "unmatched"


class OracleMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("continuum_oracle_http_requests", "HTTP requests answered",
                                ["route", "method", "status"], registry=self.registry)
        self.duration = Histogram("continuum_oracle_http_request_duration_seconds",
                                  "Time from request to response, by route", ["route"],
                                  registry=self.registry)
        self.devices = Gauge("continuum_oracle_devices", "Enrolled devices by state",
                             ["state"], registry=self.registry)
        self.pollers = Gauge("continuum_oracle_access_list_pollers",
                             "Relays long-polling the access list now", registry=self.registry)
        self.push_queue = Gauge("continuum_oracle_push_queue",
                                "Peer-list versions issued to active devices and not yet"
                                " accepted by a relay", registry=self.registry)
        self.online = Gauge("continuum_oracle_devices_online",
                            "Active devices a relay reports connected now", registry=self.registry)
        self.silent = Gauge("continuum_oracle_devices_silent",
                            "Active devices offline for longer than their expected check-in"
                            " interval", registry=self.registry)
        self.relay_processes = Gauge("continuum_oracle_relay_processes",
                                     "Relay processes whose presence lease is current",
                                     registry=self.registry)
        self.presence_reports = Counter("continuum_oracle_presence_reports",
                                        "Presence reports from relays, by outcome (applied,"
                                        " refused, busy)", ["result"], registry=self.registry)
        self.webhook_posts = Counter("continuum_oracle_silence_webhook_posts",
                                     "Silence webhook batches: delivered, failed (gave up after"
                                     " its attempts) or dropped (queue full)", ["result"],
                                     registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)


METRICS_KEY = web.AppKey("metrics", OracleMetrics)


def route_of(request: web.Request) -> str:
    """The route template that matched, or "unmatched" (404s, 405s)."""
    resource = request.match_info.route.resource
    return UNMATCHED if resource is None else resource.canonical


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count and time every response; a long-poll counts as a poller while it waits.

    Also sets `Server-Timing: app;dur=…` (milliseconds), the server's own time
    for the request, which browsers show and the dashboard benchmark reads.
    """
    metrics = request.app[METRICS_KEY]
    route = route_of(request)
    polling = route == ACCESS_LIST_PATH
    if polling:
        metrics.pollers.inc()
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        elapsed = time.perf_counter() - started
        if polling:
            metrics.pollers.dec()
        metrics.requests.labels(route, request.method, str(status)).inc()
        metrics.duration.labels(route).observe(elapsed)
    if not response.prepared:
        response.headers["Server-Timing"] = f"app;dur={elapsed * 1000:.2f}"
    return response


async def metrics_page(request: web.Request) -> web.Response:
    metrics = request.app[METRICS_KEY]
    counts = await request.app[ORACLE_KEY].registry.device_counts()
    metrics.devices.labels("active").set(counts.active)
    metrics.devices.labels("revoked").set(counts.revoked)
    metrics.devices.labels("behind").set(counts.behind)
    metrics.devices.labels("config_behind").set(counts.config_behind)  # SPEC §21
    oracle = request.app[ORACLE_KEY]
    metrics.push_queue.set(await oracle.registry.push_queue_depth())
    metrics.online.set(await oracle.presence.online_count())
    metrics.silent.set(await oracle.silence.count())
    metrics.relay_processes.set(await oracle.presence.live_instances())
    return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})


def add_routes(app: web.Application) -> None:
    app[METRICS_KEY] = OracleMetrics()
    app.router.add_get(METRICS_PATH, metrics_page)
