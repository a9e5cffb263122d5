"""Envelope: seal → encode → decode → verify → open, and every way it must refuse."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proto import canonical
from proto.envelope import (MSG_ID_BYTES, PAYLOAD_AAD_DOMAIN, SIGNING_DOMAIN, Contents, Kind,
                            Origin, check_sent_by_device, decode_envelope, seal_contents,
                            seal_envelope)
from proto.errors import (DecodeError, DecryptError, ErrorCode, InvalidFieldError,
                          OversizeError,
                          SignatureError, UnsupportedVersionError)
from proto.keys import Identity
from proto.limits import DEFAULT_MAX_RECIPIENTS, MAX_TTL_SECONDS, Limits
from proto.sealing import (PAYLOAD_OVERHEAD_BYTES, WRAPPED_KEY_BYTES, ephemeral_public,
                           padded_size)
from proto_support import (ALICE, BOB, CAROL, MALLORY, NOW_MS, TTL_S, counter_random,
                                 envelope_fields, identity, make_envelope, reencode)


SIGNATURE, PAYLOAD, RECIPIENTS, EPHEMERAL = 9, 8, 7, 6  # element indices (protocol 2)


def _forge(fields: list, signer: Identity) -> bytes:
    """Re-sign the first nine fields with `signer` and encode the envelope."""
    signature = signer.sign(SIGNING_DOMAIN + canonical.encode(fields[:SIGNATURE]))
    return canonical.encode([*fields[:SIGNATURE], signature])


class TestRoundTrip:
    @settings(max_examples=200, deadline=None)
    @given(plaintext=st.binary(max_size=2048), kind=st.sampled_from(list(Kind)))
    def test_single_recipient(self, plaintext: bytes, kind: Kind) -> None:
        env = make_envelope(plaintext, kind=kind)
        decoded = decode_envelope(env.raw)
        decoded.verify()
        assert decoded == env
        assert decoded.open(BOB) == Contents(kind, plaintext)
        assert decoded.origin is kind.origin
        assert decoded.sender == ALICE.public
        assert decoded.created_at_ms == NOW_MS and decoded.ttl_s == TTL_S
        assert decoded.expires_at_ms == NOW_MS + TTL_S * 1000

    def test_multi_recipient_carries_payload_once(self) -> None:
        plaintext = b"x" * 1000
        one = make_envelope(plaintext, recipients=(BOB,))
        three = make_envelope(plaintext, recipients=(BOB, CAROL, MALLORY))
        assert len(three.payload) == len(one.payload) == (
            padded_size(1 + len(plaintext)) + PAYLOAD_OVERHEAD_BYTES)
        # Each extra recipient costs one [key, wrap] pair: 1 + (2+32) + (2+72) bytes.
        assert len(three.raw) - len(one.raw) == 2 * (1 + 2 + 32 + 2 + WRAPPED_KEY_BYTES)
        decoded = decode_envelope(three.raw)
        decoded.verify()
        for reader in (BOB, CAROL, MALLORY):
            assert decoded.open(reader).plaintext == plaintext

    def test_recipients_sorted_and_deduplicated(self) -> None:
        env = make_envelope(recipients=(CAROL, BOB, CAROL, BOB))
        keys = [r.key for r in env.recipients]
        assert keys == sorted({BOB.public, CAROL.public})

    @settings(max_examples=200, deadline=None)
    @given(plaintext=st.binary(max_size=512), count=st.integers(1, 5))
    def test_decode_then_encode_is_identical(self, plaintext: bytes, count: int) -> None:
        readers = tuple(identity(f"reader{i}") for i in range(count))
        env = make_envelope(plaintext, recipients=readers)
        assert reencode(decode_envelope(env.raw)) == env.raw

    def test_signed_bytes_are_domain_and_first_nine_fields(self) -> None:
        env = make_envelope()
        assert env.signed_bytes() == SIGNING_DOMAIN + canonical.encode(
            envelope_fields(env)[:SIGNATURE])
        ALICE.public.verify(env.signed_bytes(), env.signature)

    @settings(max_examples=100, deadline=None)
    @given(plaintext=st.binary(max_size=600), count=st.integers(1, 4))
    def test_decoded_signed_bytes_are_the_wire_bytes_cut(self, plaintext: bytes,
                                                         count: int) -> None:
        """A decoded envelope's signed bytes come from its raw bytes, not a re-encoding:
        the same bytes, whatever the lengths (heads of 1, 2 or 3 bytes)."""
        env = make_envelope(plaintext, recipients=tuple(identity(f"r{i}") for i in range(count)))
        decoded = decode_envelope(env.raw)
        assert decoded._raw_is_canonical and not env._raw_is_canonical
        assert decoded.signed_bytes() == env.signed_bytes() == SIGNING_DOMAIN + canonical.encode(
            envelope_fields(env)[:SIGNATURE])

    def test_a_copy_with_other_fields_is_signed_over_them_not_over_raw(self) -> None:
        """`dataclasses.replace` keeps `raw`; its signed bytes must still be its own fields'."""
        decoded = decode_envelope(make_envelope(b"pay me 10").raw)
        decoded.verify()
        other_payload = bytes(len(decoded.payload))
        altered = dataclasses.replace(decoded, payload=other_payload)
        assert altered.raw == decoded.raw
        with pytest.raises(SignatureError):
            altered.verify()

    def test_sender_can_address_itself(self) -> None:
        env = make_envelope(recipients=(ALICE, BOB))
        assert decode_envelope(env.raw).open(ALICE).plaintext == b"hello, device"


class TestForgery:
    def test_signed_by_another_key(self) -> None:
        fields = envelope_fields(make_envelope())
        fields[SIGNATURE] = MALLORY.sign(SIGNING_DOMAIN + canonical.encode(fields[:SIGNATURE]))
        with pytest.raises(SignatureError):
            decode_envelope(canonical.encode(fields)).verify()

    def test_every_single_bit_flip_is_refused(self) -> None:
        raw = make_envelope(b"short").raw
        for index in range(len(raw)):
            for bit in range(8):
                data = bytearray(raw)
                data[index] ^= 1 << bit
                try:
                    env = decode_envelope(bytes(data))
                except DecodeError:
                    continue
                with pytest.raises(SignatureError):
                    env.verify()

    @pytest.mark.parametrize("index", range(1, SIGNATURE))  # a changed version: UNSUPPORTED_VERSION
    def test_changed_field_breaks_signature(self, index: int) -> None:
        env = make_envelope(recipients=(BOB, CAROL))
        fields = envelope_fields(env)
        other = envelope_fields(make_envelope(b"other", sender=MALLORY, kind=Kind.EXPIRY,
                                              recipients=(CAROL, MALLORY), label="other"))
        fields[index] = other[index]
        if index in (4, 5):
            fields[index] += 1
        decoded = decode_envelope(canonical.encode(fields))
        with pytest.raises(SignatureError):
            decoded.verify()

    def test_wrong_signature_length_is_invalid_field(self) -> None:
        fields = envelope_fields(make_envelope())
        fields[SIGNATURE] = fields[SIGNATURE][:63]
        with pytest.raises(InvalidFieldError):
            decode_envelope(canonical.encode(fields))


class TestDecrypt:
    def test_not_a_recipient(self) -> None:
        with pytest.raises(DecryptError):
            make_envelope().open(CAROL)

    def test_wrong_key_for_listed_recipient(self) -> None:
        # Carol's wrap placed under Bob's entry: Bob holds the wrong key for it.
        env = make_envelope(recipients=(BOB, CAROL))
        fields = envelope_fields(env)
        wraps = [entry[1] for entry in fields[RECIPIENTS]]
        fields[RECIPIENTS] = [[entry[0], wrap]
                              for entry, wrap in zip(fields[RECIPIENTS], reversed(wraps))]
        forged = decode_envelope(_forge(fields, ALICE))
        forged.verify()
        with pytest.raises(DecryptError):
            forged.open(BOB)

    def test_resigned_under_new_sender_does_not_decrypt(self) -> None:
        """A relay or attacker cannot claim someone else's ciphertext as its own."""
        fields = envelope_fields(make_envelope(b"secret from alice"))
        fields[3] = MALLORY.public.raw
        forged = decode_envelope(_forge(fields, MALLORY))
        forged.verify()  # a perfectly valid envelope from Mallory…
        with pytest.raises(DecryptError):
            forged.open(BOB)  # …whose payload is bound to Alice's header

    @pytest.mark.parametrize("index", [1, 2, 4, 5, EPHEMERAL])
    def test_header_change_resigned_by_sender_does_not_decrypt(self, index: int) -> None:
        fields = envelope_fields(make_envelope())
        fields[index] = {1: 2, 2: b"\x00" * MSG_ID_BYTES, 4: NOW_MS + 1, 5: TTL_S + 1,
                         EPHEMERAL: ephemeral_public(b"\x09" * 32)}[index]
        forged = decode_envelope(_forge(fields, ALICE))
        forged.verify()
        with pytest.raises(DecryptError):
            forged.open(BOB)

    def test_dropping_a_recipient_does_not_decrypt(self) -> None:
        fields = envelope_fields(make_envelope(recipients=(BOB, CAROL)))
        fields[RECIPIENTS] = [entry for entry in fields[RECIPIENTS] if entry[0] == BOB.public.raw]
        forged = decode_envelope(_forge(fields, ALICE))
        with pytest.raises(DecryptError):
            forged.open(BOB)

    def test_altered_ciphertext(self) -> None:
        fields = envelope_fields(make_envelope())
        payload = bytearray(fields[PAYLOAD])
        payload[-1] ^= 1
        fields[PAYLOAD] = bytes(payload)
        with pytest.raises(DecryptError):
            decode_envelope(_forge(fields, ALICE)).open(BOB)

    def test_aad_is_domain_and_header_with_recipient_keys(self) -> None:
        import nacl.bindings

        env = make_envelope()
        aad = PAYLOAD_AAD_DOMAIN + canonical.encode(
            [*envelope_fields(env)[:RECIPIENTS], [r.key.raw for r in env.recipients]])
        box_key = nacl.bindings.crypto_box_beforenm(
            env.ephemeral, nacl.bindings.crypto_sign_ed25519_sk_to_curve25519(
                BOB.signing_key.encode() + BOB.public.raw))
        wrap = env.recipients[0].wrapped_key
        content_key = nacl.bindings.crypto_box_open_afternm(wrap[24:], wrap[:24], box_key)
        padded = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(
            env.payload[24 + 32:], aad, env.payload[:24], content_key)
        assert padded.rstrip(b"\x00") == bytes([Kind.DATA]) + b"hello, device\x80"

    def test_a_second_content_key_cannot_open_a_payload_committed_to_the_first(self) -> None:
        """Invisible salamanders: before, one signed 457-byte envelope decrypted to two
        different plaintexts for two recipients (their wraps held different keys)."""
        env = make_envelope(recipients=(BOB, CAROL))
        fields = envelope_fields(env)
        other = make_envelope(b"CLOSE valve 7", recipients=(BOB, CAROL), label="other")
        # Give carol a wrap of another content key (one alice sealed for carol elsewhere),
        # keep the payload and its commitment: alice signs the mix, the relay cannot tell.
        carol_entry = [e for e in envelope_fields(other)[RECIPIENTS] if e[0] == CAROL.public.raw]
        fields[EPHEMERAL] = other.ephemeral  # so carol's wrap opens at all
        fields[RECIPIENTS] = [e if e[0] != CAROL.public.raw else carol_entry[0]
                              for e in fields[RECIPIENTS]]
        forged = decode_envelope(_forge(fields, ALICE))
        with pytest.raises(DecryptError, match="commits|decrypt"):
            forged.open(CAROL)

    def test_open_verifies_first(self) -> None:
        fields = envelope_fields(make_envelope())
        fields[SIGNATURE] = MALLORY.sign(SIGNING_DOMAIN + canonical.encode(fields[:SIGNATURE]))
        with pytest.raises(SignatureError):
            decode_envelope(canonical.encode(fields)).open(BOB)

    def test_the_senders_identity_key_cannot_open_what_it_sent(self) -> None:
        """Forward secrecy for the sender: the wraps are from a key forgotten after sealing."""
        import nacl.bindings
        import nacl.exceptions

        env = make_envelope()
        wrap = env.recipients[0].wrapped_key
        alice_x = nacl.bindings.crypto_sign_ed25519_sk_to_curve25519(
            ALICE.signing_key.encode() + ALICE.public.raw)
        bob_x = nacl.bindings.crypto_sign_ed25519_pk_to_curve25519(BOB.public.raw)
        with pytest.raises(nacl.exceptions.CryptoError):
            nacl.bindings.crypto_box_open(wrap[24:], wrap[:24], bob_x, alice_x)

    @pytest.mark.parametrize("length,bucket", [(0, 64), (62, 64), (63, 128), (1000, 1024),
                                               (16_382, 16_384), (16_383, 32_768),
                                               (40_000, 49_152)])
    def test_payloads_and_their_kind_are_padded_to_size_buckets(self, length: int,
                                                                bucket: int) -> None:
        assert padded_size(1 + length) == bucket
        env = make_envelope(b"x" * length)
        assert len(env.payload) == bucket + PAYLOAD_OVERHEAD_BYTES
        assert env.open(BOB).plaintext == b"x" * length

    def test_the_content_hash_is_of_the_signed_bytes(self) -> None:
        import hashlib
        env = make_envelope()
        assert env.content_hash() == hashlib.blake2b(env.signed_bytes(), digest_size=32).digest()
        assert make_envelope(label="other").content_hash() != env.content_hash()


class TestSealedKind:
    """The kind travels sealed; the clear origin says only whether a relay wrote it."""

    def test_data_receipts_and_peer_changes_look_alike_in_the_clear(self) -> None:
        """Before, field 1 was the kind: a relay (or its store's reader) told them apart."""
        headers = {kind: envelope_fields(make_envelope(b"same length", kind=kind,
                                                       label="same"))[:RECIPIENTS + 1]
                   for kind in (Kind.DATA, Kind.RECEIPT, Kind.PEER_CHANGE)}
        assert len(set(map(repr, headers.values()))) == 1
        assert headers[Kind.RECEIPT][1] == Origin.DEVICE
        assert envelope_fields(make_envelope(kind=Kind.EXPIRY))[1] == Origin.RELAY

    @pytest.mark.parametrize("origin,kind", [(o, k) for o in Origin for k in Kind
                                             if k.origin is not o])
    def test_a_sealed_kind_that_disagrees_with_the_origin_is_refused(self, origin: Origin,
                                                                     kind: Kind) -> None:
        env = seal_contents(ALICE, origin, Contents(kind, b"x").encode(), [BOB.public],
                            ttl_s=TTL_S, now_ms=NOW_MS, random_bytes=counter_random("mix"))
        decoded = decode_envelope(env.raw)
        decoded.verify()  # properly signed: only the recipient can tell
        with pytest.raises(InvalidFieldError, match="cannot have origin") as caught:
            decoded.open(BOB)
        assert caught.value.code is ErrorCode.INVALID_FIELD

    @pytest.mark.parametrize("contents", [b"", b"\x00", b"\x7f", b"\x7fhello", b"\xff" * 3])
    def test_an_unknown_or_missing_sealed_kind_is_refused(self, contents: bytes) -> None:
        env = seal_contents(ALICE, Origin.DEVICE, contents, [BOB.public], ttl_s=TTL_S,
                            now_ms=NOW_MS, random_bytes=counter_random("unknown"))
        with pytest.raises(InvalidFieldError) as caught:
            decode_envelope(env.raw).open(BOB)
        assert caught.value.code is ErrorCode.INVALID_FIELD

    @settings(max_examples=200, deadline=None)
    @given(contents=st.binary(max_size=300), origin=st.sampled_from(list(Origin)))
    def test_any_sealed_bytes_open_to_a_kind_of_their_origin_or_are_refused(
            self, contents: bytes, origin: Origin) -> None:
        env = seal_contents(ALICE, origin, contents, [BOB.public], ttl_s=TTL_S, now_ms=NOW_MS,
                            random_bytes=counter_random("any"))
        try:
            opened = decode_envelope(env.raw).open(BOB)
        except InvalidFieldError:
            assert not contents or contents[0] not in set(Kind) or (
                Kind(contents[0]).origin is not origin)
            return
        assert opened.encode() == contents and opened.kind.origin is origin

    @settings(max_examples=300, deadline=None)
    @given(data=st.binary(max_size=64))
    def test_contents_decode_any_bytes_or_refuse_them(self, data: bytes) -> None:
        try:
            contents = Contents.decode(data)
        except InvalidFieldError:
            assert not data or data[0] not in set(Kind)
            return
        assert contents.encode() == data

    def test_a_relay_notice_is_not_for_sending(self) -> None:
        check_sent_by_device(make_envelope(kind=Kind.RECEIPT))
        with pytest.raises(InvalidFieldError) as caught:
            check_sent_by_device(make_envelope(kind=Kind.EXPIRY))
        assert caught.value.code is ErrorCode.INVALID_FIELD


class TestStrictDecoding:
    def test_every_truncation(self) -> None:
        raw = make_envelope(recipients=(BOB, CAROL)).raw
        for length in range(len(raw)):
            with pytest.raises(DecodeError):
                decode_envelope(raw[:length])

    @pytest.mark.parametrize("suffix", [b"\x00", b"\xff", b"\x80", b"\x40hello"])
    def test_trailing_bytes(self, suffix: bytes) -> None:
        with pytest.raises(DecodeError):
            decode_envelope(make_envelope().raw + suffix)

    def test_oversize(self) -> None:
        raw = make_envelope(b"x" * 1000).raw
        with pytest.raises(OversizeError):
            decode_envelope(raw, Limits(max_envelope_bytes=len(raw) - 1))
        assert decode_envelope(raw, Limits(max_envelope_bytes=len(raw))).raw == raw

    def test_seal_refuses_oversize(self) -> None:
        with pytest.raises(OversizeError):
            seal_envelope(ALICE, Kind.DATA, [BOB.public], b"x" * 65536,
                          ttl_s=TTL_S, now_ms=NOW_MS)

    @pytest.mark.parametrize("version", [0, 1, 3, 255, 2**32])
    def test_unknown_version(self, version: int) -> None:
        fields = envelope_fields(make_envelope())
        fields[0] = version
        with pytest.raises(UnsupportedVersionError):
            decode_envelope(canonical.encode(fields))

    def test_unknown_version_with_other_shape(self) -> None:
        """A future version may change the layout; the version must be reported first."""
        with pytest.raises(UnsupportedVersionError):
            decode_envelope(canonical.encode([3, "anything"]))

    @pytest.mark.parametrize("index,value", [
        (0, True), (0, "1"),
        (1, 0), (1, 3), (1, 5), (1, True), (1, 1.0),
        (2, b"\x00" * 15), (2, b"\x00" * 17), (2, "x" * 16),
        (3, b"\x00" * 31), (3, b"\x00" * 33), (3, None),
        (4, -1), (4, "now"),
        (5, 0), (5, MAX_TTL_SECONDS + 1), (5, -5), (5, False),
        (6, b"\x00" * 31), (6, None),
        (7, []), (7, b""), (7, [[b"\x00" * 32]]), (7, [[b"\x00" * 32, b"\x00" * 71]]),
        (7, [[b"\x00" * 31, b"\x00" * 72]]), (7, [b"\x00" * 32]), (7, {}),
        (8, b"\x00" * (PAYLOAD_OVERHEAD_BYTES - 1)), (8, "text"), (8, []),
        (9, b"\x00" * 65), (9, None),
    ])
    def test_wrong_types_and_lengths(self, index: int, value: object) -> None:
        fields = envelope_fields(make_envelope())
        fields[index] = value
        with pytest.raises(InvalidFieldError):
            decode_envelope(canonical.encode(fields))

    def test_bignum_is_a_tag_not_an_integer(self) -> None:
        """2**64 only fits CBOR as tag 2; tags are refused before any field check."""
        fields = envelope_fields(make_envelope())
        fields[4] = 2**64
        with pytest.raises(DecodeError) as caught:
            decode_envelope(canonical.encode(fields))
        assert caught.value.code is ErrorCode.MALFORMED

    def test_unsorted_or_duplicate_recipients(self) -> None:
        fields = envelope_fields(make_envelope(recipients=(BOB, CAROL)))
        fields[RECIPIENTS] = list(reversed(fields[RECIPIENTS]))
        with pytest.raises(InvalidFieldError):
            decode_envelope(canonical.encode(fields))
        fields[RECIPIENTS] = [fields[RECIPIENTS][0], fields[RECIPIENTS][0]]
        with pytest.raises(InvalidFieldError):
            decode_envelope(canonical.encode(fields))

    def test_too_many_recipients(self) -> None:
        fields = envelope_fields(make_envelope())
        wrap = fields[RECIPIENTS][0][1]
        fields[RECIPIENTS] = [[i.to_bytes(32, "big"), wrap]
                              for i in range(DEFAULT_MAX_RECIPIENTS + 1)]
        with pytest.raises(InvalidFieldError):
            decode_envelope(canonical.encode(fields))
        with pytest.raises(InvalidFieldError):
            seal_envelope(ALICE, Kind.DATA,
                          [identity(f"r{i}").public for i in range(DEFAULT_MAX_RECIPIENTS + 1)],
                          b"", ttl_s=TTL_S, now_ms=NOW_MS)

    @pytest.mark.parametrize("value", [[], [2] * 9, [2] * 11, {}, 1, b"", "envelope", None])
    def test_wrong_shape(self, value: object) -> None:
        with pytest.raises(DecodeError):
            decode_envelope(canonical.encode(value))

    @pytest.mark.parametrize("data", [b"", bytearray(), "text", None, 42])
    def test_not_bytes_or_empty(self, data: object) -> None:
        with pytest.raises(DecodeError):
            decode_envelope(data)  # type: ignore[arg-type]

    @pytest.mark.parametrize("ttl", [0, MAX_TTL_SECONDS + 1])
    def test_seal_refuses_bad_ttl(self, ttl: int) -> None:
        with pytest.raises(InvalidFieldError):
            seal_envelope(ALICE, Kind.DATA, [BOB.public], b"", ttl_s=ttl, now_ms=NOW_MS)

    def test_seal_refuses_no_recipient(self) -> None:
        with pytest.raises(InvalidFieldError):
            seal_envelope(ALICE, Kind.DATA, [], b"", ttl_s=TTL_S, now_ms=NOW_MS)

    def test_seal_uses_injected_randomness(self) -> None:
        a = make_envelope(label="same")
        b = make_envelope(label="same")
        c = make_envelope(label="different")
        assert a.raw == b.raw != c.raw
        assert a.msg_id == counter_random("same")(MSG_ID_BYTES)
