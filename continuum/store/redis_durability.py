"""How durable a write must be before the Redis store says "stored", from the store URL.

Redis answers a write once it is in the primary's memory (and, with
`appendfsync always`, in its AOF).  A replica gets it a moment later, so a
primary that dies and is replaced by its replica (Sentinel, a managed
failover) can take acknowledged writes with it.  These options close that gap:

- `min_replicas=N`: after each accept, `WAIT N timeout`: N replicas have the
  write in memory.  A failover to one of them loses nothing ACCEPTED.
- `wait_aof=true`: `WAITAOF 1 N timeout` instead: the primary's AOF and N
  replicas' AOFs have fsynced it (Redis >= 7.2, AOF on).  This survives
  losing the primary and every replica's process at once, and makes
  `appendfsync everysec` as safe as `always` for what was ACCEPTED.
- `wait_timeout_ms=T` (default 500): how long to wait before giving up.

WAIT and WAITAOF count the writes of the connection they are sent on, so the
store sends them in one pipeline with the script that wrote.  Not met within
the timeout is StoreUnavailableError: the device hears STORE_UNAVAILABLE and
retries, never ACCEPTED.  A server without WAITAOF (Redis < 7.2) fails every
such wait with a message saying so, and /healthz answers 503: fail closed.
"""

from __future__ import annotations

from dataclasses import dataclass

from redis.exceptions import ResponseError

from proto.errors import StoreUnavailableError

DEFAULT_WAIT_TIMEOUT_MS = 500
_TRUE = ("1", "true", "yes")


@dataclass(frozen=True)
class Durability:
    min_replicas: int = 0
    wait_aof: bool = False
    timeout_ms: int = DEFAULT_WAIT_TIMEOUT_MS

    @classmethod
    def from_query(cls, query: dict[str, str]) -> Durability:
        """Take this module's options out of a parsed URL query; ValueError names a bad one."""
        try:
            min_replicas = int(query.pop("min_replicas", "0"))
            timeout_ms = int(query.pop("wait_timeout_ms", str(DEFAULT_WAIT_TIMEOUT_MS)))
        except ValueError:
            raise ValueError("min_replicas and wait_timeout_ms must be integers") from None
        wait_aof = query.pop("wait_aof", "false").lower() in _TRUE
        if min_replicas < 0:
            raise ValueError("min_replicas must be >= 0")
        if timeout_ms < 1:
            raise ValueError("wait_timeout_ms must be >= 1 (0 would make Redis wait forever)")
        return cls(min_replicas, wait_aof, timeout_ms)

    @property
    def waits(self) -> bool:
        """Whether a write must be followed by a wait at all (off: Redis's reply is enough)."""
        return self.min_replicas > 0 or self.wait_aof

    def command(self) -> tuple[str | int, ...]:
        if self.wait_aof:
            return ("WAITAOF", 1, self.min_replicas, self.timeout_ms)
        return ("WAIT", self.min_replicas, self.timeout_ms)

    def check(self, reply: object) -> None:
        """Raise StoreUnavailableError unless the wait's reply shows the write is as durable
        as configured; `reply` may be the error the server answered with."""
        if isinstance(reply, ResponseError):
            if self.wait_aof and "unknown command" in str(reply).lower():
                raise StoreUnavailableError(
                    "wait_aof=true needs WAITAOF (Redis >= 7.2); this server does not have it")
            raise StoreUnavailableError(f"durability wait failed: {reply}")
        if self.wait_aof:
            local, replicas = reply  # type: ignore[misc]
            if local < 1 or replicas < self.min_replicas:
                raise StoreUnavailableError(
                    f"write fsynced by {local} primary and {replicas} of {self.min_replicas}"
                    f" replicas within {self.timeout_ms} ms")
        elif reply < self.min_replicas:  # type: ignore[operator]
            raise StoreUnavailableError(
                f"write reached {reply} of {self.min_replicas} replicas within"
                f" {self.timeout_ms} ms")
