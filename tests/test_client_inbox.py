"""The device's pure inbox decisions, without a network: one rule per test."""

from __future__ import annotations

import time

import pytest

from client.dedup import RecentlySeen
from client.freshness import CLOCK_SKEW_MS, device_now_ms
from client.inbox import (Drop, DropReason, ExpiryArrived, InboxView, PeerChangeArrived,
                          ReceiptArrived, Surface, decide)
from client.peers import PeerList, Standing
from client.tracking import SentLog
from proto import Contents, Envelope, Identity, Kind, Origin, PublicKey, canonical, seal_envelope
from proto.envelope import seal_contents
from proto.payloads import ExpiryNotice, PeerChange, Receipt
from proto.rotation import MAX_ORACLE_KEY_CHANGES, OracleKeyChain, OracleKeyChange

NOW_MS = 1_700_000_000_000

alice, bob, carol, mallory, oracle, relay = (Identity.generate() for _ in range(6))


def sealed(sender: Identity, recipients: list[Identity], plaintext: bytes,
           kind: Kind = Kind.DATA) -> Envelope:
    return seal_envelope(sender, kind, [r.public for r in recipients], plaintext,
                         ttl_s=60, now_ms=NOW_MS)


def view(*, peers: list[Identity] = (bob,), peer_version: int = 0,  # type: ignore[assignment]
         seen: RecentlySeen | None = None, sent: SentLog | None = None,
         oracle_key: PublicKey | None = oracle.public) -> InboxView:
    """What alice's device knows: bob is her peer and `relay` proved its key."""
    return InboxView(identity=alice, peers=PeerList([p.public for p in peers], peer_version),
                     relay_keys={relay.public}, seen=seen or RecentlySeen(),
                     awaiting_receipt=sent or SentLog(), oracle_key=oracle_key)


def sent_to(*recipients: Identity) -> tuple[Envelope, SentLog]:
    """A message alice sent, tracked as her device tracks it."""
    log = SentLog()
    envelope = sealed(alice, list(recipients), b"from alice")
    log.track(envelope)
    return envelope, log


def test_data_from_a_peer_is_surfaced_with_its_plaintext() -> None:
    envelope = sealed(bob, [alice], b"hello")
    decision = decide(envelope.raw, view(), now_ms=NOW_MS)
    assert isinstance(decision, Surface)
    message = decision.message
    assert (message.sender, message.msg_id, message.payload, message.kind,
            message.created_at_ms) == (bob.public, envelope.msg_id, b"hello", Kind.DATA, NOW_MS)


def test_forged_signature_is_dropped_as_invalid() -> None:
    raw = bytearray(sealed(bob, [alice], b"hello").raw)
    raw[-1] ^= 0x01  # the signature is the envelope's last field
    decision = decide(bytes(raw), view(), now_ms=NOW_MS)
    assert isinstance(decision, Drop) and decision.reason is DropReason.INVALID
    assert "signature" in decision.detail


def test_envelope_not_addressed_to_this_device_is_dropped() -> None:
    decision = decide(sealed(bob, [carol], b"not yours").raw, view(), now_ms=NOW_MS)
    assert isinstance(decision, Drop) and decision.reason is DropReason.INVALID
    assert "not a recipient" in decision.detail


@pytest.mark.parametrize("raw", [b"", b"\x00", b"\x83\x01\x02\x03", b"\xff" * 100])
def test_garbage_bytes_are_dropped_not_raised(raw: bytes) -> None:
    decision = decide(raw, view(), now_ms=NOW_MS)
    assert isinstance(decision, Drop) and decision.reason is DropReason.INVALID


def test_data_from_a_non_peer_is_dropped() -> None:
    decision = decide(sealed(mallory, [alice], b"spam").raw, view(), now_ms=NOW_MS)
    assert isinstance(decision, Drop) and decision.reason is DropReason.NON_PEER


def test_already_seen_message_is_a_duplicate() -> None:
    envelope = sealed(bob, [alice], b"again")
    seen = RecentlySeen()
    seen.add((bob.public, envelope.msg_id), NOW_MS + 60_000)
    decision = decide(envelope.raw, view(seen=seen), now_ms=NOW_MS)
    assert isinstance(decision, Drop) and decision.reason is DropReason.DUPLICATE


def test_same_msg_id_from_another_sender_is_not_a_duplicate() -> None:
    envelope = sealed(bob, [alice], b"fresh")
    seen = RecentlySeen()
    seen.add((carol.public, envelope.msg_id), NOW_MS + 60_000)
    assert isinstance(decide(envelope.raw, view(seen=seen), now_ms=NOW_MS), Surface)


def test_expiry_from_a_proven_relay_key_is_accepted() -> None:
    notice = ExpiryNotice.single(b"m" * 16, bob.public)
    decision = decide(sealed(relay, [alice], notice.encode(), Kind.EXPIRY).raw, view(),
                      now_ms=NOW_MS)
    assert isinstance(decision, ExpiryArrived) and decision.notice == notice


@pytest.mark.parametrize("sender", [mallory, bob], ids=["stranger", "peer"])
def test_expiry_from_any_other_key_is_dropped(sender: Identity) -> None:
    notice = ExpiryNotice.single(b"m" * 16, bob.public)
    decision = decide(sealed(sender, [alice], notice.encode(), Kind.EXPIRY).raw, view(),
                      now_ms=NOW_MS)
    assert isinstance(decision, Drop) and decision.reason is DropReason.UNTRUSTED_EXPIRY


@pytest.mark.parametrize("sender,origin,kind", [
    (relay, Origin.DEVICE, Kind.EXPIRY),  # a relay's notice passed off as a device's message
    (relay, Origin.RELAY, Kind.DATA),  # a relay key's "notice" that is really data
    (relay, Origin.RELAY, Kind.PEER_CHANGE),  # or a peer list
])
def test_a_sealed_kind_that_disagrees_with_the_origin_is_dropped_as_invalid(
        sender: Identity, origin: Origin, kind: Kind) -> None:
    payload = (ExpiryNotice.single(b"\x01" * 16, bob.public).encode() if kind is Kind.EXPIRY
               else PeerChange(9, (mallory.public,)).encode())
    envelope = seal_contents(sender, origin, Contents(kind, payload).encode(), [alice.public],
                             ttl_s=60, now_ms=NOW_MS)
    decision = decide(envelope.raw, view(peers=[bob, relay]), now_ms=NOW_MS)
    assert isinstance(decision, Drop) and decision.reason is DropReason.INVALID
    assert "origin" in decision.detail


def test_only_the_origin_is_judged_before_decrypting() -> None:
    """A relay's notice from a key that is no relay's is dropped unopened; the kind of a
    device's message is read only after decrypting (it is sealed)."""
    notice = sealed(mallory, [alice], ExpiryNotice.single(b"\x01" * 16, bob.public).encode(),
                    Kind.EXPIRY)
    garbled = seal_contents(mallory, Origin.RELAY, b"", [alice.public], ttl_s=60,
                            now_ms=NOW_MS)  # would not even open
    for envelope in (notice, garbled):
        decision = decide(envelope.raw, view(), now_ms=NOW_MS)
        assert isinstance(decision, Drop) and decision.reason is DropReason.UNTRUSTED_EXPIRY
    unopenable = seal_contents(mallory, Origin.DEVICE, b"", [alice.public], ttl_s=60,
                               now_ms=NOW_MS)
    decision = decide(unopenable.raw, view(), now_ms=NOW_MS)
    assert isinstance(decision, Drop) and decision.reason is DropReason.INVALID


def test_newer_peer_change_from_the_oracle_replaces() -> None:
    change = PeerChange(5, (carol.public,))
    decision = decide(sealed(oracle, [alice], change.encode(), Kind.PEER_CHANGE).raw,
                      view(peer_version=4), now_ms=NOW_MS)
    assert isinstance(decision, PeerChangeArrived)
    assert decision.change == change and decision.standing is Standing.NEWER


@pytest.mark.parametrize("version", [2, 3], ids=["older", "same"])
def test_older_or_equal_peer_change_version_is_ignored(version: int) -> None:
    change = PeerChange(version, (mallory.public,))
    decision = decide(sealed(oracle, [alice], change.encode(), Kind.PEER_CHANGE).raw,
                      view(peer_version=3), now_ms=NOW_MS)
    assert isinstance(decision, PeerChangeArrived) and decision.standing is not Standing.NEWER


@pytest.mark.parametrize("oracle_key", [oracle.public, None], ids=["oracle-set", "no-oracle"])
def test_peer_change_from_another_key_is_dropped(oracle_key: PublicKey | None) -> None:
    change = PeerChange(99, (mallory.public,))
    for sender in (mallory, bob):
        decision = decide(sealed(sender, [alice], change.encode(), Kind.PEER_CHANGE).raw,
                          view(oracle_key=oracle_key), now_ms=NOW_MS)
        assert isinstance(decision, Drop)
        assert decision.reason is DropReason.UNAUTHORIZED_PEER_CHANGE


def test_receipt_from_a_peer_is_accepted() -> None:
    envelope, log = sent_to(bob)
    receipt = Receipt.of(envelope)
    decision = decide(sealed(bob, [alice], receipt.encode(), Kind.RECEIPT).raw, view(sent=log),
                      now_ms=NOW_MS)
    assert isinstance(decision, ReceiptArrived) and decision.receipt == receipt


def test_a_receipt_for_other_content_than_we_sent_is_dropped() -> None:
    """Before, a receipt named only a msg_id: one for any content under that id passed."""
    envelope, log = sent_to(bob)
    wrong = Receipt(envelope.msg_id, bytes(32))
    decision = decide(sealed(bob, [alice], wrong.encode(), Kind.RECEIPT).raw, view(sent=log),
                      now_ms=NOW_MS)
    assert isinstance(decision, Drop) and decision.reason is DropReason.INVALID


def test_receipt_from_a_non_peer_only_for_a_message_we_sent_it() -> None:
    envelope, log = sent_to(carol)
    raw = sealed(carol, [alice], Receipt.of(envelope).encode(), Kind.RECEIPT).raw
    assert isinstance(decide(raw, view(peers=[], sent=log), now_ms=NOW_MS), ReceiptArrived)
    _, to_bob = sent_to(bob)
    for other in (view(peers=[]), view(peers=[], sent=to_bob)):
        decision = decide(raw, other, now_ms=NOW_MS)
        assert isinstance(decision, Drop) and decision.reason is DropReason.UNEXPECTED_RECEIPT


def test_payload_that_does_not_parse_for_its_kind_is_dropped_as_invalid() -> None:
    decision = decide(sealed(bob, [alice], b"not a receipt", Kind.RECEIPT).raw, view(),
                      now_ms=NOW_MS)
    assert isinstance(decision, Drop) and decision.reason is DropReason.INVALID


def test_multi_recipient_envelope_opens_for_each_recipient() -> None:
    envelope = sealed(bob, [alice, carol], b"to both")
    decision = decide(envelope.raw, view(), now_ms=NOW_MS)
    assert isinstance(decision, Surface) and decision.message.payload == b"to both"


@pytest.mark.parametrize("epoch,version,standing", [
    (10, 3, Standing.HELD), (10, 2, Standing.OLDER), (9, 99, Standing.OLDER),
    (11, 1, Standing.NEWER)], ids=["held", "older-version", "older-epoch", "newer-epoch"])
def test_peer_changes_are_ranked_by_epoch_then_version(epoch: int, version: int,
                                                       standing: Standing) -> None:
    held = PeerList([bob.public], 3, epoch=10, oracle=oracle.public)
    change = PeerChange(version, (mallory.public,), epoch)
    decision = decide(sealed(oracle, [alice], change.encode(), Kind.PEER_CHANGE).raw,
                      InboxView(alice, held, {relay.public}, RecentlySeen(), set(), oracle.public),
                      now_ms=NOW_MS)
    assert isinstance(decision, PeerChangeArrived) and decision.standing is standing


TEN_DAYS_MS = 10 * 24 * 3600 * 1000


def test_a_replayed_old_envelope_is_dropped_as_stale_though_never_seen() -> None:
    """The found attack: a genuine 10-day-old "unlock" with a 60 s ttl, replayed by a fake relay,
    surfaced after every restart because de-duplication had forgotten it."""
    unlock = sealed(bob, [alice], b"UNLOCK front door")
    decision = decide(unlock.raw, view(), now_ms=NOW_MS + TEN_DAYS_MS)
    assert isinstance(decision, Drop) and decision.reason is DropReason.STALE
    assert "a replay" in decision.detail


def test_fresh_until_created_at_plus_ttl_plus_the_relays_skew() -> None:
    envelope = sealed(bob, [alice], b"just in time")
    last = envelope.created_at_ms + envelope.ttl_s * 1000 + CLOCK_SKEW_MS
    assert isinstance(decide(envelope.raw, view(), now_ms=last), Surface)
    decision = decide(envelope.raw, view(), now_ms=last + 1)
    assert isinstance(decision, Drop) and decision.reason is DropReason.STALE


@pytest.mark.parametrize("kind,sender,payload", [
    (Kind.RECEIPT, bob, Receipt(b"m" * 16, bytes(32)).encode()),
    (Kind.EXPIRY, relay, ExpiryNotice.single(b"m" * 16, bob.public).encode()),
    (Kind.PEER_CHANGE, oracle, PeerChange(9, (mallory.public,)).encode())],
    ids=["receipt", "expiry", "peer-change"])
def test_every_kind_is_held_to_the_freshness_rule(kind: Kind, sender: Identity,
                                                  payload: bytes) -> None:
    decision = decide(sealed(sender, [alice], payload, kind).raw, view(),
                      now_ms=NOW_MS + TEN_DAYS_MS)
    assert isinstance(decision, Drop) and decision.reason is DropReason.STALE


def test_now_is_the_devices_clock_unless_the_relays_is_later() -> None:
    # A relay claiming an old time cannot make a stale envelope look fresh...
    assert device_now_ms(NOW_MS, -TEN_DAYS_MS) == NOW_MS
    # ...and a device whose clock restarted at 1970 still applies the rule with an honest relay.
    assert device_now_ms(5_000, NOW_MS - 5_000) == NOW_MS


@pytest.mark.parametrize("kind", [Kind.STREAM_OPEN, Kind.STREAM_ACCEPT])
def test_a_stream_handshake_stored_in_a_mailbox_is_dropped(kind: Kind) -> None:
    """Opens and answers are live (SPEC §16): one that a relay stored is never acted on."""
    decision = decide(sealed(bob, [alice], b"\x83" + bytes(3), kind).raw, view(), now_ms=NOW_MS)
    assert isinstance(decision, Drop) and decision.reason is DropReason.INVALID
    assert "never in a mailbox" in decision.detail


def test_a_strangers_key_chain_not_from_the_oracle_costs_no_signature_check() -> None:
    """A stranger's DATA carrying a valid chain of 128 key changes of its own (not about
    this device's oracle) cost 256 signature checks before it was dropped as a non-peer's,
    ~42x a plain message; it is dropped by the keys it names, before any of them."""
    keys = [Identity.generate() for _ in range(MAX_ORACLE_KEY_CHANGES + 1)]
    chain = OracleKeyChain()
    for number, (old, new) in enumerate(zip(keys, keys[1:])):
        chain = chain.extended(OracleKeyChange.sign(old, new, NOW_MS + number))
    envelopes = [sealed(keys[-1], [alice], chain.encode()).raw for _ in range(20)]
    started = time.perf_counter()
    decisions = [decide(raw, view(), now_ms=NOW_MS) for raw in envelopes]
    elapsed = time.perf_counter() - started
    assert {d.reason for d in decisions if isinstance(d, Drop)} == {DropReason.NON_PEER}
    assert len(decisions) == 20
    assert elapsed < 0.1, elapsed  # 256 checks each took 0.25 s for the twenty


def test_a_chain_that_claims_the_oracle_is_still_checked_link_by_link() -> None:
    """The keys a chain names are only a filter: one that claims to lead from the oracle to
    its sender, with a link signed by someone else, is dropped like any stranger's."""
    mallory_key = Identity.generate()
    forged = OracleKeyChange.sign(oracle, mallory_key, NOW_MS)
    flipped = bytearray(forged.encode())
    flipped[-1] ^= 1  # the new key's signature no longer verifies
    payload = canonical.encode([canonical.decode(bytes(flipped), max_size=1000, what="t")])
    decision = decide(sealed(mallory_key, [alice], payload).raw, view(), now_ms=NOW_MS)
    assert isinstance(decision, Drop) and decision.reason is DropReason.NON_PEER
    genuine = OracleKeyChain((forged,)).encode()
    decision = decide(sealed(mallory_key, [alice], genuine).raw, view(), now_ms=NOW_MS)
    assert not isinstance(decision, Drop)  # the very same chain, signed: the oracle moved


def _forged_chains(sender: Identity) -> dict[str, bytes]:
    """Chains a stranger sends a device, each claiming to lead from its oracle to `sender`
    with valid links of the stranger's own keys and one link it cannot sign."""
    keys = [Identity.generate() for _ in range(MAX_ORACLE_KEY_CHANGES - 1)] + [sender]

    def link(old: Identity, new: Identity, at: int) -> list:
        return OracleKeyChange.sign(old, new, NOW_MS + at).to_value()

    own = [link(old, new, n) for n, (old, new) in enumerate(zip(keys, keys[1:]))]
    forged = OracleKeyChange.sign(mallory, sender, NOW_MS + 500).to_value()
    forged[0] = oracle.public.raw  # "from the oracle", signed by someone else
    # The audit's: 126 valid links, then one that does not even connect to them.
    unconnected = own + [forged]
    # Connected: the stranger's links lead to the oracle's key, and from it to the sender.
    into_oracle = OracleKeyChange.sign(mallory, keys[-2], NOW_MS + 499).to_value()
    into_oracle[1] = oracle.public.raw
    connected = own[:-1] + [into_oracle, forged]
    return {"unconnected": canonical.encode(unconnected),
            "connected": canonical.encode(connected)}


@pytest.mark.parametrize("shape", ["unconnected", "connected"])
def test_a_forged_chain_claiming_the_oracle_costs_about_one_signature_check(shape: str) -> None:
    """Past the filter by the keys it claims, a chain's links were checked in order, every
    signature before its shape: 127 valid links of a stranger's own keys and one forged
    from the oracle cost 254 checks (34x a plain stranger's message, by the audit).  Now
    the shape is checked first and the link leaving the oracle's key first of all."""
    sender = Identity.generate()
    forged = _forged_chains(sender)[shape]
    chains = [sealed(sender, [alice], forged).raw for _ in range(10)]
    plain = [sealed(sender, [alice], b"x" * len(forged)).raw for _ in range(10)]

    def cost(envelopes: list[bytes]) -> float:
        started = time.perf_counter()
        for raw in envelopes:
            decision = decide(raw, view(), now_ms=NOW_MS)
            assert isinstance(decision, Drop) and decision.reason is DropReason.NON_PEER
        return time.perf_counter() - started

    cost(plain)  # warm
    assert cost(chains) < 5 * cost(plain)
