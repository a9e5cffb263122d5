"""The JSON API: everything the dashboard does, for scripts too (see openapi.json).

Who may call what is decided before any handler (`web.auth_middleware`,
`auth.refusal`): an admin's session everything, a `write` token all but the
admin and token routes, a `read` token only GETs.

Lists take `limit` and `cursor` (`pagination`); without `limit` the device and
group lists answer every match at once, as they did before they were paginated,
so existing scripts keep working.  Every change names its `Actor` for the audit log.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from aiohttp import web

from proto.access import (ACCESS_LIST_CONTENT_TYPE, ACCESS_LIST_PATH, ORACLE_KEY_CHAIN_PATH,
                          Stamp)
from proto.errors import ProtocolError
from runtime.clock import now_ms

from . import audit
from .audit import Actor, AuditQuery
from .auth import ACTOR, PRINCIPAL
from .configuration import parse_config
from .context import ORACLE_KEY, OracleContext
from .device_search import DeviceQuery
from .errors import InvalidInput
from .pagination import parse_limit
from .presence import NEVER_SEEN
from .validation import parse_key

OPENAPI_FILE = Path(__file__).parent / "openapi.json"
# Keys of devices behind on their peer list that /v1/status names (it counts them all).
STATUS_BEHIND_KEYS = 100


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InvalidInput("request body must be JSON") from None
    if not isinstance(body, dict):
        raise InvalidInput("request body must be a JSON object")
    return body


def _oracle(request: web.Request) -> OracleContext:
    return request.app[ORACLE_KEY]


def _actor(request: web.Request) -> Actor:
    return request[ACTOR]


async def list_devices(request: web.Request) -> web.Response:
    oracle = _oracle(request)
    query = DeviceQuery.from_params(request.query, default_limit=None)
    page = await oracle.registry.search_devices(query)
    keys = [d.key for d in page.items]
    presence = await oracle.presence.of_devices(keys)
    silent = await oracle.silence.of_devices(keys)
    return web.json_response({"devices": [
        {**d.to_json(), "presence": presence.get(d.key, NEVER_SEEN).to_json(),
         "silent_since_ms": silent[d.key].since_ms if d.key in silent else None}
        for d in page.items], "next_cursor": page.next_cursor})


async def enroll_device(request: web.Request) -> web.Response:
    body = await _body(request)
    device = await _oracle(request).registry.enroll(body.get("key"), body.get("name"),
                                                    body.get("tags", []), _actor(request),
                                                    body.get("region"))
    return web.json_response(device.to_json(), status=201)


async def move_device(request: web.Request) -> web.Response:
    """Make a region the device's home (SPEC §19): relays move its waiting mail there."""
    device = await _oracle(request).registry.move_device(
        parse_key(request.match_info["key"]), (await _body(request)).get("region"),
        _actor(request))
    return web.json_response(device.to_json())


async def move_group(request: web.Request) -> web.Response:
    """Make a region the home of every active member of a group."""
    group, moved = await _oracle(request).registry.move_group(
        request.match_info["group_id"], (await _body(request)).get("region"), _actor(request))
    return web.json_response({**group.to_json(), "moved": moved})


async def get_device(request: web.Request) -> web.Response:
    registry = _oracle(request).registry
    key = parse_key(request.match_info["key"])
    device = await registry.get_device(key)
    oracle = _oracle(request)
    silent = (await oracle.silence.of_devices([key])).get(key)
    return web.json_response({
        **device.to_json(),
        "peers": sorted(await registry.current_peers(key)),
        "pushes": [p.to_json() for p in await registry.push_history(key)],
        "presence": (await oracle.presence.of_device(key)).to_json(),
        "presence_history": [c.to_json() for c in await oracle.presence.history(key)],
        "check_in": (await oracle.checkins.of_device(key)).to_json(),
        "silent_since_ms": silent.since_ms if silent else None,
    })


async def update_device(request: web.Request) -> web.Response:
    body = await _body(request)
    device = await _oracle(request).registry.update_device(
        parse_key(request.match_info["key"]), body.get("name"), body.get("tags"),
        _actor(request))
    return web.json_response(device.to_json())


async def delete_device(request: web.Request) -> web.Response:
    await _oracle(request).registry.delete_device(parse_key(request.match_info["key"]),
                                                  _actor(request))
    return web.Response(status=204)


async def revoke_device(request: web.Request) -> web.Response:
    revocation = await _oracle(request).registry.revoke(parse_key(request.match_info["key"]),
                                                        _actor(request))
    return web.json_response(revocation.to_json())


async def restore_device(request: web.Request) -> web.Response:
    device = await _oracle(request).registry.restore(parse_key(request.match_info["key"]),
                                                     _actor(request))
    return web.json_response(device.to_json())


async def list_groups(request: web.Request) -> web.Response:
    q = request.query.get("q", "")
    if len(q) > 200:
        raise InvalidInput("q must be at most 200 characters")
    page = await _oracle(request).registry.list_groups(
        q, parse_limit(request.query, None), request.query.get("cursor", ""))
    return web.json_response({"groups": [g.to_json() for g in page.items],
                              "next_cursor": page.next_cursor})


async def create_group(request: web.Request) -> web.Response:
    group = await _oracle(request).registry.create_group((await _body(request)).get("name"),
                                                         _actor(request))
    return web.json_response(group.to_json(), status=201)


async def get_group(request: web.Request) -> web.Response:
    group = await _oracle(request).registry.get_group(request.match_info["group_id"])
    return web.json_response(group.to_json())


async def rename_group(request: web.Request) -> web.Response:
    group = await _oracle(request).registry.rename_group(
        request.match_info["group_id"], (await _body(request)).get("name"), _actor(request))
    return web.json_response(group.to_json())


async def delete_group(request: web.Request) -> web.Response:
    await _oracle(request).registry.delete_group(request.match_info["group_id"], _actor(request))
    return web.Response(status=204)


async def add_member(request: web.Request) -> web.Response:
    group = await _oracle(request).registry.add_member(request.match_info["group_id"],
                                                       request.match_info["key"], _actor(request))
    return web.json_response(group.to_json())


async def remove_member(request: web.Request) -> web.Response:
    group = await _oracle(request).registry.remove_member(
        request.match_info["group_id"], request.match_info["key"], _actor(request))
    return web.json_response(group.to_json())


async def _config_body(request: web.Request) -> dict[str, Any]:
    """The request body as a configuration document: a JSON object within the bounds."""
    try:
        text = await request.text()
    except UnicodeDecodeError:
        raise InvalidInput("request body must be UTF-8 JSON") from None
    return parse_config(text)


async def get_group_config(request: web.Request) -> web.Response:
    group_id = request.match_info["group_id"]
    document = await _oracle(request).registry.configs.group_config(group_id)
    return web.json_response({"group_id": group_id, "config": document})


async def put_group_config(request: web.Request) -> web.Response:
    """Set a group's desired configuration; its members are issued their merged documents."""
    group_id, document = request.match_info["group_id"], await _config_body(request)
    issued = await _oracle(request).registry.configs.set_group_config(group_id, document,
                                                                      _actor(request))
    return web.json_response({"group_id": group_id, "config": document, "issued": issued})


async def delete_group_config(request: web.Request) -> web.Response:
    group_id = request.match_info["group_id"]
    issued = await _oracle(request).registry.configs.set_group_config(group_id, None,
                                                                      _actor(request))
    return web.json_response({"group_id": group_id, "config": None, "issued": issued})


async def get_device_config(request: web.Request) -> web.Response:
    """Desired (own and merged), issued and reported configuration of one device."""
    config = await _oracle(request).registry.configs.device_config(
        parse_key(request.match_info["key"]))
    return web.json_response(config.to_json())


async def put_device_config(request: web.Request) -> web.Response:
    key, document = parse_key(request.match_info["key"]), await _config_body(request)
    configs = _oracle(request).registry.configs
    await configs.set_device_config(key, document, _actor(request))
    return web.json_response((await configs.device_config(key)).to_json())


async def delete_device_config(request: web.Request) -> web.Response:
    key = parse_key(request.match_info["key"])
    configs = _oracle(request).registry.configs
    await configs.set_device_config(key, None, _actor(request))
    return web.json_response((await configs.device_config(key)).to_json())


async def config_behind(request: web.Request) -> web.Response:
    """Active devices that have not reported their newest configuration."""
    limit = parse_limit(request.query, 1000)
    return web.json_response({"devices": await _oracle(request).registry.configs.behind(limit)})


async def reissue_peer_lists(request: web.Request) -> web.Response:
    """After a restore from backup: every active device gets its list again, in this epoch."""
    issued = await _oracle(request).registry.reissue_peer_lists(_actor(request))
    return web.json_response({"issued": issued})


async def audit_log(request: web.Request) -> web.Response:
    """The audit log, newest first; read-only: no route changes or deletes an entry."""
    query = AuditQuery.from_params(request.query)
    page = await audit.entries(_oracle(request).registry.db, query)
    return web.json_response({"entries": [e.to_json() for e in page.items],
                              "next_cursor": page.next_cursor})


async def list_admins(request: web.Request) -> web.Response:
    admins = await _oracle(request).auth.admins()
    return web.json_response({"admins": [a.to_json() for a in admins]})


async def create_admin(request: web.Request) -> web.Response:
    """Create an admin; the generated password is in this answer only."""
    body = await _body(request)
    username = body.get("username")
    password = await _oracle(request).auth.create_admin(username, None, _actor(request))
    return web.json_response({"username": username, "password": password}, status=201)


async def delete_admin(request: web.Request) -> web.Response:
    await _oracle(request).auth.delete_admin(request.match_info["username"], _actor(request))
    return web.Response(status=204)


async def list_tokens(request: web.Request) -> web.Response:
    tokens = await _oracle(request).auth.api_tokens()
    return web.json_response({"tokens": [t.to_json() for t in tokens]})


async def create_token(request: web.Request) -> web.Response:
    """Create an API token with its scope (read or write), made by the calling admin (whose
    deletion revokes it); the token is in this answer only (the oracle keeps its hash)."""
    body = await _body(request)
    name, scope = body.get("name"), body.get("scope")
    token = await _oracle(request).auth.create_api_token(name, scope, _actor(request))
    return web.json_response({"name": name, "scope": scope, "token": token}, status=201)


async def revoke_token(request: web.Request) -> web.Response:
    await _oracle(request).auth.revoke_api_token(request.match_info["name"], _actor(request))
    return web.Response(status=204)


async def status(request: web.Request) -> web.Response:
    """A summary of fixed size whatever the fleet: counts (one pass over the devices) and
    at most STATUS_BEHIND_KEYS keys of devices behind; the device list pages through all."""
    oracle = _oracle(request)
    counts = await oracle.registry.device_counts()
    return web.json_response({
        "oracle_key": oracle.identity.public.text,
        "oracle_key_changes": len(oracle.chain.links),
        "access_list_epoch": (await oracle.publisher.current()).stamp.epoch,
        "access_list_version": await oracle.registry.access_version(),
        "relays": list(oracle.settings.relays),
        "region": oracle.settings.region or None,
        "regions": list(oracle.registry.regions.names) if oracle.registry.regions else [],
        "devices": counts.total,
        "revoked": counts.revoked,
        "behind": await oracle.registry.behind_keys(STATUS_BEHIND_KEYS),
        "behind_count": counts.behind,
        # Counted, not loaded: each pending row holds a whole peer list (50 KB at 1,000 peers).
        "pending_pushes": await oracle.registry.push_queue_depth(),
        "config_behind": counts.config_behind,
    })


async def whoami(request: web.Request) -> web.Response:
    principal = request[PRINCIPAL]
    return web.json_response({"name": principal.name, "scope": principal.scope,
                              "csrf_token": principal.csrf_token})


async def access_list(request: web.Request) -> web.Response:
    """Long-poll for the signed access list, for relays that sign the request (SPEC §12).

    Answered from the publisher's cached list: a poll never touches the database.
    `valid_until` is when the relay's list lapses, so it gets each refresh of it.
    """
    oracle = _oracle(request)
    try:
        oracle.relay_auth.check(request.headers.get("Authorization"), now_ms())
    except ProtocolError as exc:
        return web.json_response({"error": exc.message}, status=401,
                                 headers={"WWW-Authenticate": "Continuum-Relay"})
    try:
        held = Stamp(int(request.query.get("epoch", "0")), int(request.query.get("after", "0")))
        held_until_ms = int(request.query.get("valid_until", "0"))
    except ValueError:
        raise InvalidInput("epoch, after and valid_until must be integers") from None
    published = await oracle.publisher.wait_changed(held, held_until_ms,
                                                    oracle.settings.longpoll_s)
    if published is None:
        return web.Response(status=204)
    return web.Response(body=published.document, content_type=ACCESS_LIST_CONTENT_TYPE,
                        headers={"ETag": published.etag})


async def oracle_key_chain(request: web.Request) -> web.Response:
    """The oracle's key chain (SPEC §15): public keys and signatures, for relays that must
    follow it before this oracle, under its new key, can connect to them and vouch for them."""
    return web.Response(body=_oracle(request).chain.encode(),
                        content_type=ACCESS_LIST_CONTENT_TYPE)


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=OPENAPI_FILE.read_bytes(), content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    oracle = _oracle(request)
    await oracle.registry.access_version()  # the database answers
    return web.json_response({"status": "ok", "oracle_key": oracle.identity.public.text,
                              "relays_connected": oracle.pusher.connected})


# No administrator needed; the access list authenticates relays itself (`relay_auth`).
PUBLIC_PATHS = {"/healthz", ACCESS_LIST_PATH, ORACLE_KEY_CHAIN_PATH, "/v1/openapi"}


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/healthz", healthz)
    r.add_get(ACCESS_LIST_PATH, access_list)
    r.add_get(ORACLE_KEY_CHAIN_PATH, oracle_key_chain)
    r.add_get("/v1/openapi", openapi)
    r.add_get("/v1/status", status)
    r.add_get("/v1/me", whoami)
    r.add_get("/v1/devices", list_devices)
    r.add_post("/v1/devices", enroll_device)
    r.add_get("/v1/devices/{key}", get_device)
    r.add_patch("/v1/devices/{key}", update_device)
    r.add_delete("/v1/devices/{key}", delete_device)
    r.add_post("/v1/devices/{key}/revoke", revoke_device)
    r.add_post("/v1/devices/{key}/restore", restore_device)
    r.add_put("/v1/devices/{key}/region", move_device)
    r.add_get("/v1/groups", list_groups)
    r.add_post("/v1/groups", create_group)
    r.add_get("/v1/groups/{group_id}", get_group)
    r.add_patch("/v1/groups/{group_id}", rename_group)
    r.add_delete("/v1/groups/{group_id}", delete_group)
    r.add_put("/v1/groups/{group_id}/members/{key}", add_member)
    r.add_delete("/v1/groups/{group_id}/members/{key}", remove_member)
    r.add_put("/v1/groups/{group_id}/region", move_group)
    r.add_post("/v1/peer-lists/reissue", reissue_peer_lists)
    r.add_get("/v1/groups/{group_id}/config", get_group_config)
    r.add_put("/v1/groups/{group_id}/config", put_group_config)
    r.add_delete("/v1/groups/{group_id}/config", delete_group_config)
    r.add_get("/v1/devices/{key}/config", get_device_config)
    r.add_put("/v1/devices/{key}/config", put_device_config)
    r.add_delete("/v1/devices/{key}/config", delete_device_config)
    r.add_get("/v1/config/behind", config_behind)
    r.add_get("/v1/audit", audit_log)
    r.add_get("/v1/admins", list_admins)
    r.add_post("/v1/admins", create_admin)
    r.add_delete("/v1/admins/{username}", delete_admin)
    r.add_get("/v1/tokens", list_tokens)
    r.add_post("/v1/tokens", create_token)
    r.add_delete("/v1/tokens/{name}", revoke_token)
