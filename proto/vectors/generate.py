"""Generate the JSON test vectors from fixed seeds and fixed "random" bytes.

Run `python -m proto.vectors.generate` to rewrite the files; `--check` only
compares.  Every value is produced by the real `proto` code with its
randomness pinned, so the files are the reference another implementation
(a device in C, say) reproduces byte for byte.  Byte strings are lower-case hex.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import sys
from collections.abc import Callable
from typing import TypeVar

import nacl.bindings

from .. import canonical
from ..access import (ACCESS_LIST_DOMAIN, ACCESS_REQUEST_DOMAIN, ORACLE_CLOCK_SKEW_MS, AccessList,
                      AccessRequest)
from ..envelope import (PAYLOAD_AAD_DOMAIN, SIGNING_DOMAIN, Contents, Envelope, Kind, Origin,
                        decode_envelope, seal_contents, seal_envelope)
from ..errors import ErrorCode
from ..channel import DETACHED_SUBPROTOCOL, FrameSealer, Layout
from ..frames import (Accepted, Ack, Challenge, Deliver, Error, Frame, Hello, Send, StreamData,
                      StreamFin, Welcome, decode_frame, encode_frame)
from ..handshake import (HANDSHAKE_FRAME_MAX_BYTES, HELLO_DOMAIN, WELCOME_DOMAIN, DeviceHandshake,
                         RelayHandshake, hello_signed_bytes, welcome_signed_bytes)
from ..keys import PUBLIC_PREFIX, SECRET_PREFIX, Identity
from ..limits import DEFAULT_LIMITS, PROTOCOL_VERSION
from ..payloads import ExpiryNotice, PeerChange, Receipt
from ..prekeys import SignedPrekey
from ..rotation import (KEY_ROTATION_DOMAIN, ORACLE_KEY_CHANGE_DOMAIN, KeyRotation,
                        OracleKeyChain, OracleKeyChange)
from ..sealing import COMMIT_DOMAIN, COMMITMENT_BYTES, PAYLOAD_NONCE_BYTES, padded_size
from . import VECTOR_DIR, weak_signatures

FrameT = TypeVar("FrameT", bound=Frame)

CREATED_AT_MS = 1_700_000_000_000
TTL_S = 86_400
SEEDS = {
    "alice": bytes(range(0x00, 0x20)),
    "bob": bytes(range(0x20, 0x40)),
    "carol": bytes(range(0x40, 0x60)),
    "relay": bytes(range(0x60, 0x80)),
    "oracle": bytes(range(0x80, 0xA0)),
}
EPOCH = 1_700_000_000_123
# The oracle's default access-list validity (oracle/settings.py): ten minutes.
VALIDITY_MS = 600_000
IDS = {name: Identity(seed) for name, seed in SEEDS.items()}


def fill(byte: int, length: int) -> bytes:
    """Obviously-not-random "random" bytes, easy to spot in a hex dump."""
    return bytes([byte]) * length


class Script:
    """A random_bytes stand-in that hands out prepared chunks in order."""

    def __init__(self, *chunks: bytes) -> None:
        self._chunks = list(chunks)

    def __call__(self, n: int) -> bytes:
        chunk = self._chunks.pop(0)
        if len(chunk) != n:
            raise AssertionError(f"script expected a request for {len(chunk)} bytes, got {n}")
        return chunk

    def done(self) -> None:
        if self._chunks:
            raise AssertionError(f"{len(self._chunks)} scripted chunks were not used")


def key_vectors() -> dict:
    keys = []
    for name, identity in IDS.items():
        secret64 = SEEDS[name] + identity.public.raw
        keys.append({
            "name": name,
            "seed": SEEDS[name].hex(),
            "public_key": identity.public.raw.hex(),
            "public_text": identity.public.text,
            "public_checksum": _checksum(b"", identity.public.raw).hex(),
            "secret_text": identity.secret_text(),
            "secret_checksum": _checksum(SECRET_PREFIX.encode("ascii"), SEEDS[name]).hex(),
            "x25519_public": nacl.bindings.crypto_sign_ed25519_pk_to_curve25519(
                identity.public.raw).hex(),
            "x25519_secret": nacl.bindings.crypto_sign_ed25519_sk_to_curve25519(secret64).hex(),
        })
    return {"description": "Ed25519 key pairs from fixed seeds, their text forms (checksums:"
                           " BLAKE2b-32 of the public key; of \"csk_\" ‖ seed) and the X25519"
                           " keys derived for sealing.", "keys": keys}


def _checksum(covered: bytes, raw: bytes) -> bytes:
    """The text form's checksum (over `covered` ‖ key), written out so the vector states it."""
    return hashlib.blake2b(covered + raw, digest_size=4).digest()


def _envelope_vector(name: str, sender: str, recipients: list[str], kind: Kind,
                     plaintext: bytes, fill_base: int,
                     prekeys: dict[str, SignedPrekey] | None = None) -> tuple[dict, Envelope]:
    """One envelope, every step written out; with `prekeys` (recipient name → its signed
    prekey) those wraps are sealed to the prekey and each entry says which (or null)."""
    ordered = sorted(recipients, key=lambda r: IDS[r].public)
    msg_id = fill(fill_base, 16)
    ephemeral_seed = fill(fill_base + 9, 32)
    content_key = fill(fill_base + 1, 32)
    payload_nonce = fill(fill_base + 2, 24)
    wrap_nonces = [fill(fill_base + 3 + i, 24) for i in range(len(ordered))]
    script = Script(msg_id, ephemeral_seed, content_key, payload_nonce, *wrap_nonces)
    env = seal_envelope(IDS[sender], kind, [IDS[r].public for r in recipients], plaintext,
                        ttl_s=TTL_S, now_ms=CREATED_AT_MS, random_bytes=script,
                        prekeys={IDS[r].public: p for r, p in (prekeys or {}).items()})
    script.done()
    aad = PAYLOAD_AAD_DOMAIN + canonical.encode(
        [PROTOCOL_VERSION, int(kind.origin), msg_id, env.sender.raw, CREATED_AT_MS, TTL_S,
         env.ephemeral, [IDS[r].public.raw for r in ordered]])
    contents = Contents(kind, plaintext).encode()
    vector = {
        "name": name,
        "sender": sender,
        "recipients": ordered,
        "kind": int(kind),
        "plaintext": plaintext.hex(),
        "random": {
            "msg_id": msg_id.hex(),
            "ephemeral_seed": ephemeral_seed.hex(),
            "content_key": content_key.hex(),
            "payload_nonce": payload_nonce.hex(),
            "wrap_nonces": [n.hex() for n in wrap_nonces],
        },
        "fields": {
            "version": env.version,
            "origin": int(env.origin),
            "msg_id": env.msg_id.hex(),
            "sender": env.sender.raw.hex(),
            "created_at_ms": env.created_at_ms,
            "ttl_s": env.ttl_s,
            "ephemeral": env.ephemeral.hex(),
            "recipients": [{"key": r.key.raw.hex(), "wrapped_key": r.wrapped_key.hex(),
                            **({"prekey_id": r.prekey_id} if prekeys is not None else {})}
                           for r in env.recipients],
            "payload": env.payload.hex(),
            "signature": env.signature.hex(),
        },
        "sealing": {
            "aad": aad.hex(),
            "contents": contents.hex(),
            "padded_contents_bytes": padded_size(len(contents)),
            "commitment": env.payload[PAYLOAD_NONCE_BYTES:PAYLOAD_NONCE_BYTES
                                      + COMMITMENT_BYTES].hex(),
            "ciphertext": env.payload[PAYLOAD_NONCE_BYTES + COMMITMENT_BYTES:].hex(),
            "wraps": [{"recipient": r, "nonce": n.hex(), "box": e.wrapped_key[24:].hex()}
                      for r, n, e in zip(ordered, wrap_nonces, env.recipients)],
        },
        "signed_bytes": env.signed_bytes().hex(),
        "content_hash": env.content_hash().hex(),
        "encoded": env.raw.hex(),
    }
    return vector, env


def envelope_vectors() -> dict:
    one, first = _envelope_vector("data_one_recipient", "alice", ["bob"], Kind.DATA,
                                  b"hello, bob", 0x10)
    two, _ = _envelope_vector("data_two_recipients", "alice", ["carol", "bob"], Kind.DATA,
                              b"hello, bob and carol", 0x20)
    receipt, _ = _envelope_vector("receipt_for_data_one_recipient", "bob", ["alice"],
                                  Kind.RECEIPT, Receipt.of(first).encode(), 0x30)
    notice, _ = _envelope_vector("expiry_notice_for_data_one_recipient", "relay", ["alice"],
                                 Kind.EXPIRY, ExpiryNotice.single(first.msg_id,
                                                                  IDS["bob"].public).encode(),
                                 0x40)
    return {
        "description": "Sealed and signed envelopes; randomness is given in `random` and is "
                       "consumed in the order msg_id, ephemeral_seed, content_key, "
                       "payload_nonce, wrap_nonces (one per recipient, recipients sorted by key). "
                       "`kind` is sealed: `contents` is its byte then the plaintext; the clear "
                       "`origin` is 2 (a relay's notice) for EXPIRY, else 1.",
        "signing_domain": SIGNING_DOMAIN.hex(),
        "payload_aad_domain": PAYLOAD_AAD_DOMAIN.hex(),
        "commit_domain": COMMIT_DOMAIN.hex(),
        "envelopes": [one, two, receipt, notice],
    }


def payload_vectors() -> dict:
    msg_id = fill(0x10, 16)
    peers = sorted([IDS["bob"].public, IDS["carol"].public])
    return {
        "description": "Plaintexts of RECEIPT, EXPIRY (one entry, and a batch) and PEER_CHANGE"
                       " envelopes.",
        "receipt": {"fields": {"msg_id": msg_id.hex(), "content_hash": fill(0x12, 32).hex()},
                    "encoded": Receipt(msg_id, fill(0x12, 32)).encode().hex()},
        "expiry_notice": {
            "fields": {"msg_id": msg_id.hex(), "recipient": IDS["bob"].public.raw.hex()},
            "encoded": ExpiryNotice.single(msg_id, IDS["bob"].public).encode().hex()},
        "expiry_notice_batch": {
            "fields": {"entries": [[msg_id.hex(), IDS["bob"].public.raw.hex()],
                                   [fill(0x11, 16).hex(), IDS["carol"].public.raw.hex()]]},
            "encoded": ExpiryNotice(((msg_id, IDS["bob"].public),
                                     (fill(0x11, 16), IDS["carol"].public))).encode().hex()},
        "peer_change": {
            "fields": {"epoch": EPOCH, "version": 7, "peers": [p.raw.hex() for p in peers]},
            "encoded": PeerChange(7, tuple(peers), EPOCH).encode().hex()},
    }


def _access_list() -> AccessList:
    """alice in group 0, bob in groups 0 and 1, carol revoked; signed by `oracle`."""
    return AccessList(EPOCH, 42, CREATED_AT_MS, CREATED_AT_MS + VALIDITY_MS, IDS["oracle"].public,
                      {IDS["alice"].public: frozenset({0}), IDS["bob"].public: frozenset({0, 1})},
                      frozenset({IDS["carol"].public}))


def _relay_request() -> AccessRequest:
    return AccessRequest(IDS["relay"].public, IDS["oracle"].public, CREATED_AT_MS + 5000,
                         fill(0xA1, 16))


def access_vectors() -> dict:
    access, request = _access_list(), _relay_request()
    encoded = access.sign(IDS["oracle"])
    *body, signature = canonical.decode(encoded, max_size=1 << 20, what="vector")
    header = request.authorization(IDS["relay"])
    token = base64.urlsafe_b64decode(header.split(" ", 1)[1] + "==")
    token_fields = canonical.decode(token, max_size=1 << 10, what="vector")
    return {
        "description": "The oracle's signed access list (oracle `oracle`) and a relay's signed "
                       "request for it (relay `relay`). Group numbers name groups within this "
                       "list only; two keys may write to each other if they share one.",
        "access_list_domain": ACCESS_LIST_DOMAIN.hex(),
        "access_request_domain": ACCESS_REQUEST_DOMAIN.hex(),
        "access_list": {
            "oracle": "oracle",
            "fields": {"epoch": access.epoch, "version": access.version,
                       "issued_at_ms": access.issued_at_ms,
                       "valid_until_ms": access.valid_until_ms,
                       "oracle_key": access.oracle.raw.hex(),
                       "enrolled": [{"key": k.raw.hex(), "groups": sorted(access.groups[k])}
                                    for k in sorted(access.groups)],
                       "revoked": [k.raw.hex() for k in sorted(access.revoked)]},
            "shares_group": [
                {"sender": "alice", "recipient": "bob", "shares": True},
                {"sender": "bob", "recipient": "alice", "shares": True},
                {"sender": "alice", "recipient": "carol", "shares": False},
                {"sender": "relay", "recipient": "alice", "shares": False},
            ],
            "signed_bytes": (ACCESS_LIST_DOMAIN + canonical.encode(body)).hex(),
            "signature": signature.hex(),
            "encoded": encoded.hex()},
        "relay_request": {
            "relay": "relay",
            "oracle": "oracle",
            "fields": {"relay_key": request.relay.raw.hex(), "oracle_key": request.oracle.raw.hex(),
                       "issued_at_ms": request.issued_at_ms, "nonce": request.nonce.hex()},
            "signed_bytes": (ACCESS_REQUEST_DOMAIN + canonical.encode(token_fields[:-1])).hex(),
            "signature": token_fields[-1].hex(),
            "token": token.hex(),
            "authorization": header,
            "max_skew_ms": ORACLE_CLOCK_SKEW_MS},
    }



# The keys alice and the oracle rotate to; listed in rotation.json with their seeds.
NEXT_SEEDS = {"alice_next": bytes(range(0xA0, 0xC0)), "oracle_next": bytes(range(0xC0, 0xE0))}
NEXT_IDS = {name: Identity(seed) for name, seed in NEXT_SEEDS.items()}
ROTATED_AT_MS = CREATED_AT_MS + 60_000
DRAIN_UNTIL_MS = ROTATED_AT_MS + 604_800_000


def _change_vector(change: KeyRotation | OracleKeyChange, old: str, new: str) -> dict:
    return {"old": old, "new": new,
            "fields": {"old_key": change.old.raw.hex(), "new_key": change.new.raw.hex(),
                       "issued_at_ms": change.issued_at_ms},
            "signed_bytes": change.signed_bytes().hex(),
            "old_signature": change.old_signature.hex(),
            "new_signature": change.new_signature.hex(), "encoded": change.encode().hex()}


def _oracle_chain() -> OracleKeyChain:
    return OracleKeyChain().extended(
        OracleKeyChange.sign(IDS["oracle"], NEXT_IDS["oracle_next"], ROTATED_AT_MS))


def _rotated_access_list() -> AccessList:
    """After both rotations: alice_next in alice's groups, alice draining, signed by oracle_next."""
    return AccessList(EPOCH + 1, 43, ROTATED_AT_MS, ROTATED_AT_MS + VALIDITY_MS,
                      NEXT_IDS["oracle_next"].public,
                      {NEXT_IDS["alice_next"].public: frozenset({0}),
                       IDS["bob"].public: frozenset({0, 1})},
                      frozenset({IDS["carol"].public}), {IDS["alice"].public: DRAIN_UNTIL_MS},
                      _oracle_chain())


def rotation_vectors() -> dict:
    rotation = KeyRotation.sign(IDS["alice"], NEXT_IDS["alice_next"], ROTATED_AT_MS)
    chain = _oracle_chain()
    access = _rotated_access_list()
    encoded = access.sign(NEXT_IDS["oracle_next"])
    *body, signature = canonical.decode(encoded, max_size=1 << 20, what="vector")
    return {
        "description": "Key rotation (SPEC §15): device `alice` moves to `alice_next` (the "
                       "statement she sends the oracle), the oracle moves from `oracle` to "
                       "`oracle_next` (its key chain), and the access list after both, signed "
                       "by `oracle_next` and verified by a relay that trusts `oracle`.",
        "key_rotation_domain": KEY_ROTATION_DOMAIN.hex(),
        "oracle_key_change_domain": ORACLE_KEY_CHANGE_DOMAIN.hex(),
        "keys": [{"name": name, "seed": NEXT_SEEDS[name].hex(),
                  "public_key": identity.public.raw.hex(), "public_text": identity.public.text}
                 for name, identity in NEXT_IDS.items()],
        "key_rotation": _change_vector(rotation, "alice", "alice_next"),
        "oracle_key_chain": {"links": [_change_vector(link, "oracle", "oracle_next")
                                       for link in chain.links],
                             "encoded": chain.encode().hex()},
        "access_list": {
            "trusted": "oracle",
            "oracle": "oracle_next",
            "fields": {"epoch": access.epoch, "version": access.version,
                       "issued_at_ms": access.issued_at_ms,
                       "valid_until_ms": access.valid_until_ms,
                       "oracle_key": access.oracle.raw.hex(),
                       "enrolled": [{"key": k.raw.hex(), "groups": sorted(access.groups[k])}
                                    for k in sorted(access.groups)],
                       "revoked": [k.raw.hex() for k in sorted(access.revoked)],
                       "draining": [{"key": k.raw.hex(), "until_ms": access.draining[k]}
                                    for k in sorted(access.draining)]},
            "signed_bytes": (ACCESS_LIST_DOMAIN + canonical.encode(body)).hex(),
            "signature": signature.hex(),
            "encoded": encoded.hex()},
    }


def _invalid_rotation() -> list[dict]:
    """Rotation statements, chains and rotated access lists to refuse (`key_rotation`,
    `oracle_key_chain`: decode; `access_list`: verify for `oracle`)."""
    alice, alice_next, carol = IDS["alice"], NEXT_IDS["alice_next"], IDS["carol"]
    oracle, oracle_next = IDS["oracle"], NEXT_IDS["oracle_next"]
    rotation = KeyRotation.sign(alice, alice_next, ROTATED_AT_MS)
    by_carol = rotation.to_value()
    by_carol[3] = carol.sign(rotation.signed_bytes())
    unproven = rotation.to_value()
    unproven[4] = carol.sign(rotation.signed_bytes())
    gap = OracleKeyChange.sign(carol, IDS["bob"], ROTATED_AT_MS + 1)
    access = _rotated_access_list()
    body = canonical.decode(access.sign(oracle_next), max_size=1 << 20, what="vector")[:-1]
    plain = [*body[:4], oracle.public.raw, *body[5:7], [], []]
    enrolled_draining = [*body[:7], [[alice_next.public.raw, DRAIN_UNTIL_MS]], body[8]]
    forged_chain = [*body[:8], [OracleKeyChange.sign(carol, oracle_next, 1).to_value()]]
    return [
        _invalid("key rotation whose old-key signature is carol's", "key_rotation",
                 canonical.encode(by_carol), ErrorCode.BAD_SIGNATURE),
        _invalid("key rotation whose new-key signature is carol's", "key_rotation",
                 canonical.encode(unproven), ErrorCode.BAD_SIGNATURE),
        _invalid("oracle key change passed off as a key rotation", "key_rotation",
                 OracleKeyChange.sign(alice, alice_next, ROTATED_AT_MS).encode(),
                 ErrorCode.BAD_SIGNATURE),
        _invalid("key rotation to the same key", "key_rotation",
                 canonical.encode([alice.public.raw, *rotation.to_value()[0:1],
                                   *rotation.to_value()[2:]]), ErrorCode.INVALID_FIELD),
        _invalid("oracle key chain with a gap", "oracle_key_chain",
                 canonical.encode([_oracle_chain().links[0].to_value(), gap.to_value()]),
                 ErrorCode.INVALID_FIELD),
        _invalid("rotated access list with neither draining keys nor key changes",
                 "access_list", _signed_list(plain, oracle), ErrorCode.INVALID_FIELD),
        _invalid("rotated access list with a key both enrolled and draining", "access_list",
                 _signed_list(enrolled_draining, oracle_next), ErrorCode.INVALID_FIELD),
        _invalid("access list of a key whose chain `oracle` never signed", "access_list",
                 _signed_list(forged_chain, oracle_next), ErrorCode.BAD_SIGNATURE),
    ]


def handshake_vectors() -> dict:
    relay, device = IDS["relay"], IDS["alice"]
    relay_nonce, client_nonce = fill(0xC1, 32), fill(0xC2, 32)
    relay_seed, device_seed = fill(0xC3, 32), fill(0xC4, 32)
    server_time_ms = CREATED_AT_MS + 1234
    # Both state machines run the exchange, so the vectors are exactly what they send.
    relay_side = RelayHandshake(relay, relay_nonce, relay_seed, DEFAULT_LIMITS)
    device_side = DeviceHandshake(device, client_nonce, device_seed,
                                  DEFAULT_LIMITS.max_envelope_bytes)
    challenge_bytes = relay_side.challenge()
    hello_bytes = device_side.receive_challenge(challenge_bytes)
    relay_side.receive_hello(hello_bytes)
    welcome_bytes, terms = relay_side.welcome(server_time_ms)
    device_side.receive_welcome(welcome_bytes)
    challenge = _decoded(challenge_bytes, Challenge)
    hello, welcome = _decoded(hello_bytes, Hello), _decoded(welcome_bytes, Welcome)
    envelope = bytes.fromhex(envelope_vectors()["envelopes"][0]["encoded"])
    msg_id = decode_envelope(envelope).msg_id
    frames: dict[str, Frame] = {
        "send": Send(envelope),
        "accepted": Accepted(msg_id),
        "error_replay": Error(msg_id, int(ErrorCode.REPLAY), "already stored"),
        "error_no_msg_id": Error(None, int(ErrorCode.UNAUTHENTICATED), "hello timed out"),
        "deliver": Deliver("7", envelope),
        "ack": Ack("7"),
        # Chunks as a stream carries them (the channel neither knows nor checks their keys).
        "stream_data": StreamData(fill(0xC5, 16), fill(0xC6, 300)),
        "stream_fin": StreamFin(fill(0xC5, 16), fill(0xC7, 17)),
    }
    # The channel after WELCOME: the device's first two frames and the relay's first two.
    device_send, _ = terms.channel.for_device()
    relay_send, _ = terms.channel.for_relay()
    sealed = {"device_to_relay": [device_send.seal(encode_frame(f)).hex()
                                  for f in (frames["send"], frames["ack"])],
              "relay_to_device": [relay_send.seal(encode_frame(f)).hex()
                                  for f in (frames["accepted"], frames["deliver"])]}
    # The same channel on a connection that negotiated the detached layout (SPEC §8).
    device_send, _ = terms.channel.for_device()
    relay_send, _ = terms.channel.for_relay()
    detached = {"subprotocol": DETACHED_SUBPROTOCOL,
                "device_to_relay": [FrameSealer(device_send, Layout.DETACHED).seal(f).hex()
                                    for f in (frames["send"], frames["stream_data"])],
                "relay_to_device": [FrameSealer(relay_send, Layout.DETACHED).seal(f).hex()
                                    for f in (frames["stream_data"], frames["stream_fin"])]}
    return {
        "description": "A handshake between device `alice` and relay `relay`, the sealed "
                       "channel it opens (in both layouts), and one frame of every other type.",
        "device": "alice",
        "relay": "relay",
        "hello_domain": HELLO_DOMAIN.hex(),
        "welcome_domain": WELCOME_DOMAIN.hex(),
        "challenge": {"protocol_version": PROTOCOL_VERSION, "relay_nonce": relay_nonce.hex(),
                      "relay_key": relay.public.raw.hex(),
                      "relay_ephemeral_seed": relay_seed.hex(),
                      "relay_ephemeral": challenge.relay_ephemeral.hex(),
                      "encoded": challenge_bytes.hex()},
        "hello": {"device_key": device.public.raw.hex(), "client_nonce": client_nonce.hex(),
                  "device_ephemeral_seed": device_seed.hex(),
                  "device_ephemeral": hello.device_ephemeral.hex(),
                  "signed_bytes": hello_signed_bytes(challenge, device.public, client_nonce,
                                                     hello.device_ephemeral).hex(),
                  "signature": hello.signature.hex(), "encoded": hello_bytes.hex()},
        "welcome": {"server_time_ms": server_time_ms,
                    "max_envelope_bytes": DEFAULT_LIMITS.max_envelope_bytes,
                    "signed_bytes": welcome_signed_bytes(
                        challenge, hello, server_time_ms,
                        DEFAULT_LIMITS.max_envelope_bytes).hex(),
                    "signature": welcome.relay_signature.hex(),
                    "encoded": welcome_bytes.hex()},
        "channel": {"device_to_relay_key": terms.channel.device_to_relay.hex(),
                    "relay_to_device_key": terms.channel.relay_to_device.hex(),
                    "sealed_frames": sealed, "detached_frames": detached},
        "frames": {name: encode_frame(frame).hex() for name, frame in frames.items()},
    }


def _decoded(data: bytes, cls: type[FrameT]) -> FrameT:
    frame = decode_frame(data, HANDSHAKE_FRAME_MAX_BYTES)
    assert isinstance(frame, cls)
    return frame


def _invalid(name: str, check: str, data: bytes | str, error: ErrorCode, **extra: object) -> dict:
    entry: dict = {"name": name, "check": check}
    entry["text" if isinstance(data, str) else "hex"] = (
        data if isinstance(data, str) else data.hex())
    entry.update(extra)
    entry["error"] = error.name
    return entry


def _reencoded(fields: list, **changes: object) -> bytes:
    index = {"version": 0, "origin": 1, "msg_id": 2, "created_at_ms": 4, "ttl_s": 5,
             "ephemeral": 6, "recipients": 7}
    changed = list(fields)
    for name, value in changes.items():
        changed[index[name]] = value
    return canonical.encode(changed)


def _wire_fields(env: Envelope) -> list:
    return [env.version, int(env.origin), env.msg_id, env.sender.raw, env.created_at_ms,
            env.ttl_s, env.ephemeral, [[r.key.raw, r.wrapped_key] for r in env.recipients],
            env.payload, env.signature]


def _with_payload(fields: list, signer: Identity, payload: bytes) -> bytes:
    """The same envelope with another payload, properly signed again by its sender."""
    changed = list(fields)
    changed[8] = payload
    changed[9] = signer.sign(SIGNING_DOMAIN + canonical.encode(changed[:9]))
    return canonical.encode(changed)


def _resign_as(fields: list, signer: Identity) -> bytes:
    """Another sender's ciphertext, recipients and header claimed and signed by `signer`."""
    changed = list(fields)
    changed[3] = signer.public.raw
    changed[9] = signer.sign(SIGNING_DOMAIN + canonical.encode(changed[:9]))
    return canonical.encode(changed)


def _signed_list(body: list, signer: Identity) -> bytes:
    return canonical.encode([*body, signer.sign(ACCESS_LIST_DOMAIN + canonical.encode(body))])


def _signed_token(body: list, signer: Identity) -> str:
    token = canonical.encode([*body, signer.sign(ACCESS_REQUEST_DOMAIN + canonical.encode(body))])
    return "Continuum-Relay " + base64.urlsafe_b64encode(token).rstrip(b"=").decode()


def _invalid_access() -> list[dict]:
    """Access lists and relay tokens to refuse (`access_list`: verify for `oracle`;
    `relay_token`: verify for `oracle` at `now_ms`)."""
    oracle, relay = IDS["oracle"], IDS["relay"]
    encoded = _access_list().sign(oracle)
    body = canonical.decode(encoded, max_size=1 << 20, what="vector")[:-1]
    enrolled = [list(entry) for entry in body[5]]
    enrolled[-1][1] = [1, 0]
    unsorted_groups = [*body[:5], enrolled, body[6]]
    before_expiry = [*body[:3], *body[4:]]  # the layout before valid_until_ms
    no_validity = [*body[:3], body[2], *body[4:]]  # valid_until_ms == issued_at_ms
    request = _relay_request()
    token_body = [request.relay.raw, request.oracle.raw, request.issued_at_ms, request.nonce]
    now = request.issued_at_ms
    return [
        _invalid("access list signed by another key", "access_list",
                 _signed_list(body, IDS["carol"]), ErrorCode.BAD_SIGNATURE),
        _invalid("access list with a key's groups out of order", "access_list",
                 _signed_list(unsorted_groups, oracle), ErrorCode.INVALID_FIELD),
        _invalid("access list in the layout before epochs", "access_list",
                 _signed_list(before_expiry[1:], oracle), ErrorCode.MALFORMED),
        _invalid("access list in the layout before valid_until_ms", "access_list",
                 _signed_list(before_expiry, oracle), ErrorCode.MALFORMED),
        _invalid("access list valid until the instant it was issued", "access_list",
                 _signed_list(no_validity, oracle), ErrorCode.INVALID_FIELD),
        _invalid("relay token signed by another key", "relay_token",
                 _signed_token(token_body, IDS["carol"]), ErrorCode.BAD_SIGNATURE, now_ms=now),
        _invalid("relay token for another oracle", "relay_token",
                 _signed_token([relay.public.raw, IDS["carol"].public.raw, *token_body[2:]], relay),
                 ErrorCode.UNAUTHENTICATED, now_ms=now),
        _invalid("relay token a minute and a millisecond old", "relay_token",
                 _signed_token(token_body, relay), ErrorCode.STALE,
                 now_ms=now + ORACLE_CLOCK_SKEW_MS + 1),
        _invalid("bearer token instead of a relay token", "relay_token",
                 "Bearer " + "a" * 40, ErrorCode.UNAUTHENTICATED, now_ms=now),
    ]


def _sealed(sender: str, origin: Origin, contents: bytes, recipient: str,
            fill_base: int) -> bytes:
    """An envelope with any origin and sealed contents, from fixed "random" bytes."""
    script = Script(fill(fill_base, 16), fill(fill_base + 9, 32), fill(fill_base + 1, 32),
                    fill(fill_base + 2, 24), fill(fill_base + 3, 24))
    env = seal_contents(IDS[sender], origin, contents, [IDS[recipient].public], ttl_s=TTL_S,
                        now_ms=CREATED_AT_MS, random_bytes=script)
    script.done()
    return env.raw


def _invalid_contents() -> list[dict]:
    """Envelopes whose sealed kind is unknown or disagrees with their clear origin: each is
    signed and sealed properly, so only the recipient, after opening, can refuse it; and
    a relay's notice a device sends."""
    notice = ExpiryNotice.single(fill(0x10, 16), IDS["bob"].public).encode()
    return [
        _invalid("relay origin with DATA sealed inside", "envelope_open",
                 _sealed("relay", Origin.RELAY, Contents(Kind.DATA, b"hi").encode(), "alice",
                         0x50), ErrorCode.INVALID_FIELD, open_as="alice"),
        _invalid("device origin with an EXPIRY notice sealed inside", "envelope_open",
                 _sealed("alice", Origin.DEVICE, Contents(Kind.EXPIRY, notice).encode(), "bob",
                         0x60), ErrorCode.INVALID_FIELD, open_as="bob"),
        _invalid("unknown sealed kind 255", "envelope_open",
                 _sealed("alice", Origin.DEVICE, b"\xffhi", "bob", 0x70),
                 ErrorCode.INVALID_FIELD, open_as="bob"),
        _invalid("no sealed kind (empty contents)", "envelope_open",
                 _sealed("alice", Origin.DEVICE, b"", "bob", 0x80),
                 ErrorCode.INVALID_FIELD, open_as="bob"),
        _invalid("a relay's notice sent by a device", "send",
                 _sealed("alice", Origin.RELAY, Contents(Kind.EXPIRY, notice).encode(), "bob",
                         0x90), ErrorCode.INVALID_FIELD),
    ]


def _invalid_signatures() -> list[dict]:
    """Signatures for which Ed25519's equation holds but the key validity rule (SPEC §3)
    refuses them (`signature`: verify `hex` under `public_key`), built by `weak_signatures`
    from fixed inputs."""
    alice_seed, alice = SEEDS["alice"], IDS["alice"].public.raw

    def numbered(text: bytes) -> Callable[[bytes, int], bytes]:
        return lambda _key, attempt: b"%s %d" % (text, attempt)

    mixed, mixed_message, mixed_signature = weak_signatures.mixed_order_signature(
        alice_seed, numbered(b"open valve"))
    r = fill(0x07, 32)
    order_8_message, order_8_signature = weak_signatures.vanishing_key_signature(
        weak_signatures.ORDER_8, 8, r, numbered(b"small-order key"))
    neutral_message, neutral_signature = weak_signatures.vanishing_key_signature(
        weak_signatures.NEUTRAL_NON_CANONICAL, 1, r, numbered(b"non-canonical key"))
    small_r_message, large_s_message = b"small-order R", b"non-canonical S"
    e = ErrorCode.BAD_SIGNATURE
    return [
        _invalid("public key with a small-order component (A + T8); libsodium alone accepts",
                 "signature", mixed_message, e, public_key=mixed.hex(),
                 signature=mixed_signature.hex()),
        _invalid("public key of order 8", "signature", order_8_message, e,
                 public_key=weak_signatures.ORDER_8.hex(), signature=order_8_signature.hex()),
        _invalid("non-canonical public key (the neutral element as y = p + 1)", "signature",
                 neutral_message, e, public_key=weak_signatures.NEUTRAL_NON_CANONICAL.hex(),
                 signature=neutral_signature.hex()),
        _invalid("signature with a small-order R (the neutral element)", "signature",
                 small_r_message, e, public_key=alice.hex(),
                 signature=weak_signatures.small_order_r_signature(alice_seed,
                                                                   small_r_message).hex()),
        _invalid("signature with a non-canonical S (S + L)", "signature", large_s_message, e,
                 public_key=alice.hex(), signature=weak_signatures.non_canonical_s(
                     IDS["alice"].sign(large_s_message)).hex()),
    ]


def invalid_vectors() -> dict:
    """Inputs every implementation must refuse, each with the error code it must report."""
    envelopes = envelope_vectors()["envelopes"]
    one, two = (bytes.fromhex(envelopes[i]["encoded"]) for i in (0, 1))
    fields, fields_two = _wire_fields(decode_envelope(one)), _wire_fields(decode_envelope(two))
    flipped = bytearray(one)
    flipped[-100] ^= 0x01  # inside the payload ciphertext
    hello = bytearray(bytes.fromhex(handshake_vectors()["hello"]["encoded"]))
    hello[-1] ^= 0x80
    alice_text = IDS["alice"].public.text
    last_char_typo = alice_text[:-1] + chr(ord(alice_text[-1]) ^ 1)
    msg_id = fill(0x10, 16)
    bob, carol = IDS["bob"].public.raw, IDS["carol"].public.raw
    m = ErrorCode.MALFORMED
    entries = [
        _invalid("empty input", "envelope", b"", m),
        _invalid("truncated by one byte", "envelope", one[:-1], m),
        _invalid("trailing zero byte", "envelope", one + b"\x00", m),
        _invalid("version as a non-shortest integer", "envelope",
                 bytes.fromhex("891801") + one[2:], m),
        _invalid("indefinite-length outer array", "envelope",
                 b"\x9f" + one[1:] + b"\xff", m),
        _invalid("self-described CBOR tag 55799", "envelope", bytes.fromhex("d9d9f7") + one, m),
        _invalid("created_at_ms as a bignum (tag 2)", "envelope",
                 _reencoded(fields, created_at_ms=2**64), m),
        _invalid("nine elements (no signature)", "envelope", canonical.encode(fields[:9]), m),
        _invalid("a map instead of an array", "envelope", canonical.encode({1: 1}), m),
        _invalid("version 1 (an envelope of the first protocol)", "envelope",
                 _reencoded(fields, version=1), ErrorCode.UNSUPPORTED_VERSION),
        _invalid("version 3", "envelope", _reencoded(fields, version=3),
                 ErrorCode.UNSUPPORTED_VERSION),
        _invalid("larger than the receiver's limit", "envelope", one, ErrorCode.OVERSIZE,
                 max_bytes=len(one) - 1),
        _invalid("version as a float", "envelope", _reencoded(fields, version=1.0),
                 ErrorCode.INVALID_FIELD),
        _invalid("unknown origin 3", "envelope", _reencoded(fields, origin=3),
                 ErrorCode.INVALID_FIELD),
        _invalid("origin 0", "envelope", _reencoded(fields, origin=0), ErrorCode.INVALID_FIELD),
        _invalid("msg_id of 15 bytes", "envelope", _reencoded(fields, msg_id=msg_id[:15]),
                 ErrorCode.INVALID_FIELD),
        _invalid("ttl_s of 0", "envelope", _reencoded(fields, ttl_s=0), ErrorCode.INVALID_FIELD),
        _invalid("no recipients", "envelope", _reencoded(fields, recipients=[]),
                 ErrorCode.INVALID_FIELD),
        _invalid("recipients not sorted by key", "envelope",
                 _reencoded(fields_two, recipients=list(reversed(fields_two[7]))),
                 ErrorCode.INVALID_FIELD),
        _invalid("payload bit flipped", "envelope_verify", bytes(flipped),
                 ErrorCode.BAD_SIGNATURE),
        _invalid("signed by carol, claiming alice", "envelope_verify",
                 canonical.encode([*fields[:9], IDS["carol"].sign(
                     SIGNING_DOMAIN + canonical.encode(fields[:9]))]),
                 ErrorCode.BAD_SIGNATURE),
        _invalid("commitment that does not match the content key (re-signed)", "envelope_open",
                 _with_payload(fields, IDS["alice"], bytes([fields[8][0]]) + fields[8][1:24]
                               + bytes([fields[8][24] ^ 1]) + fields[8][25:]),
                 ErrorCode.DECRYPT_FAILED, open_as="bob"),
        _invalid("opened by a key that is not a recipient", "envelope_open", one,
                 ErrorCode.DECRYPT_FAILED, open_as="carol"),
        _invalid("alice's ciphertext re-signed by carol as sender", "envelope_open",
                 _resign_as(fields, IDS["carol"]), ErrorCode.DECRYPT_FAILED, open_as="bob"),
        *_invalid_contents(),
        _invalid("unknown frame type 9", "frame", canonical.encode([9, b""]), m),
        _invalid("SEND frame with a second field", "frame", canonical.encode([4, b"", b""]), m),
        _invalid("CHALLENGE of a protocol 1 relay (three fields)", "frame",
                 canonical.encode([1, 1, fill(0xC1, 32), IDS["relay"].public.raw]),
                 ErrorCode.UNSUPPORTED_VERSION),
        _invalid("HELLO of a protocol 1 device (three fields)", "hello_verify",
                 canonical.encode([2, IDS["alice"].public.raw, fill(0xC2, 32), bytes(64)]), m),
        _invalid("ACCEPTED with a 15-byte msg_id", "frame", canonical.encode([5, msg_id[:15]]),
                 ErrorCode.INVALID_FIELD),
        _invalid("ACK tag of 65 characters", "frame", canonical.encode([8, "t" * 65]),
                 ErrorCode.INVALID_FIELD),
        _invalid("SEND frame over the frame limit", "frame", encode_frame(Send(one)),
                 ErrorCode.OVERSIZE, max_bytes=len(one)),
        _invalid("HELLO with a flipped signature bit", "hello_verify", bytes(hello),
                 ErrorCode.BAD_SIGNATURE),
        _invalid("receipt msg_id of 15 bytes", "receipt",
                 canonical.encode([msg_id[:15], bytes(32)]),
                 ErrorCode.INVALID_FIELD),
        _invalid("expiry notice with trailing byte", "expiry_notice",
                 ExpiryNotice.single(msg_id, IDS["bob"].public).encode() + b"\x00", m),
        _invalid("expiry notice batch of one entry (must use the single form)", "expiry_notice",
                 canonical.encode([[msg_id, IDS["bob"].public.raw]]), ErrorCode.INVALID_FIELD),
        _invalid("peer change with unsorted peers", "peer_change",
                 canonical.encode([EPOCH, 1, sorted([bob, carol], reverse=True)]),
                 ErrorCode.INVALID_FIELD),
        _invalid("peer change in the layout before epochs", "peer_change",
                 canonical.encode([1, sorted([bob, carol])]), m),
        *_invalid_access(),
        *_invalid_rotation(),
        _invalid("public key with a typo", "public_key_text",
                 alice_text[:10] + ("a" if alice_text[10] != "a" else "b") + alice_text[11:],
                 ErrorCode.INVALID_FIELD),
        _invalid("public key with a typo in the unused bits of the last character",
                 "public_key_text", last_char_typo, ErrorCode.INVALID_FIELD),
        _invalid("secret key text where a public key belongs", "public_key_text",
                 IDS["alice"].secret_text(), ErrorCode.INVALID_FIELD),
        _invalid("a secret key's body after the public prefix", "public_key_text",
                 PUBLIC_PREFIX + IDS["alice"].secret_text()[len(SECRET_PREFIX):],
                 ErrorCode.INVALID_FIELD),
        _invalid("a public key's body after the secret prefix", "secret_key_text",
                 SECRET_PREFIX + alice_text[len(PUBLIC_PREFIX):], ErrorCode.INVALID_FIELD),
        *_invalid_signatures(),
    ]
    return {
        "description": "Inputs that must be refused. `check` names the operation: envelope "
                       "(decode), envelope_verify (decode then verify), envelope_open "
                       "(decode, verify, open as `open_as`), frame, hello_verify (decode a "
                       "HELLO and verify it against handshake.json's challenge), receipt, "
                       "expiry_notice, peer_change, public_key_text, secret_key_text, send "
                       "(decode as a relay decodes a SEND's envelope), signature (verify the "
                       "message `hex` under `public_key`), access_list (verify for "
                       "key `oracle`), relay_token (an Authorization value, verified for key "
                       "`oracle` at `now_ms`), key_rotation and oracle_key_chain (decode, "
                       "signatures included; keys in rotation.json). `max_bytes` overrides "
                       "the size limit. `error` is the ErrorCode name that must result.",
        "invalid": entries,
    }


def prekey_vectors() -> dict:
    """prekeys.json, built in its own module from this one's keys and helpers."""
    from .prekey_vectors import prekey_vectors as build_prekeys
    return build_prekeys()


def stream_vectors() -> dict:
    """streams.json, built in its own module (SPEC §16)."""
    from .stream_vectors import stream_vectors as build_streams
    return build_streams()
def transfer_vectors() -> dict:
    """transfers.json (SPEC §17), built in its own module."""
    from .transfer_vectors import transfer_vectors as build_transfers
    return build_transfers()


def region_vectors() -> dict:
    """regions.json (SPEC §19), built in its own module like prekeys.json."""
    from .region_vectors import region_vectors as build_regions
    return build_regions()


def presence_vectors() -> dict:
    """presence.json (SPEC §20), built in its own module."""
    from .presence_vectors import presence_vectors as build_presence
    return build_presence()


def call_vectors() -> dict:
    """calls.json (SPEC §18), built in its own module."""
    from .call_vectors import call_vectors as build_calls
    return build_calls()
def config_vectors() -> dict:
    """config.json (SPEC §21), built in its own module."""
    from .config_vectors import config_vectors as build_config
    return build_config()


BUILDERS: dict[str, Callable[[], dict]] = {
    "keys": key_vectors,
    "envelopes": envelope_vectors,
    "payloads": payload_vectors,
    "handshake": handshake_vectors,
    "access": access_vectors,
    "rotation": rotation_vectors,
    "invalid": invalid_vectors,
    "prekeys": prekey_vectors,
    "streams": stream_vectors,
    "transfers": transfer_vectors,
    "regions": region_vectors,
    "presence": presence_vectors,
    "calls": call_vectors,
    "config": config_vectors,
}

def render(document: dict) -> str:
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def build() -> dict[str, str]:
    """File name → JSON text, exactly as committed."""
    return {f"{name}.json": render(builder()) for name, builder in BUILDERS.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="compare with the committed files instead of writing them")
    args = parser.parse_args(argv)
    stale = []
    for filename, text in build().items():
        path = VECTOR_DIR / filename
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(filename)
        else:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    if stale:
        print("out of date: " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
