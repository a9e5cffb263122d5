"""One exception hierarchy for everything that can be wrong on the wire.

Every error carries a stable numeric `ErrorCode`, because the relay reports
rejections to devices as error frames and a device written in C must be able
to act on the number without parsing English.  `error_for_code` turns a
received error frame back into the same exception type on the client side.
"""

from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    """Stable error codes carried in error frames; never renumber, only append."""

    MALFORMED = 1
    UNSUPPORTED_VERSION = 2
    OVERSIZE = 3
    BAD_SIGNATURE = 4
    WRONG_SENDER = 5
    REPLAY = 6
    STALE = 7
    RATE_LIMITED = 8
    MAILBOX_FULL = 9
    REVOKED = 10
    NOT_ENROLLED = 11
    STORE_UNAVAILABLE = 12
    UNAUTHENTICATED = 13
    INVALID_FIELD = 14
    UNEXPECTED_FRAME = 15
    DECRYPT_FAILED = 16
    INTERNAL = 17
    NOT_PEER = 18
    QUOTA_EXCEEDED = 19
    SUPERSEDED = 20
    ACCESS_LIST_UNAVAILABLE = 21
    PREKEY_EXPIRED = 22
    UNKNOWN_PREKEY = 23
    STREAM_REFUSED = 24
    PEER_UNREACHABLE = 25
    STREAM_LIMIT = 26
    STREAM_BROKEN = 27
    CALL_TIMEOUT = 30
    CALL_REJECTED = 31


class ProtocolError(Exception):
    """Base of every wire-level failure; `code` is what goes into an error frame."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class DecodeError(ProtocolError):
    """Bytes that are not a well-formed, canonical message of the expected shape."""

    code = ErrorCode.MALFORMED


class UnsupportedVersionError(DecodeError):
    code = ErrorCode.UNSUPPORTED_VERSION


class OversizeError(DecodeError):
    code = ErrorCode.OVERSIZE


class InvalidFieldError(DecodeError):
    """Well-formed CBOR whose field values break a rule (length, range, order)."""

    code = ErrorCode.INVALID_FIELD


class SignatureError(ProtocolError):
    code = ErrorCode.BAD_SIGNATURE


class DecryptError(ProtocolError):
    """The payload is not for us, or was altered; never raised by the relay."""

    code = ErrorCode.DECRYPT_FAILED


class WrongSenderError(ProtocolError):
    code = ErrorCode.WRONG_SENDER


class ReplayError(ProtocolError):
    code = ErrorCode.REPLAY


class StaleError(ProtocolError):
    code = ErrorCode.STALE


class RateLimitedError(ProtocolError):
    code = ErrorCode.RATE_LIMITED


class MailboxFullError(ProtocolError):
    code = ErrorCode.MAILBOX_FULL


class RevokedError(ProtocolError):
    code = ErrorCode.REVOKED


class NotEnrolledError(ProtocolError):
    code = ErrorCode.NOT_ENROLLED


class StoreUnavailableError(ProtocolError):
    code = ErrorCode.STORE_UNAVAILABLE


class UnauthenticatedError(ProtocolError):
    code = ErrorCode.UNAUTHENTICATED


class UnexpectedFrameError(ProtocolError):
    code = ErrorCode.UNEXPECTED_FRAME


class InternalError(ProtocolError):
    code = ErrorCode.INTERNAL


class NotPeerError(ProtocolError):
    """The oracle's peer groups do not let this sender write to that recipient."""

    code = ErrorCode.NOT_PEER


class QuotaExceededError(ProtocolError):
    """Storing this would exceed a byte budget (the sender's or the relay's); retry later."""

    code = ErrorCode.QUOTA_EXCEEDED


class SupersededError(ProtocolError):
    """A newer connection authenticated with the same key; this one is closed."""

    code = ErrorCode.SUPERSEDED


class AccessListUnavailableError(ProtocolError):
    """The relay holds no valid access list (none yet, or the one it has lapsed): it admits
    only the oracle until it has one again.  The relay's state, not the device's: retry,
    here later or at another relay."""

    code = ErrorCode.ACCESS_LIST_UNAVAILABLE


class PrekeyExpiredError(ProtocolError):
    """A signed prekey past its valid_until_ms: a sender must not seal to it, an oracle not
    take it, and a recipient refuses a wrap sealed to it after that instant (SPEC §5)."""

    code = ErrorCode.PREKEY_EXPIRED


class UnknownPrekeyError(ProtocolError):
    """A wrap names a prekey whose secret this device does not hold (never made, or deleted
    after its retention): local only, and never answered by trying the identity key."""

    code = ErrorCode.UNKNOWN_PREKEY


class StreamRefusedError(ProtocolError):
    """The peer declined to open the stream (no such service, not allowed, a non-peer):
    said by the peer's device, or by the relay for an answer that came too late (SPEC §16)."""

    code = ErrorCode.STREAM_REFUSED


class PeerUnreachableError(ProtocolError):
    """The stream's other end is connected to no relay of this deployment, or did not answer
    the open in time: nothing was stored, try again once it is online (SPEC §16)."""

    code = ErrorCode.PEER_UNREACHABLE


class StreamLimitError(ProtocolError):
    """A bound on streams was reached (open streams per device or relay, pending opens, the
    rate of opens): retry once a stream has ended (SPEC §16)."""

    code = ErrorCode.STREAM_LIMIT


class StreamBrokenError(ProtocolError):
    """The stream ended without both ends' FIN: the other end aborted, disconnected or
    reconnected, broke the flow-control rules, or a chunk did not open (altered, reordered,
    replayed, truncated).  Never resumed: what was not read by then is lost (SPEC §16)."""

    code = ErrorCode.STREAM_BROKEN


class CallTimeoutError(ProtocolError, TimeoutError):
    """Local only: a call got no response before its deadline: the callee was offline past
    it, did not answer in time, or its answer was lost (SPEC §18).  Also a TimeoutError."""

    code = ErrorCode.CALL_TIMEOUT


class CallRejectedError(ProtocolError):
    """Local only: a callee refuses to run a call past its deadline (SPEC §18)."""

    code = ErrorCode.CALL_REJECTED


_BY_CODE: dict[ErrorCode, type[ProtocolError]] = {
    cls.code: cls
    for cls in (
        DecodeError,
        UnsupportedVersionError,
        OversizeError,
        InvalidFieldError,
        SignatureError,
        DecryptError,
        WrongSenderError,
        ReplayError,
        StaleError,
        RateLimitedError,
        MailboxFullError,
        RevokedError,
        NotEnrolledError,
        StoreUnavailableError,
        UnauthenticatedError,
        UnexpectedFrameError,
        InternalError,
        NotPeerError,
        QuotaExceededError,
        SupersededError,
        AccessListUnavailableError,
        PrekeyExpiredError,
        UnknownPrekeyError,
        StreamRefusedError,
        PeerUnreachableError,
        StreamLimitError,
        StreamBrokenError,
        CallTimeoutError,
        CallRejectedError,
    )
}


def error_for_code(code: int, message: str) -> ProtocolError:
    """Rebuild the exception a peer reported; unknown codes become InternalError."""
    try:
        cls = _BY_CODE[ErrorCode(code)]
    except ValueError:
        return InternalError(f"unknown error code {code}: {message}")
    return cls(message)
