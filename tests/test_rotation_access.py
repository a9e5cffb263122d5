"""The relay's rules for rotated keys (SPEC §15), without sockets: drain-only old device keys,
and an oracle key followed along the chain, only forward."""

from __future__ import annotations

import pytest
import structlog
from wire import now_ms

from continuum.access import AccessControl
from continuum.metrics import RelayMetrics
from continuum.settings import Settings
from proto import Identity, PublicKey
from proto.access import AccessList
from proto.errors import ProtocolError, SignatureError
from proto.rotation import OracleKeyChain, OracleKeyChange


def _control(oracle: Identity, required: bool = True) -> AccessControl:
    return AccessControl(Settings(oracle_url="http://oracle.invalid",
                                  oracle_key=oracle.public.text, require_enrollment=required),
                         RelayMetrics(), structlog.get_logger("test"))


def _list(signer: Identity, version: int, groups: dict[Identity, set[int]], *,
          draining: dict[Identity, int] | None = None, chain: OracleKeyChain = OracleKeyChain(),
          epoch: int = 1) -> bytes:
    return AccessList(epoch, version, now_ms(), now_ms() + 600_000, signer.public,
                      {key.public: frozenset(g) for key, g in groups.items()}, frozenset(),
                      {key.public: until for key, until in (draining or {}).items()},
                      chain).sign(signer)


def _send(control: AccessControl, sender: Identity | PublicKey, *recipients: Identity) -> str | None:
    key = sender if isinstance(sender, PublicKey) else sender.public
    try:
        control.check_send(key, tuple(r.public for r in recipients))
    except ProtocolError as exc:
        return exc.code.name
    return None


def _connect(control: AccessControl, key: Identity) -> str | None:
    refusal = control.refusal(key.public)
    return refusal.code.name if refusal is not None else None


@pytest.mark.parametrize("required", [False, True], ids=["open", "enrollment-required"])
def test_a_rotated_key_may_only_fetch_its_mailbox_until_its_deadline(required: bool) -> None:
    oracle, old, new, peer = (Identity.generate() for _ in range(4))
    control = _control(oracle, required)
    control.apply(_list(oracle, 1, {old: {0}, peer: {0}}))
    closed: list[str] = []
    control.watch(old.public, lambda error: closed.append(error.code.name))
    control.apply(_list(oracle, 2, {new: {0}, peer: {0}}, draining={old: now_ms() + 60_000}))
    assert closed == []  # its live connection keeps draining
    assert _connect(control, old) is None
    assert _send(control, old, peer) == "REVOKED"  # it sends nothing, not even to the oracle
    assert _send(control, old, oracle) == "REVOKED"
    assert _send(control, peer, old) == "REVOKED"  # whoever still writes to it is told
    assert _send(control, oracle, old) == "REVOKED"
    assert _send(control, peer, new) is None and _send(control, new, peer) is None
    control.apply(_list(oracle, 3, {new: {0}, peer: {0}}, draining={old: now_ms() - 1}))
    assert _connect(control, old) == "REVOKED" and closed == ["REVOKED"]


def test_the_relay_follows_the_oracle_key_chain_forward_only() -> None:
    o1, o2, o3, device = (Identity.generate() for _ in range(4))
    one = OracleKeyChain().extended(OracleKeyChange.sign(o1, o2, 1))
    two = one.extended(OracleKeyChange.sign(o2, o3, 2))
    control = _control(o1)
    control.apply(_list(o1, 1, {device: {0}}))
    closed: list[str] = []
    control.watch(o1.public, lambda error: closed.append(error.code.name))
    assert control.apply(_list(o2, 1, {device: {0}}, chain=one, epoch=2))
    assert control.oracle == o2.public and closed == ["REVOKED"]  # the old key's session
    assert _connect(control, o1) == "REVOKED" and _connect(control, o2) is None
    assert _send(control, device, o1) == "REVOKED"  # a receipt to the former key: told
    assert _send(control, device, o2) is None and _send(control, o2, device) is None
    assert _send(control, o1.public, device) == "REVOKED"
    # The chain alone (what a refused relay fetches) moves it on; a replay of the old one
    # changes nothing, and a list signed by a key behind the one in force is refused.
    assert control.follow_chain(two.encode()) and control.oracle == o3.public
    assert not control.follow_chain(one.encode()) and control.oracle == o3.public
    with pytest.raises(SignatureError):
        control.apply(_list(o2, 9, {device: {0}}, chain=one, epoch=3))
    assert control.oracle == o3.public


def test_a_relay_started_with_the_first_key_follows_the_whole_chain() -> None:
    o1, o2, o3, device = (Identity.generate() for _ in range(4))
    chain = OracleKeyChain().extended(OracleKeyChange.sign(o1, o2, 1)).extended(
        OracleKeyChange.sign(o2, o3, 2))
    control = _control(o1)  # a restart with the configuration of before both rotations
    assert _connect(control, o3) == "ACCESS_LIST_UNAVAILABLE"  # no list yet: fail closed
    assert control.apply(_list(o3, 4, {device: set()}, chain=chain))
    assert control.oracle == o3.public and _connect(control, o3) is None
    stranger = Identity.generate()
    forged = OracleKeyChain().extended(OracleKeyChange.sign(stranger, o3, 1))
    assert not control.follow_chain(forged.encode())  # about another key: not followed
    with pytest.raises(SignatureError):  # a chain o1 never signed
        _control(o1).apply(_list(o3, 4, {}, chain=forged))


def test_a_list_with_a_forged_chain_from_the_oracle_costs_a_few_signature_checks(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A list signed by a stranger whose chain claims to lead from the relay's oracle to it
    (its own valid links, then forged ones through the oracle's key) was refused only
    after every link's signatures were checked in order: 250 checks.  Now the chain's
    claims and the list's own signature come first, and the link leaving the oracle's key
    is the first of the chain checked."""
    oracle, stranger = Identity.generate(), Identity.generate()
    keys = [Identity.generate() for _ in range(126)]
    now = now_ms()
    links = [OracleKeyChange.sign(old, new, now + n) for n, (old, new)
             in enumerate(zip(keys, keys[1:]))]
    forger = Identity.generate()

    def forged(old: PublicKey, new: PublicKey, at: int) -> OracleKeyChange:
        genuine = OracleKeyChange.sign(forger, keys[0], at)  # signatures of other bytes
        return OracleKeyChange(old, new, at, genuine.old_signature, genuine.new_signature)

    chain = OracleKeyChain((*links, forged(keys[-1].public, oracle.public, now + 200),
                            forged(oracle.public, stranger.public, now + 201)))
    document = AccessList(1, 1, now, now + 60_000, stranger.public, {}, frozenset(),
                          oracle_chain=chain).sign(stranger)
    plain = AccessList(1, 1, now, now + 60_000, stranger.public, {},
                       frozenset()).sign(stranger)

    checks = []
    real_verify = PublicKey.verify

    def counted(key: PublicKey, message: bytes, signature: bytes) -> None:
        checks.append(key)
        real_verify(key, message, signature)

    # Counted, not timed: decoding a 128-link chain takes a few milliseconds of its own on a
    # slow machine, which a time bound took for signature checks.
    monkeypatch.setattr(PublicKey, "verify", counted)
    for data in (plain, document):
        checks.clear()
        with pytest.raises(SignatureError):
            AccessList.verify(data, oracle.public)
        assert len(checks) <= 2, (len(checks), data is document)
