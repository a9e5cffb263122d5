"""Rule 9 of the inbox (SPEC §15): a device follows its oracle to a new key only along a chain
the key it trusts signed, from the key that chain ends at; forgeries and replays change nothing."""

from __future__ import annotations

from client.dedup import RecentlySeen
from client.inbox import Drop, DropReason, InboxView, OracleKeyChanged, Surface, decide
from client.peers import PeerList
from proto import Identity, Kind, PublicKey, seal_envelope
from proto.rotation import OracleKeyChain, OracleKeyChange

NOW_MS = 1_700_000_000_000
alice, bob, o1, o2, o3, mallory = (Identity.generate() for _ in range(6))
ONE = OracleKeyChain().extended(OracleKeyChange.sign(o1, o2, NOW_MS))
TWO = ONE.extended(OracleKeyChange.sign(o2, o3, NOW_MS + 1))


def view(oracle: PublicKey | None) -> InboxView:
    return InboxView(alice, PeerList([bob.public]), set(), RecentlySeen(), set(), oracle)


def notice(sender: Identity, chain: OracleKeyChain | bytes) -> bytes:
    payload = chain if isinstance(chain, bytes) else chain.encode()
    return seal_envelope(sender, Kind.DATA, [alice.public], payload, ttl_s=60,
                         now_ms=NOW_MS).raw


def test_the_chain_from_the_key_it_ends_at_moves_the_device_forward() -> None:
    for held in (o1, o2):  # one step, or several at once
        decision = decide(notice(o3, TWO), view(held.public), now_ms=NOW_MS)
        assert isinstance(decision, OracleKeyChanged) and decision.moved
        assert decision.chain.current == o3.public
    # A re-delivery: receipt, no move.
    again = decide(notice(o3, TWO), view(o3.public), now_ms=NOW_MS)
    assert isinstance(again, OracleKeyChanged) and not again.moved


def test_forged_and_replayed_chains_are_dropped() -> None:
    forged = OracleKeyChain().extended(OracleKeyChange.sign(mallory, o2, NOW_MS))
    cases = [
        (mallory, ONE, o1),  # a genuine chain, sent by a key it does not end at
        (o2, forged, o1),  # a chain the trusted key never signed
        (o2, ONE, o3),  # a replay of an old step: it never leads back
        (o3, TWO, alice),  # a chain that is not about the trusted key
        (o2, b"not a chain", o1),
    ]
    for sender, chain, held in cases:
        decision = decide(notice(sender, chain), view(held.public), now_ms=NOW_MS)
        assert isinstance(decision, Drop) and decision.reason is DropReason.NON_PEER, (
            sender, held)


def test_without_an_oracle_non_peer_data_is_not_opened_and_peers_data_is_data() -> None:
    decision = decide(notice(o2, ONE), view(None), now_ms=NOW_MS)
    assert isinstance(decision, Drop) and decision.reason is DropReason.NON_PEER
    assert "not a peer" in decision.detail
    # A peer's bytes are its own.
    from_peer = decide(notice(bob, ONE), view(o1.public), now_ms=NOW_MS)
    assert isinstance(from_peer, Surface) and from_peer.message.payload == ONE.encode()
