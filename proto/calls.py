"""Calls between peers (SPEC §18): the sealed plaintexts of CALL and RESPONSE, and their rules.

A call is an envelope of kind CALL whose plaintext names a method, carries a
body, a correlation id and a deadline; the callee answers with an envelope of
kind RESPONSE naming the same correlation id, with a status and a body.  Both
are sealed and signed like every envelope, so the relay sees neither the
method nor the status, and a response is bound to its callee by the
signature.  The caller sets the call envelope's TTL to the deadline, so a call
to an offline device waits in its mailbox exactly as long as it is worth
answering.

This module is pure: the device shells (`client/calls.py`, `client/device.py`)
keep the outstanding calls and the correlation ids already answered.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import IntEnum

from . import canonical
from .envelope import Envelope
from .errors import CallRejectedError, DecodeError, InvalidFieldError
from .limits import DEFAULT_LIMITS, Limits

CORRELATION_ID_BYTES = 16
MAX_METHOD_CHARS = 64
# ASCII letters, digits and . _ / - : a method name is a name, never text to interpret.
_METHOD = re.compile(r"[A-Za-z0-9._/-]{1,64}")
_MAX_UINT64 = 2**64 - 1


class CallStatus(IntEnum):
    """A response's status; stable numbers, only ever appended (SPEC §18)."""

    OK = 0
    NOT_FOUND = 1  # the callee has no handler for the method
    ERROR = 2  # the handler failed; the body says only what the handler chose to say
    REFUSED = 3  # the callee will not run it now (too many calls running)
    TIMEOUT = 4  # the deadline passed at the callee (before or while it ran)


def check_method(method: object) -> str:
    """Raise InvalidFieldError unless `method` is 1..64 of A-Z a-z 0-9 . _ / -."""
    if type(method) is not str or not _METHOD.fullmatch(method):
        raise InvalidFieldError(f"a call's method must be 1..{MAX_METHOD_CHARS} of"
                                " A-Z a-z 0-9 . _ / -")
    return method


def _correlation_id(value: object, what: str) -> bytes:
    if type(value) is not bytes or len(value) != CORRELATION_ID_BYTES:
        raise InvalidFieldError(f"{what} correlation id must be {CORRELATION_ID_BYTES} bytes")
    return value


def _array(data: bytes, length: int, what: str, limits: Limits) -> list:
    value = canonical.decode(data, max_size=limits.max_envelope_bytes, what=what)
    if type(value) is not list or len(value) != length:
        raise DecodeError(f"{what} must be a CBOR array of {length} elements")
    return value


@dataclass(frozen=True)
class Call:
    """CALL (kind 10): `[correlation_id, method, deadline_ms, body]`.

    `deadline_ms` is in relay time (what envelopes are stamped with): the
    caller waits no longer, and the callee runs nothing after it.
    """

    correlation_id: bytes
    method: str
    deadline_ms: int
    body: bytes

    def encode(self) -> bytes:
        _correlation_id(self.correlation_id, "call")
        check_method(self.method)
        if type(self.body) is not bytes:
            raise InvalidFieldError("a call's body must be bytes")
        return canonical.encode([self.correlation_id, self.method, self.deadline_ms, self.body])

    @classmethod
    def decode(cls, data: bytes, limits: Limits = DEFAULT_LIMITS) -> Call:
        correlation_id, method, deadline_ms, body = _array(data, 4, "call", limits)
        if type(deadline_ms) is not int or not 0 <= deadline_ms <= _MAX_UINT64:
            raise InvalidFieldError("a call's deadline must be an unsigned integer")
        if type(body) is not bytes:
            raise InvalidFieldError("a call's body must be a byte string")
        return cls(_correlation_id(correlation_id, "call"), check_method(method), deadline_ms,
                   body)

    def check(self, envelope: Envelope, now_ms: int) -> None:
        """The callee's rule before running it (SPEC §18).

        InvalidFieldError if the deadline is outside its envelope's life (before
        it was created, or after it expires: the relay would have dropped it
        sooner than the caller said); CallRejectedError if `now_ms` is past the
        deadline.
        """
        if not envelope.created_at_ms <= self.deadline_ms <= envelope.expires_at_ms:
            raise InvalidFieldError(f"call deadline {self.deadline_ms} outside its envelope's"
                                    f" life [{envelope.created_at_ms}, {envelope.expires_at_ms}]")
        if now_ms > self.deadline_ms:
            raise CallRejectedError(f"call {self.correlation_id.hex()} is"
                                    f" {now_ms - self.deadline_ms} ms past its deadline")


@dataclass(frozen=True)
class Response:
    """RESPONSE (kind 11): `[correlation_id, status, body]`."""

    correlation_id: bytes
    status: CallStatus
    body: bytes

    def encode(self) -> bytes:
        _correlation_id(self.correlation_id, "response")
        if type(self.body) is not bytes:
            raise InvalidFieldError("a response's body must be bytes")
        return canonical.encode([self.correlation_id, int(CallStatus(self.status)), self.body])

    @classmethod
    def decode(cls, data: bytes, limits: Limits = DEFAULT_LIMITS) -> Response:
        correlation_id, status, body = _array(data, 3, "response", limits)
        if type(status) is not int:
            raise InvalidFieldError("a response's status must be an unsigned integer")
        try:
            known = CallStatus(status)
        except ValueError:
            raise InvalidFieldError(f"response status {status} is unknown") from None
        if type(body) is not bytes:
            raise InvalidFieldError("a response's body must be a byte string")
        return cls(_correlation_id(correlation_id, "response"), known, body)
