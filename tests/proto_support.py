"""Shared fixtures and hypothesis strategies for the proto tests.

Identities come from fixed seeds so a failing example is reproducible, and
`scripted_random` lets a test (and the vector generator) pin every "random"
byte `seal_envelope` asks for.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import cbor2
from hypothesis import strategies as st

from proto import canonical
from proto.envelope import Envelope, Kind, seal_envelope
from proto.keys import Identity

NOW_MS = 1_700_000_000_000
TTL_S = 3600


def identity(name: str) -> Identity:
    """A fixed identity per name: tests never depend on os.urandom."""
    return Identity(hashlib.blake2b(name.encode(), digest_size=32).digest())


ALICE = identity("alice")
BOB = identity("bob")
CAROL = identity("carol")
MALLORY = identity("mallory")


def counter_random(label: str) -> Callable[[int], bytes]:
    """Deterministic stand-in for os.urandom: BLAKE2b(label ‖ counter)."""
    counter = 0

    def random_bytes(n: int) -> bytes:
        nonlocal counter
        counter += 1
        return hashlib.blake2b(f"{label}/{counter}".encode(), digest_size=n).digest()

    return random_bytes


def make_envelope(plaintext: bytes = b"hello, device", *, sender: Identity = ALICE,
                  recipients: tuple[Identity, ...] = (BOB,), kind: Kind = Kind.DATA,
                  label: str = "env") -> Envelope:
    return seal_envelope(sender, kind, [r.public for r in recipients], plaintext,
                         ttl_s=TTL_S, now_ms=NOW_MS, random_bytes=counter_random(label))


def envelope_fields(env: Envelope) -> list:
    """The ten wire elements, rebuilt from the decoded object (not from `raw`)."""
    return [env.version, int(env.origin), env.msg_id, env.sender.raw, env.created_at_ms,
            env.ttl_s, env.ephemeral, [[r.key.raw, r.wrapped_key] for r in env.recipients],
            env.payload, env.signature]


def reencode(env: Envelope) -> bytes:
    return canonical.encode(envelope_fields(env))


# --- hypothesis strategies -------------------------------------------------

cbor_leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64), max_value=2**64 - 1)
    | st.binary(max_size=80)
    | st.text(max_size=24)
    | st.floats(allow_nan=False)
    | st.sampled_from([cbor2.undefined, cbor2.CBORSimpleValue(16),
                       cbor2.CBORTag(1, 0), cbor2.CBORTag(2, b"\x01" * 9)])
)

cbor_values = st.recursive(
    cbor_leaves,
    lambda children: st.lists(children, max_size=10)
    | st.dictionaries(st.text(max_size=6) | st.integers(0, 100), children, max_size=4),
    max_leaves=24,
)
"""Arbitrary CBOR-encodable values, including tags, maps and floats our messages never use."""


def encode_any(value: object) -> bytes:
    """Canonical encoding of an arbitrary value (cbor2 encodes CBORTag as a tag)."""
    return cbor2.dumps(value, canonical=True)


@st.composite
def mutations(draw: st.DrawFn, valid: bytes) -> bytes:
    """A valid message with bits flipped, truncated, extended or spliced."""
    data = bytearray(valid)
    choice = draw(st.sampled_from(["flip", "truncate", "extend", "overwrite", "insert"]))
    if choice == "flip":
        for _ in range(draw(st.integers(1, 4))):
            index = draw(st.integers(0, len(data) - 1))
            data[index] ^= 1 << draw(st.integers(0, 7))
    elif choice == "truncate":
        del data[draw(st.integers(0, len(data) - 1)):]
    elif choice == "extend":
        data += draw(st.binary(min_size=1, max_size=16))
    elif choice == "overwrite":
        index = draw(st.integers(0, len(data) - 1))
        chunk = draw(st.binary(min_size=1, max_size=8))
        data[index:index + len(chunk)] = chunk
    else:
        index = draw(st.integers(0, len(data)))
        data[index:index] = draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


@st.composite
def field_replacements(draw: st.DrawFn, fields: list) -> bytes:
    """A valid message's CBOR array with one element replaced by an arbitrary value."""
    index = draw(st.integers(0, len(fields) - 1))
    replaced = list(fields)
    replaced[index] = draw(cbor_values)
    return encode_any(replaced)
