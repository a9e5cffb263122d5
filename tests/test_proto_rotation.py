"""Key rotation statements and the oracle's key chain: signed by both keys, walked only forward."""

from __future__ import annotations

import pytest

from proto import Identity, canonical
from proto.access import ACCESS_LIST_DOMAIN, AccessList, AccessRequest
from proto.errors import DecodeError, InvalidFieldError, SignatureError, UnauthenticatedError
from proto.rotation import (KEY_ROTATION_DOMAIN, ORACLE_KEY_CHANGE_DOMAIN, KeyRotation,
                            OracleKeyChain, OracleKeyChange)

T = 1_700_000_000_000


def _chain(*keys: Identity) -> OracleKeyChain:
    chain = OracleKeyChain()
    for number, (old, new) in enumerate(zip(keys, keys[1:])):
        chain = chain.extended(OracleKeyChange.sign(old, new, T + number))
    return chain


def test_rotation_round_trips_and_is_signed_by_both_keys() -> None:
    old, new = Identity.generate(), Identity.generate()
    rotation = KeyRotation.sign(old, new, T)
    assert KeyRotation.decode(rotation.encode()) == rotation
    message = KEY_ROTATION_DOMAIN + canonical.encode([old.public.raw, new.public.raw, T])
    assert rotation.signed_bytes() == message
    old.public.verify(message, rotation.old_signature)
    new.public.verify(message, rotation.new_signature)


@pytest.mark.parametrize("broken", ["old_signature", "new_signature", "swapped_signatures"])
def test_rotation_without_both_signatures_is_refused(broken: str) -> None:
    old, new, other = (Identity.generate() for _ in range(3))
    fields = KeyRotation.sign(old, new, T).to_value()
    message = KEY_ROTATION_DOMAIN + canonical.encode(fields[:3])
    if broken == "old_signature":  # someone claims to be old's successor: old never said so
        fields[3] = other.sign(message)
    elif broken == "new_signature":  # old names a key whose secret nobody proved to hold
        fields[4] = other.sign(message)
    else:
        fields[3], fields[4] = fields[4], fields[3]
    with pytest.raises(SignatureError):
        KeyRotation.decode(canonical.encode(fields))


def test_statements_of_one_kind_do_not_pass_for_the_other() -> None:
    old, new = Identity.generate(), Identity.generate()
    device = KeyRotation.sign(old, new, T).encode()
    oracle = OracleKeyChange.sign(old, new, T).encode()
    assert device != oracle
    with pytest.raises(SignatureError):
        OracleKeyChange.decode(device)
    with pytest.raises(SignatureError):
        KeyRotation.decode(oracle)
    assert OracleKeyChange.sign(old, new, T).signed_bytes().startswith(ORACLE_KEY_CHANGE_DOMAIN)


def test_rotation_shape_and_field_refusals() -> None:
    old, new = Identity.generate(), Identity.generate()
    fields = KeyRotation.sign(old, new, T).to_value()
    with pytest.raises(InvalidFieldError):
        KeyRotation.sign(old, old, T)
    with pytest.raises(DecodeError):
        KeyRotation.decode(canonical.encode(fields[:4]))
    with pytest.raises(InvalidFieldError):
        KeyRotation.decode(canonical.encode([fields[0], fields[0], *fields[2:]]))
    with pytest.raises(InvalidFieldError):
        KeyRotation.decode(canonical.encode([*fields[:2], -1, *fields[3:]]))
    with pytest.raises(DecodeError):
        KeyRotation.decode(KeyRotation.sign(old, new, T).encode() + b"\x00")


def test_chain_is_followed_forward_from_any_of_its_keys_and_never_back() -> None:
    o1, o2, o3, stranger = (Identity.generate() for _ in range(4))
    chain = _chain(o1, o2, o3)
    assert OracleKeyChain.decode(chain.encode()) == chain
    assert chain.current == o3.public and chain.former == {o1.public, o2.public}
    assert chain.follow(o1.public) == chain.follow(o2.public) == o3.public
    assert chain.follow(o3.public) == o3.public
    assert chain.follow(stranger.public) == stranger.public  # not about that key
    old = _chain(o1, o2)  # a replay of the chain as it was before o3
    assert old.follow(o3.public) == o3.public  # changes nothing for who holds o3
    assert chain.introduces(o1.public, o3.public) and not chain.introduces(o3.public, o2.public)
    assert OracleKeyChain().follow(o1.public) == o1.public


def test_chain_refuses_gaps_disorder_and_cycles() -> None:
    o1, o2, o3, o4 = (Identity.generate() for _ in range(4))
    first, gap = OracleKeyChange.sign(o1, o2, T), OracleKeyChange.sign(o3, o4, T + 1)
    with pytest.raises(InvalidFieldError):
        OracleKeyChain((first, gap))
    with pytest.raises(InvalidFieldError):
        OracleKeyChain((first, OracleKeyChange.sign(o2, o3, T)))  # not later than the first
    with pytest.raises(InvalidFieldError):
        OracleKeyChain((first, OracleKeyChange.sign(o2, o1, T + 1)))  # back to o1
    with pytest.raises(InvalidFieldError):
        OracleKeyChain((first,)).extended(gap)
    forged = OracleKeyChange.sign(o1, o2, T).to_value()
    forged[3] = o3.sign(OracleKeyChange.sign(o1, o2, T).signed_bytes())
    with pytest.raises(SignatureError):
        OracleKeyChain.decode(canonical.encode([forged]))


def test_access_list_of_a_rotated_oracle_is_followed_from_the_old_key() -> None:
    o1, o2, device, rotated = (Identity.generate() for _ in range(4))
    chain = _chain(o1, o2)
    access = AccessList(5, 9, T, T + 600_000, o2.public, {device.public: frozenset({0})}, frozenset(),
                        {rotated.public: T + 60_000}, chain)
    signed = access.sign(o2)
    for trusted in (o1, o2):  # configured with the old key, or already following
        decoded = AccessList.verify(signed, trusted.public)
        assert decoded.oracle == o2.public and decoded.oracle_chain == chain
        assert dict(decoded.draining) == {rotated.public: T + 60_000}
    with pytest.raises(SignatureError):
        AccessList.verify(signed, device.public)
    # Signed by the old key after the change: the chain does not end at its signer.
    with pytest.raises(InvalidFieldError):
        AccessList(5, 9, T, T + 600_000, o1.public, {}, frozenset(), oracle_chain=chain).sign(o1)
    body = canonical.decode(signed, max_size=1 << 20, what="t")[:-1]
    with pytest.raises(InvalidFieldError):  # o1 signing a list that claims the chain ends at o1
        AccessList.verify(canonical.encode([*body[:4], o1.public.raw, *body[5:],
                                            o1.sign(b"x")]), o1.public)


def test_access_list_layouts_have_one_encoding_each() -> None:
    oracle, device = Identity.generate(), Identity.generate()
    plain = AccessList(1, 1, T, T + 600_000, oracle.public, {device.public: frozenset()}, frozenset())
    assert len(canonical.decode(plain.sign(oracle), max_size=1 << 20, what="t")) == 8
    body = canonical.decode(plain.sign(oracle), max_size=1 << 20, what="t")[:-1]
    long_empty = [*body, [], []]
    signed = canonical.encode([*long_empty, oracle.sign(ACCESS_LIST_DOMAIN
                                                        + canonical.encode(long_empty))])
    with pytest.raises(InvalidFieldError):
        AccessList.verify(signed, oracle.public)
    both = [*body, [[device.public.raw, T]], []]  # enrolled and draining at once
    signed = canonical.encode([*both, oracle.sign(ACCESS_LIST_DOMAIN + canonical.encode(both))])
    with pytest.raises(InvalidFieldError):
        AccessList.verify(signed, oracle.public)


def test_relay_request_may_name_a_former_oracle_key() -> None:
    relay, o1, o2 = (Identity.generate() for _ in range(3))
    header = AccessRequest(relay.public, o1.public, T, bytes(16)).authorization(relay)
    with pytest.raises(UnauthenticatedError):
        AccessRequest.verify(header, o2.public, T)
    assert AccessRequest.verify(header, o2.public, T, former={o1.public}).oracle == o1.public
