"""calls.json: alice calls "reboot" on bob and bob answers (SPEC §18), and what to refuse.

The call envelope's TTL is the call's timeout (30 s) and its deadline is
`created_at_ms + 30 000`; bob answers 250 ms later with status OK and a TTL of
the time left to the deadline (at least 30 s).  Every random byte is scripted,
so both envelopes are reproducible; the invalid entries are what every
implementation must refuse, each with its error code.
"""

from __future__ import annotations

from .. import canonical
from ..calls import CORRELATION_ID_BYTES, Call, CallStatus, Response
from ..envelope import Envelope, Kind, seal_envelope
from ..errors import ErrorCode
from .generate import CREATED_AT_MS, IDS, Script, _invalid, fill

TIMEOUT_S = 30
DEADLINE_MS = CREATED_AT_MS + TIMEOUT_S * 1000
ANSWERED_AT_MS = CREATED_AT_MS + 250
CORRELATION_ID = fill(0xCA, CORRELATION_ID_BYTES)
CALL = Call(CORRELATION_ID, "reboot", DEADLINE_MS, b'{"delay_s":5}')
RESPONSE = Response(CORRELATION_ID, CallStatus.OK, b'{"rebooting":true}')
_RANDOM_NAMES = ["msg_id", "ephemeral_seed", "content_key", "payload_nonce", "wrap_nonce"]


def _script(base: int) -> list[bytes]:
    return [fill(base, 16), fill(base + 1, 32), fill(base + 2, 32), fill(base + 3, 24),
            fill(base + 4, 24)]


def _sealed(sender: str, recipient: str, kind: Kind, plaintext: bytes, now_ms: int,
            ttl_s: int, base: int) -> tuple[Envelope, list[bytes]]:
    random = _script(base)
    envelope = seal_envelope(IDS[sender], kind, [IDS[recipient].public], plaintext,
                             ttl_s=ttl_s, now_ms=now_ms, random_bytes=Script(*random))
    return envelope, random


def _vector(envelope: Envelope, random: list[bytes], sender: str, recipient: str,
            kind: Kind, plaintext: bytes, fields: dict) -> dict:
    return {"sender": sender, "recipient": recipient, "kind": int(kind),
            "created_at_ms": envelope.created_at_ms, "ttl_s": envelope.ttl_s,
            "random": {name: chunk.hex() for name, chunk in zip(_RANDOM_NAMES, random)},
            "fields": fields, "plaintext": plaintext.hex(), "envelope": envelope.raw.hex()}


def call_vectors() -> dict:
    call, call_random = _sealed("alice", "bob", Kind.CALL, CALL.encode(), CREATED_AT_MS,
                                TIMEOUT_S, 0x70)
    response, response_random = _sealed("bob", "alice", Kind.RESPONSE, RESPONSE.encode(),
                                        ANSWERED_AT_MS, TIMEOUT_S, 0x78)
    return {
        "description": "alice calls \"reboot\" on bob (SPEC §18; keys in keys.json) and bob "
                       "answers OK. Each envelope lists the random bytes drawn in order "
                       "(envelopes.json shows every sealing step), the fields of its sealed "
                       "plaintext, the plaintext (after the kind byte) and the envelope. "
                       "`statuses`: the response status numbers. `invalid`: inputs to refuse: "
                       "`call` and `response` decode a plaintext; `call_check` decodes a "
                       "plaintext and applies the callee's rule for the call envelope of this "
                       "file at `now_ms`. `error` is the ErrorCode name that must result.",
        "statuses": {status.name: int(status) for status in CallStatus},
        "call": _vector(call, call_random, "alice", "bob", Kind.CALL, CALL.encode(),
                        {"correlation_id": CALL.correlation_id.hex(), "method": CALL.method,
                         "deadline_ms": CALL.deadline_ms, "body": CALL.body.hex()}),
        "response": _vector(response, response_random, "bob", "alice", Kind.RESPONSE,
                            RESPONSE.encode(),
                            {"correlation_id": RESPONSE.correlation_id.hex(),
                             "status": int(RESPONSE.status), "body": RESPONSE.body.hex()}),
        "invalid": _invalid_calls(),
    }


def _invalid_calls() -> list[dict]:
    fields = [CORRELATION_ID, CALL.method, DEADLINE_MS, CALL.body]
    answer = [CORRELATION_ID, 0, RESPONSE.body]

    def call(index: int, value: object) -> bytes:
        changed = list(fields)
        changed[index] = value
        return canonical.encode(changed)

    def response(index: int, value: object) -> bytes:
        changed = list(answer)
        changed[index] = value
        return canonical.encode(changed)

    encoded = CALL.encode()
    return [
        _invalid("a call cut short", "call", encoded[:-3], ErrorCode.MALFORMED),
        _invalid("a call without its body", "call", canonical.encode(fields[:3]),
                 ErrorCode.MALFORMED),
        _invalid("a call with a 15-byte correlation id", "call", call(0, CORRELATION_ID[:15]),
                 ErrorCode.INVALID_FIELD),
        _invalid("a call whose method has a space", "call", call(1, "re boot"),
                 ErrorCode.INVALID_FIELD),
        _invalid("a call whose method is 65 characters", "call", call(1, "r" * 65),
                 ErrorCode.INVALID_FIELD),
        _invalid("a call whose method is empty", "call", call(1, ""), ErrorCode.INVALID_FIELD),
        _invalid("a call whose method is a byte string", "call", call(1, b"reboot"),
                 ErrorCode.INVALID_FIELD),
        _invalid("a call whose deadline is negative", "call", call(2, -1),
                 ErrorCode.INVALID_FIELD),
        _invalid("a call whose body is text", "call", call(3, "{}"), ErrorCode.INVALID_FIELD),
        _invalid("a call checked 1 ms past its deadline", "call_check", encoded,
                 ErrorCode.CALL_REJECTED, now_ms=DEADLINE_MS + 1),
        _invalid("a call whose deadline is after its envelope expires", "call_check",
                 call(2, DEADLINE_MS + 1), ErrorCode.INVALID_FIELD, now_ms=CREATED_AT_MS),
        _invalid("a call whose deadline is before its envelope was created", "call_check",
                 call(2, CREATED_AT_MS - 1), ErrorCode.INVALID_FIELD, now_ms=CREATED_AT_MS),
        _invalid("a response cut short", "response", RESPONSE.encode()[:-1],
                 ErrorCode.MALFORMED),
        _invalid("a response with an unknown status", "response", response(1, 5),
                 ErrorCode.INVALID_FIELD),
        _invalid("a response whose status is a boolean", "response", response(1, False),
                 ErrorCode.INVALID_FIELD),
        _invalid("a response with a 17-byte correlation id", "response",
                 response(0, CORRELATION_ID + b"\x00"), ErrorCode.INVALID_FIELD),
        _invalid("a response without its body", "response", canonical.encode(answer[:2]),
                 ErrorCode.MALFORMED),
    ]
