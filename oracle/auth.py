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

from .db import Database
from .errors import Conflict, InvalidInput

SESSION_COOKIE = "continuum_oracle_session"
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"
_T = TypeVar("_T")
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1
_SCRYPT_DIGEST_BYTES = 64  # hashlib.scrypt's default dklen
SCRYPT_CONCURRENCY = 2
# Sec-Fetch-Site values a login may carry: posted from the oracle's own page, or user-initiated.
_OWN_FETCH_SITES = {"same-origin", "none"}


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
    """Who is calling: an admin by session cookie (with its CSRF token) or an API token."""

    name: str
    via_cookie: bool
    csrf_token: str | None = None


class Auth:
    def __init__(self, db: Database, session_ttl_s: int) -> None:
        self._db = db
        self._session_ttl_ms = session_ttl_s * 1000
        self._unknown_user_hash = _unmatchable_hash()
        self._scrypt_slots = asyncio.Semaphore(SCRYPT_CONCURRENCY)

    async def _off_loop(self, work: Callable[[], _T]) -> _T:
        """Run one scrypt in a worker thread, at most SCRYPT_CONCURRENCY at once."""
        async with self._scrypt_slots:
            return await asyncio.to_thread(work)

    async def create_admin(self, username: str, password: str | None = None) -> str:
        """Create an administrator; returns the password (generated when not given)."""
        if not username or len(username) > 64 or not username.isprintable():
            raise InvalidInput("username must be 1..64 printable characters")
        password = password or secrets.token_urlsafe(18)
        password_hash = await self._off_loop(lambda: hash_password(password))
        async with self._db.transaction() as conn:
            if await conn.fetchrow("SELECT username FROM admins WHERE username = $1", username):
                raise Conflict(f"admin {username!r} already exists")
            await conn.execute(
                "INSERT INTO admins (username, password_hash, created_at_ms) VALUES ($1, $2, $3)",
                username, password_hash, now_ms())
        return password

    async def create_api_token(self, name: str) -> str:
        """A bearer token for scripts; shown once, stored only as a hash."""
        token = "cot_" + secrets.token_urlsafe(32)
        async with self._db.transaction() as conn:
            if await conn.fetchrow("SELECT name FROM api_tokens WHERE name = $1", name):
                raise Conflict(f"an API token named {name!r} already exists")
            await conn.execute(
                "INSERT INTO api_tokens (token_hash, name, created_at_ms) VALUES ($1, $2, $3)",
                _token_hash(token), name, now_ms())
        return token

    async def login(self, username: str, password: str) -> str | None:
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
        return token

    async def logout(self, session_token: str) -> None:
        await self._db.execute("DELETE FROM admin_sessions WHERE token_hash = $1",
                               _token_hash(session_token))

    async def by_session(self, session_token: str) -> Principal | None:
        row = await self._db.fetchrow(
            "SELECT username, csrf_token FROM admin_sessions"
            " WHERE token_hash = $1 AND expires_at_ms > $2", _token_hash(session_token), now_ms())
        return Principal(row["username"], True, row["csrf_token"]) if row else None

    async def by_bearer(self, token: str) -> Principal | None:
        row = await self._db.fetchrow("SELECT name FROM api_tokens WHERE token_hash = $1",
                                      _token_hash(token))
        return Principal("token:" + row["name"], False) if row else None


PRINCIPAL = web.RequestKey("principal", Principal)


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
