"""Continuum wire format: pure bytes in, typed objects out, and back.

No sockets, no clocks, no asyncio: callers pass `now` in, so every rule here
is testable on its own and identical in the relay, the client and the oracle.
"""

from .envelope import (Contents, Envelope, Kind, Origin, Recipient, decode_envelope,
                       seal_envelope)
from .errors import ErrorCode, ProtocolError, error_for_code
from .keys import Identity, PublicKey
from .limits import DEFAULT_LIMITS, PROTOCOL_VERSION, Limits

__all__ = [
    "DEFAULT_LIMITS",
    "PROTOCOL_VERSION",
    "Contents",
    "Envelope",
    "ErrorCode",
    "Identity",
    "Kind",
    "Limits",
    "Origin",
    "ProtocolError",
    "PublicKey",
    "Recipient",
    "decode_envelope",
    "error_for_code",
    "seal_envelope",
]
