"""Administrator authentication: scrypt passwords, session cookies with CSRF tokens, API tokens.

Only hashes are stored: scrypt for passwords, SHA-256 for session and API
tokens (those are 256-bit random, so a fast hash is enough), so a copy of the
database logs nobody in.  A cookie-authenticated change must carry the
session's CSRF token; a bearer token is not sent by browsers on their own, so
it needs none.

scrypt is deliberately slow (about 50 ms) and memory-hard (16 MiB), so it runs
in a worker thread (it releases the GIL), at most SCRYPT_CONCURRENCY at once:
a burst of logins neither stalls the event loop nor takes every thread of the
default executor (which also resolves host names) nor more memory than that.

Accounts and tokens are managed from the CLI and from the dashboard; each
change (and each login and logout) is an audit entry.  A token's last use is
written at most once a minute per token, so API traffic does not turn every
read into a write.

A token is not an administrator.  It has a scope, chosen when it is made:
`read` (GET only: the API's reads and /metrics, what a Prometheus scrape or a
reporting script needs) or `write` (also device and group changes).  Neither
manages administrators or tokens (/v1/admins*, /v1/tokens*, the Admins page):
that takes an administrator's session, so a token leaked from a script or a
Kubernetes Secret cannot mint accounts, more tokens, or delete admins
(`refusal`).  A token made from the dashboard or the API records the admin who
made it, and deleting that admin revokes it in the same transaction: a removed
administrator leaves nothing behind that still works.  Tokens made with the CLI
(whoever runs it holds the database) have no creator and live until revoked.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlsplit

from aiohttp import web

from runtime.clock import now_ms

from . import audit
from .audit import SYSTEM, Actor
from .db import Database
from .errors import Conflict, InvalidInput, NotFound

SESSION_COOKIE = "continuum_oracle_session"
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"
_T = TypeVar("_T")
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1
_SCRYPT_DIGEST_BYTES = 64  # hashlib.scrypt's default dklen
SCRYPT_CONCURRENCY = 2
# Sec-Fetch-Site values a login may carry: posted from the oracle's own page, or user-initiated.
_OWN_FETCH_SITES = {"same-origin", "none"}
LAST_USED_RESOLUTION_MS = 60_000

READ, WRITE = "read", "write"
TOKEN_SCOPES = (READ, WRITE)
# A session's scope: everything, managing administrators and tokens included.
ADMIN = "admin"
# Managing administrators and tokens: for administrators' sessions only (`refusal`).
ADMIN_ONLY_PATHS = ("/v1/admins", "/v1/tokens", "/admins")
_READ_METHODS = {"GET", "HEAD", "OPTIONS"}


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P)
    encoded_salt, encoded = base64.b64encode(salt).decode(), base64.b64encode(digest).decode()
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${encoded_salt}${encoded}"


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        actual = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt),
                                n=int(n), r=int(r), p=int(p))
    except ValueError:
        return False
    return hmac.compare_digest(actual, base64.b64decode(digest))


def _unmatchable_hash() -> str:
    """A well-formed hash with today's parameters that no password matches (a random digest).

    An unknown username is checked against it, so it costs exactly the one
    scrypt a known username costs, and timing does not tell which names exist.
    """
    salt, digest = secrets.token_bytes(16), secrets.token_bytes(_SCRYPT_DIGEST_BYTES)
    return (f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}$"
            f"{base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}")


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    """Who is calling: an admin by session cookie (with its CSRF token) or an API token.

    `scope` is what it may do: ADMIN for a session, the token's READ or WRITE
    (`refusal` decides by `via_cookie` first, so no token row can claim ADMIN).
    """

    name: str
    via_cookie: bool
    scope: str
    csrf_token: str | None = None

    def actor(self, address: str) -> Actor:
        return Actor(self.name, "session" if self.via_cookie else "token", address)


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


def refusal(principal: Principal, method: str, path: str) -> str | None:
    """Why this principal may not make this request (a 403's message), or None if it may.

    One rule for every route, checked before any handler: a handler cannot
    forget it, and a new route is covered by its method alone.
    """
    if principal.via_cookie:
        return None  # an administrator's session (CSRF is checked apart: `csrf_ok`)
    if any(_under(path, prefix) for prefix in ADMIN_ONLY_PATHS):
        return ("managing administrators and API tokens needs an administrator's session"
                " (log in to the dashboard); an API token cannot")
    if principal.scope != WRITE and method not in _READ_METHODS:
        return f"this API token's scope is {principal.scope!r}: it can only read (GET)"
    return None


@dataclass(frozen=True)
class AdminAccount:
    username: str
    created_at_ms: int
    last_login_ms: int | None

    def to_json(self) -> dict[str, object]:
        return {"username": self.username, "created_at_ms": self.created_at_ms,
                "last_login_ms": self.last_login_ms}


@dataclass(frozen=True)
class ApiToken:
    """A token's record; `created_by` is the admin who made it, None if the CLI made it (or
    it predates migration 0008 and the audit log named no admin's session for it)."""

    name: str
    scope: str
    created_by: str | None
    created_at_ms: int
    last_used_ms: int | None

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "scope": self.scope, "created_by": self.created_by,
                "created_at_ms": self.created_at_ms, "last_used_ms": self.last_used_ms}


class Auth:
    def __init__(self, db: Database, session_ttl_s: int) -> None:
        self._db = db
        self._session_ttl_ms = session_ttl_s * 1000
        self._unknown_user_hash = _unmatchable_hash()
        self._scrypt_slots = asyncio.Semaphore(SCRYPT_CONCURRENCY)
        self._last_used_written: dict[str, int] = {}  # token hash → last_used_ms written

    async def _off_loop(self, work: Callable[[], _T]) -> _T:
        """Run one scrypt in a worker thread, at most SCRYPT_CONCURRENCY at once."""
        async with self._scrypt_slots:
            return await asyncio.to_thread(work)

    async def create_admin(self, username: object, password: str | None = None,
                           actor: Actor = SYSTEM) -> str:
        """Create an administrator; returns the password (generated when not given).

        The username is the audit log's "who" for everything they do, so it must not
        read as another actor: no `:` (`cli:root`, `token:ci`), not `oracle`, no space
        at either end (" alice" reads as "alice").
        """
        if (not isinstance(username, str) or not username or len(username) > 64
                or not username.isprintable() or username != username.strip()
                or audit.names_another_kind(username)):
            raise InvalidInput(
                "username must be 1..64 printable ASCII characters, without ':' and not 'oracle'"
                " (the audit log names other actors cli:USER, token:NAME, device:cpk_…,"
                " oracle) and without spaces at either end")
        password = password or secrets.token_urlsafe(18)
        password_hash = await self._off_loop(lambda: hash_password(password))
        async with self._db.transaction() as conn:
            if await conn.fetchrow("SELECT username FROM admins WHERE username = $1", username):
                raise Conflict(f"admin {username!r} already exists")
            await conn.execute(
                "INSERT INTO admins (username, password_hash, created_at_ms) VALUES ($1, $2, $3)",
                username, password_hash, now_ms())
            await audit.record(conn, actor, "admin.create", username)
        return password

    async def delete_admin(self, username: str, actor: Actor = SYSTEM) -> list[str]:
        """Remove an administrator, end their sessions and revoke the API tokens they made;
        never oneself nor the last one.  Returns the names of the tokens revoked.

        All in one transaction: no moment exists where the admin is gone and their
        tokens still work.  Each revoked token gets its own `token.revoke` entry
        (found by the token's name in the log), and `admin.delete` lists them.
        """
        if actor.via == "session" and actor.name == username:
            raise Conflict("you cannot delete your own account: ask another admin")
        async with self._db.transaction() as conn:
            if not await conn.fetchrow("SELECT username FROM admins WHERE username = $1",
                                       username):
                raise NotFound(f"no admin {username!r}")
            if await conn.fetchval("SELECT COUNT(*) FROM admins") <= 1:
                raise Conflict("the last admin cannot be deleted")
            revoked = [row["name"] for row in await conn.fetch(
                "SELECT name FROM api_tokens WHERE created_by = $1 ORDER BY name", username)]
            await conn.execute("DELETE FROM api_tokens WHERE created_by = $1", username)
            for name in revoked:
                await audit.record(conn, actor, "token.revoke", name,
                                   reason="its creator was deleted", created_by=username)
            await conn.execute("DELETE FROM admin_sessions WHERE username = $1", username)
            await conn.execute("DELETE FROM admins WHERE username = $1", username)
            await audit.record(conn, actor, "admin.delete", username, tokens_revoked=revoked)
        return revoked

    async def admins(self) -> list[AdminAccount]:
        rows = await self._db.fetch(
            "SELECT username, created_at_ms, last_login_ms FROM admins ORDER BY username")
        return [AdminAccount(**row) for row in rows]

    async def create_api_token(self, name: object, scope: object,
                               actor: Actor = SYSTEM) -> str:
        """A bearer token for scripts, `read` or `write`; shown once, stored only as a hash.

        There is no default scope: whoever makes a token says what it is for.  An
        admin's session (`actor.via == "session"`) is recorded as its creator, so
        deleting that admin revokes it; the CLI and the oracle itself make tokens
        with no creator.
        """
        if not isinstance(name, str) or not name or len(name) > 64 or not name.isprintable():
            raise InvalidInput("token name must be 1..64 printable characters")
        if scope not in TOKEN_SCOPES:
            raise InvalidInput("scope must be read (GET only: reads and /metrics)"
                               " or write (also device and group changes)")
        created_by = actor.name if actor.via == "session" else None
        token = "cot_" + secrets.token_urlsafe(32)
        async with self._db.transaction() as conn:
            if await conn.fetchrow("SELECT name FROM api_tokens WHERE name = $1", name):
                raise Conflict(f"an API token named {name!r} already exists")
            await conn.execute(
                "INSERT INTO api_tokens (token_hash, name, scope, created_by, created_at_ms)"
                " VALUES ($1, $2, $3, $4, $5)",
                _token_hash(token), name, scope, created_by, now_ms())
            await audit.record(conn, actor, "token.create", name, scope=scope)
        return token

    async def revoke_api_token(self, name: str, actor: Actor = SYSTEM) -> None:
        """The token stops working at once; its name may be used again."""
        async with self._db.transaction() as conn:
            if not await conn.fetchrow("SELECT name FROM api_tokens WHERE name = $1", name):
                raise NotFound(f"no API token named {name!r}")
            await conn.execute("DELETE FROM api_tokens WHERE name = $1", name)
            await audit.record(conn, actor, "token.revoke", name)

    async def api_tokens(self) -> list[ApiToken]:
        rows = await self._db.fetch(
            "SELECT name, scope, created_by, created_at_ms, last_used_ms FROM api_tokens"
            " ORDER BY name")
        return [ApiToken(**row) for row in rows]

    async def is_admin(self, username: str) -> bool:
        """Whether an administrator has this username (the login throttle keeps their logins
        from waiting behind guesses at names that are not: oracle/login_throttle.py)."""
        return await self._db.fetchrow("SELECT username FROM admins WHERE username = $1",
                                       username) is not None

    async def login(self, username: str, password: str, address: str = "") -> str | None:
        """A new session token if the password is right, else None (one scrypt either way)."""
        row = await self._db.fetchrow("SELECT password_hash FROM admins WHERE username = $1",
                                      username)
        stored = row["password_hash"] if row else self._unknown_user_hash
        if not await self._off_loop(lambda: verify_password(password, stored)) or row is None:
            return None
        token = secrets.token_urlsafe(32)
        now = now_ms()
        async with self._db.transaction() as conn:
            await conn.execute("DELETE FROM admin_sessions WHERE expires_at_ms < $1", now)
            await conn.execute(
                "INSERT INTO admin_sessions (token_hash, username, csrf_token, expires_at_ms)"
                " VALUES ($1, $2, $3, $4)",
                _token_hash(token), username, secrets.token_urlsafe(32),
                now + self._session_ttl_ms)
            await conn.execute("UPDATE admins SET last_login_ms = $1 WHERE username = $2",
                               now, username)
            await audit.record(conn, Actor(username, "session", address), "session.login",
                               username)
        return token

    async def logout(self, session_token: str, address: str = "") -> None:
        async with self._db.transaction() as conn:
            row = await conn.fetchrow("SELECT username FROM admin_sessions WHERE token_hash = $1",
                                      _token_hash(session_token))
            if row is None:
                return
            await conn.execute("DELETE FROM admin_sessions WHERE token_hash = $1",
                               _token_hash(session_token))
            await audit.record(conn, Actor(row["username"], "session", address),
                               "session.logout", row["username"])

    async def by_session(self, session_token: str) -> Principal | None:
        row = await self._db.fetchrow(
            "SELECT username, csrf_token FROM admin_sessions"
            " WHERE token_hash = $1 AND expires_at_ms > $2", _token_hash(session_token), now_ms())
        return Principal(row["username"], True, ADMIN, row["csrf_token"]) if row else None

    async def by_bearer(self, token: str) -> Principal | None:
        token_hash = _token_hash(token)
        row = await self._db.fetchrow(
            "SELECT name, scope FROM api_tokens WHERE token_hash = $1", token_hash)
        if row is None:
            return None
        now = now_ms()
        if now - self._last_used_written.get(token_hash, 0) >= LAST_USED_RESOLUTION_MS:
            self._last_used_written[token_hash] = now
            await self._db.execute("UPDATE api_tokens SET last_used_ms = $1 WHERE token_hash = $2",
                                   now, token_hash)
        return Principal("token:" + row["name"], False, row["scope"])


PRINCIPAL = web.RequestKey("principal", Principal)
# The principal with the client's address, for the audit log (set with PRINCIPAL).
ACTOR = web.RequestKey("actor", Actor)


def csrf_ok(principal: Principal, presented: str | None) -> bool:
    """A cookie-authenticated change must present the session's CSRF token."""
    if not principal.via_cookie:
        return True
    return (presented is not None and principal.csrf_token is not None
            and hmac.compare_digest(presented.encode(), principal.csrf_token.encode()))


def from_own_pages(headers: Mapping[str, str], host: str) -> bool:
    """Whether a browser sent this request from the oracle's own pages: the login CSRF check.

    A session cookie does not exist yet at login, so the session's CSRF token
    cannot protect it: another site could post its own credentials to /login
    and the victim's browser would then work, unknowingly, in the attacker's
    session.  Browsers say where a request comes from: Sec-Fetch-Site (every
    current browser, to HTTPS and loopback origins), or else Origin (sent with
    every POST).  Origin is compared with Host by host and port only, so a
    proxy terminating TLS in front does not break it; "null" never matches.  A
    client sending neither is a script, not a browser another site could drive.
    """
    site = headers.get("Sec-Fetch-Site")
    if site is not None:
        return site.strip().lower() in _OWN_FETCH_SITES
    origin = headers.get("Origin")
    if origin is None:
        return True
    netloc = urlsplit(origin.strip()).netloc.lower()
    return bool(netloc) and netloc == host.lower()
