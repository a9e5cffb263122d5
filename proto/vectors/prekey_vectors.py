"""prekeys.json: signed prekeys (SPEC §5, "Signed prekeys"), valid and invalid.

Bob signs prekey 7 from a fixed seed; alice seals one envelope to bob's prekey
and carol's identity key (one wrap of each kind); alice's peer change lists
bob with that prekey and carol without.  The invalid entries are what every
implementation must refuse, each with its error code.
"""

from __future__ import annotations

from .. import canonical
from ..envelope import Contents, Kind, Origin, decode_envelope, seal_contents
from ..errors import ErrorCode
from ..payloads import PeerChange
from ..prekeys import (MAX_PREKEY_ID, MAX_PREKEY_VALIDITY_MS, PREKEY_DOMAIN,
                       PREKEY_RETENTION_MS, PrekeySecret, SignedPrekey, create_prekey)
from .generate import (CREATED_AT_MS, EPOCH, IDS, TTL_S, Script, _envelope_vector, _invalid,
                       fill)

PREKEY_ID = 7
PREKEY_SEED = fill(0xB1, 32)
# A week from the envelopes' time: the recommended validity.
VALID_UNTIL_MS = CREATED_AT_MS + 7 * 86_400_000
# Small order (u = 0) and non-canonical (u = p + 9, which is the base point 9 spelt again).
SMALL_ORDER_U = bytes(32)
NON_CANONICAL_U = (2**255 - 19 + 9).to_bytes(32, "little")


def _bobs_prekey() -> tuple[SignedPrekey, PrekeySecret]:
    return create_prekey(IDS["bob"], PREKEY_ID, PREKEY_SEED, VALID_UNTIL_MS)


def _signed(fields: list, signer: str, owner: str = "bob") -> bytes:
    """A prekey of `owner` with any fields, signed by `signer` over what they say."""
    prekey_id, public, valid_until = fields
    signed = PREKEY_DOMAIN + canonical.encode([IDS[owner].public.raw, prekey_id, public,
                                               valid_until])
    return canonical.encode([prekey_id, public, valid_until, IDS[signer].sign(signed)])


def _held(*secrets: PrekeySecret) -> list[dict]:
    return [{"prekey_id": s.prekey_id, "secret": s.secret.hex(),
             "valid_until_ms": s.valid_until_ms} for s in secrets]


def _invalid_prekeys(prekey: SignedPrekey, secret: PrekeySecret, sealed: bytes) -> list[dict]:
    public = prekey.public
    flipped = bytearray(prekey.encode())
    flipped[-1] ^= 0x01
    fields = canonical.decode(sealed, max_size=1 << 16, what="vector")
    entries = fields[7]
    prekey_entry = next(i for i, e in enumerate(entries) if len(e) == 3)

    def with_entry(entry: list) -> bytes:
        changed = [list(e) for e in entries]
        changed[prekey_entry] = entry
        return canonical.encode([*fields[:7], changed, *fields[8:]])

    late = _sealed_to_prekey(prekey, now_ms=VALID_UNTIL_MS)
    other_secret = PrekeySecret(PREKEY_ID + 1, secret.secret, VALID_UNTIL_MS)
    bob, carol = sorted([IDS["bob"].public, IDS["carol"].public])
    peers = [bob.raw, carol.raw]
    prekey_slot = peers.index(IDS["bob"].public.raw)

    def peer_change(prekeys: list) -> bytes:
        return canonical.encode([EPOCH, 8, peers, prekeys])

    carols_signature = canonical.decode(_signed([PREKEY_ID, public, VALID_UNTIL_MS], "carol"),
                                        max_size=128, what="vector")
    mixed = [None, None]
    mixed[prekey_slot] = carols_signature
    e = ErrorCode
    return [
        _invalid("prekey with a flipped signature bit", "signed_prekey", bytes(flipped),
                 e.BAD_SIGNATURE, owner="bob"),
        _invalid("bob's prekey signed by carol", "signed_prekey",
                 _signed([PREKEY_ID, public, VALID_UNTIL_MS], "carol"), e.BAD_SIGNATURE,
                 owner="bob"),
        _invalid("bob's genuine prekey presented as carol's", "signed_prekey", prekey.encode(),
                 e.BAD_SIGNATURE, owner="carol"),
        _invalid("prekey at its valid_until_ms", "signed_prekey_usable", prekey.encode(),
                 e.PREKEY_EXPIRED, owner="bob", now_ms=VALID_UNTIL_MS),
        _invalid("prekey valid for more than 30 days", "signed_prekey_usable",
                 _signed([PREKEY_ID, public, CREATED_AT_MS + MAX_PREKEY_VALIDITY_MS + 1], "bob"),
                 e.INVALID_FIELD, owner="bob", now_ms=CREATED_AT_MS),
        _invalid("prekey public key of small order (u = 0)", "signed_prekey",
                 _signed([PREKEY_ID, SMALL_ORDER_U, VALID_UNTIL_MS], "bob"), e.INVALID_FIELD,
                 owner="bob"),
        _invalid("prekey public key not canonical (u = p + 9)", "signed_prekey",
                 _signed([PREKEY_ID, NON_CANONICAL_U, VALID_UNTIL_MS], "bob"), e.INVALID_FIELD,
                 owner="bob"),
        _invalid("prekey id 2^32", "signed_prekey",
                 _signed([MAX_PREKEY_ID + 1, public, VALID_UNTIL_MS], "bob"), e.INVALID_FIELD,
                 owner="bob"),
        _invalid("prekey with its owner on the wire (five elements)", "signed_prekey",
                 canonical.encode([IDS["bob"].public.raw, *prekey.to_value()]), e.MALFORMED,
                 owner="bob"),
        _invalid("wrap names a prekey bob holds no secret for (no fallback to his identity)",
                 "envelope_open", sealed, e.UNKNOWN_PREKEY, open_as="bob", held=_held()),
        _invalid("wrap names prekey 7, bob holds only prekey 8", "envelope_open", sealed,
                 e.UNKNOWN_PREKEY, open_as="bob", held=_held(other_secret)),
        _invalid("sealed to the prekey at its valid_until_ms", "envelope_open", late,
                 e.PREKEY_EXPIRED, open_as="bob", held=_held(secret)),
        _invalid("recipient entry naming prekey id 2^32", "envelope",
                 with_entry([*entries[prekey_entry][:2], MAX_PREKEY_ID + 1]), e.INVALID_FIELD),
        _invalid("recipient entry of four elements", "envelope",
                 with_entry([*entries[prekey_entry], 0]), e.INVALID_FIELD),
        _invalid("peer change with bob's prekey signed by carol", "peer_change",
                 peer_change(mixed), e.BAD_SIGNATURE),
        _invalid("peer change whose prekeys are all null", "peer_change",
                 peer_change([None, None]), e.INVALID_FIELD),
        _invalid("peer change with fewer prekey slots than peers", "peer_change",
                 peer_change([prekey.to_value()]), e.INVALID_FIELD),
    ]


def _sealed_to_prekey(prekey: SignedPrekey, now_ms: int) -> bytes:
    """alice → bob's prekey at `now_ms`, whatever its validity (what a rule-breaking sender
    could send), from fixed "random" bytes."""
    script = Script(fill(0xC0, 16), fill(0xC9, 32), fill(0xC1, 32), fill(0xC2, 24),
                    fill(0xC3, 24))
    env = seal_contents(IDS["alice"], Origin.DEVICE, Contents(Kind.DATA, b"late").encode(),
                        [IDS["bob"].public], ttl_s=TTL_S, now_ms=now_ms, random_bytes=script,
                        prekeys={IDS["bob"].public: prekey})
    script.done()
    return env.raw


def prekey_vectors() -> dict:
    prekey, secret = _bobs_prekey()
    envelope, env = _envelope_vector("data_to_a_prekey_and_an_identity", "alice",
                                     ["bob", "carol"], Kind.DATA, b"hello, bob's prekey", 0xB0,
                                     prekeys={"bob": prekey})
    decode_envelope(env.raw).open(IDS["bob"], {PREKEY_ID: secret})  # the generator checks too
    change = PeerChange(8, (IDS["bob"].public, IDS["carol"].public), EPOCH, (prekey,))
    return {
        "description": "Signed prekeys (SPEC §5): bob's prekey 7 (X25519 pair from "
                       "crypto_box_seed_keypair(seed)), an envelope from alice whose wrap for "
                       "bob is sealed to that prekey (its recipient entry's third element, "
                       "prekey_id) and whose wrap for carol to her identity key (prekey_id "
                       "null: a two-element entry), and alice's peer change listing bob with "
                       "his prekey and carol without. `invalid` checks: signed_prekey (decode "
                       "as `owner`'s), signed_prekey_usable (decode, then may a sender seal to "
                       "it at `now_ms`), envelope (decode), envelope_open (decode, verify, open "
                       "as `open_as` holding the prekey secrets `held`), peer_change (decode, "
                       "prekey signatures included).",
        "prekey_domain": PREKEY_DOMAIN.hex(),
        "retention_ms": PREKEY_RETENTION_MS,
        "signed_prekey": {
            "owner": "bob",
            "seed": PREKEY_SEED.hex(),
            "fields": {"prekey_id": prekey.prekey_id, "public": prekey.public.hex(),
                       "valid_until_ms": prekey.valid_until_ms},
            "secret": secret.secret.hex(),
            "signed_bytes": prekey.signed_bytes().hex(),
            "signature": prekey.signature.hex(),
            "encoded": prekey.encode().hex(),
            "deletable_at_ms": secret.deletable_at_ms,
        },
        "envelope": envelope,
        "peer_change": {
            "fields": {"epoch": change.epoch, "version": change.version,
                       "peers": [p.raw.hex() for p in sorted(change.peers)],
                       "prekeys": [prekey.encode().hex() if p == prekey.owner else None
                                   for p in sorted(change.peers)]},
            "encoded": change.encode().hex(),
        },
        "invalid": _invalid_prekeys(prekey, secret, env.raw),
    }
