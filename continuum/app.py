"""The aiohttp application: the device WebSocket, /healthz and /metrics."""

from __future__ import annotations

import logging

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from proto.channel import DETACHED_SUBPROTOCOL, Layout
from runtime.client_address import client_address, client_unit
from runtime.listener import trust

from .access import ListState
from .connection_gate import ConnectionRefused
from .context import RelayContext
from .session import DeviceSession
from .websocket import DeviceWebSocket

RELAY_KEY = web.AppKey("relay", RelayContext)
CONNECT_PATH = "/v1/connect"


async def connect(request: web.Request) -> web.StreamResponse:
    relay = request.app[RELAY_KEY]
    # Budgets per address are per client: an IPv6 host holds a whole /64.
    address = client_unit(client_address(request.remote or "unknown", request.headers,
                                         relay.settings.proxy_trust))
    # Frames up to twice the limit are read and refused with an OVERSIZE error
    # frame; beyond that aiohttp closes the socket (1009) without buffering more.
    ws = DeviceWebSocket(max_msg_size=2 * relay.settings.limits.max_frame_bytes,
                         heartbeat=relay.settings.heartbeat_s, protocols=(DETACHED_SUBPROTOCOL,))
    # The channel's layout is what the device offered and `prepare` will select (SPEC §8).
    session = DeviceSession(ws, relay, address, Layout.negotiated(ws.can_prepare(request).protocol))
    try:
        slot = relay.gate.admit(address, session)
    except ConnectionRefused as refused:
        relay.metrics.handshake_failures.labels("connection_limit").inc()
        return web.json_response({"error": refused.reason}, status=refused.status)
    try:
        await ws.prepare(request)
        if await session.handshake(slot):
            trust(request.transport)  # its frames no longer wait behind newcomers' turns
            ws.authenticated()  # before the device hears WELCOME: its first frame may be large
            await session.serve()
    finally:
        slot.release()
    return ws


async def healthz(request: web.Request) -> web.Response:
    """503 while the store cannot take a message; 200 otherwise, with the access list's state.

    A relay without a valid access list answers 200 ("access_list_missing" or
    "_expired"): every replica shares the oracle, so taking replicas out of
    service or restarting them (what probes do on a 503) would not bring the
    oracle back, and a restart would only forget what the relay knows.
    """
    relay = request.app[RELAY_KEY]
    health = await relay.health.check()  # at most one probe a second (continuum/health.py)
    if health.store_error is not None:
        return web.json_response({"status": "store_unavailable", "detail": health.store_error,
                                  **health.regions}, status=503)
    state = relay.access.state
    status = "ok" if state in (ListState.OFF, ListState.VALID) else f"access_list_{state}"
    return web.json_response({"status": status, "relay_key": relay.identity.public.text,
                              "access_list": relay.access.health(), **health.regions})


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[RELAY_KEY].metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def create_worker_app(relay: RelayContext) -> web.Application:
    """/healthz and /metrics of one worker, on its own port (`worker_metrics_port` + i): the
    shared port answers for whichever worker accepted that connection, so a scrape there is
    not one series."""
    app = web.Application()
    app[RELAY_KEY] = relay
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    return app


def create_app(relay: RelayContext) -> web.Application:
    # aiohttp logs a warning, unsampled and outside the JSON log, for every upgrade that
    # offers subprotocols none of which the relay speaks: one cheap request, one line, from
    # anyone.  Such a device is simply served in the sealed layout (SPEC §8).
    logging.getLogger("aiohttp.websocket").setLevel(logging.ERROR)
    app = web.Application()
    app[RELAY_KEY] = relay
    app.router.add_get(CONNECT_PATH, connect)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    return app
