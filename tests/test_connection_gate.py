"""The connection gate's bounds, without sockets: pending per address, per address, per key."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict

from runtime.client_address import (FORWARDED, ProxyTrust, client_address, client_unit,
                                     parse_networks)
from continuum.connection_gate import ConnectionGate, ConnectionRefused
from gate_support import Recorder
from proto_support import ALICE, BOB, CAROL


def gate(*, pending: int = 2, per_address: int = 10, per_key: int = 1,
         choose=lambda n: 0) -> ConnectionGate:
    return ConnectionGate(max_pending_per_address=pending, max_per_address=per_address,
                          max_per_key=per_key, unknown_key_rate_per_s=1.0, unknown_key_burst=2,
                          known_keys=2, choose=choose)


def test_a_full_address_makes_room_for_a_newcomer_by_evicting_the_chosen_pending_one() -> None:
    g = gate(pending=2, choose=lambda n: n - 1)  # the newest of those pending, for the test
    first, second, third = Recorder(), Recorder(), Recorder()
    g.admit("a", first)
    g.admit("a", second)
    g.admit("a", third)
    assert (first.evicted, second.evicted, third.evicted) == (False, True, False)
    assert g.pending_handshakes == 2
    g.admit("b", Recorder())  # other addresses have their own share
    assert g.pending_handshakes == 3


def test_authenticated_connections_leave_the_pending_share_and_count_per_address() -> None:
    g = gate(pending=1, per_address=2)
    for key in (ALICE.public, BOB.public):
        g.admit("a", Recorder()).authenticated(key)
    assert g.pending_handshakes == 0
    with pytest.raises(ConnectionRefused) as refused:
        g.admit("a", Recorder())
    assert refused.value.status == 429


def test_a_key_authenticating_again_supersedes_its_oldest_connection() -> None:
    g = gate(per_key=1)
    old, new = Recorder(), Recorder()
    old_slot = g.admit("a", old)
    old_slot.authenticated(ALICE.public)
    g.admit("b", new).authenticated(ALICE.public)
    assert old.superseded and not new.superseded
    old_slot.release()  # the superseded one goes away; the new one stays the key's only one
    third = Recorder()
    g.admit("c", third).authenticated(ALICE.public)
    assert new.superseded and not third.superseded


def test_release_frees_every_share_and_is_idempotent() -> None:
    g = gate(pending=1, per_address=1)
    slot = g.admit("a", Recorder())
    slot.authenticated(ALICE.public)
    slot.release()
    slot.release()
    g.admit("a", Recorder()).authenticated(BOB.public)  # room again


def test_keys_become_known_by_authenticating_and_are_forgotten_beyond_capacity() -> None:
    g = gate(pending=5, per_key=5)
    keys = [ALICE.public, BOB.public]
    assert not any(g.is_known(k) for k in keys)
    for key in keys:
        g.admit("a", Recorder()).authenticated(key)
    assert all(g.is_known(k) for k in keys)

    g.admit("a", Recorder()).authenticated(CAROL.public)  # capacity 2: alice is forgotten
    assert not g.is_known(ALICE.public) and g.is_known(CAROL.public)


def test_the_unknown_key_budget_is_per_address() -> None:
    g = gate()
    assert [g.take_unknown_key_token("a", 0) for _ in range(3)] == [True, True, False]
    assert g.take_unknown_key_token("b", 0)
    assert g.take_unknown_key_token("a", 1_000)  # refilled at 1/s


TRUSTED = parse_networks(["10.0.0.0/8", "::1"])
X_FORWARDED_FOR_TRUST, FORWARDED_TRUST = ProxyTrust(TRUSTED), ProxyTrust(TRUSTED, FORWARDED)


@pytest.mark.parametrize("peer,headers,trust,expected", [
    ("203.0.113.5", {"X-Forwarded-For": "198.51.100.1"}, X_FORWARDED_FOR_TRUST,
     "203.0.113.5"),                                                        # untrusted peer
    ("10.0.0.2", {"X-Forwarded-For": "198.51.100.1"}, X_FORWARDED_FOR_TRUST, "198.51.100.1"),
    ("10.0.0.2", {"X-Forwarded-For": "6.6.6.6, 198.51.100.1, 10.0.0.9"}, X_FORWARDED_FOR_TRUST,
     "198.51.100.1"),
    ("10.0.0.2", {"Forwarded": 'for=192.0.2.60;proto=http, for="[2001:db8::7]:443"'},
     FORWARDED_TRUST, "2001:db8::7"),
    ("10.0.0.2", {"Forwarded": "for=192.0.2.60:4711"}, FORWARDED_TRUST, "192.0.2.60"),
    ("10.0.0.2", {}, X_FORWARDED_FOR_TRUST, "10.0.0.2"),                   # nothing forwarded
    ("::1", {"X-Forwarded-For": "10.1.1.1, 10.2.2.2"}, X_FORWARDED_FOR_TRUST,
     "10.1.1.1"),                                                           # all proxies
    ("10.0.0.2", {"X-Forwarded-For": "not-an-address"}, X_FORWARDED_FOR_TRUST, "not-an-address"),
    # Only the header the proxies write is read; the other is the client's own.
    ("10.0.0.2", {"Forwarded": "for=198.51.100.7", "X-Forwarded-For": "203.0.113.66"},
     X_FORWARDED_FOR_TRUST, "203.0.113.66"),
    ("10.0.0.2", {"Forwarded": "for=203.0.113.66", "X-Forwarded-For": "198.51.100.7"},
     FORWARDED_TRUST, "203.0.113.66"),
    ("10.0.0.2", {"Forwarded": "for=198.51.100.7"}, X_FORWARDED_FOR_TRUST, "10.0.0.2"),
    # A proxy that adds its own line after the client's (HAProxy): every line is read.
    ("10.0.0.2", [("X-Forwarded-For", "6.6.6.6"), ("X-Forwarded-For", "198.51.100.1")],
     X_FORWARDED_FOR_TRUST, "198.51.100.1"),
    ("10.0.0.2", [("Forwarded", "for=6.6.6.6"), ("Forwarded", "for=198.51.100.1")],
     FORWARDED_TRUST, "198.51.100.1"),
])
def test_the_client_address_is_the_first_untrusted_hop(peer: str, headers: dict | list,
                                                        trust: ProxyTrust, expected: str) -> None:
    assert client_address(peer, CIMultiDict(headers), trust) == expected


def test_bad_networks_are_named() -> None:
    with pytest.raises(ValueError, match="'10.0.0.0/33'"):
        parse_networks(["10.0.0.0/33"])



@pytest.mark.parametrize("address,unit", [
    ("198.51.100.7", "198.51.100.7"),
    ("2001:db8:1:2::5", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:ffff:1:2:3", "2001:db8:1:2::/64"),   # the same host's other address
    ("2001:db8:1:3::5", "2001:db8:1:3::/64"),           # the next subscriber
    ("::ffff:198.51.100.7", "198.51.100.7"),
    ("fe80::1%eth0", "fe80::/64"),
    ("unknown", "unknown"),
])
def test_a_clients_budget_unit_is_its_ipv4_address_or_its_ipv6_64(address: str, unit: str) -> None:
    assert client_unit(address) == unit
