"""What an administrator's request can get wrong; the API maps each to one HTTP status."""

from __future__ import annotations


class OracleError(Exception):
    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(OracleError):
    status = 400


class NotFound(OracleError):
    status = 404


class Conflict(OracleError):
    status = 409


class IdentityError(OracleError):
    """The oracle's key files disagree, or a key rotation cannot run now (oracle.identity)."""
