"""CONFIG and CONFIG_REPORT (SPEC §21) without a network: the payloads, the device's inbox
rules for them (oracle key only, stamps only grow), the merge rule and the applied file."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from client.config import CONFIG_FILE, AppliedConfig, ConfigUpdate
from client.dedup import RecentlySeen
from client.inbox import (ConfigArrived, ConfigReportArrived, Drop, DropReason, InboxView,
                          decide)
from client.peers import PeerList, Standing
from client.tracking import SentLog
from fuzz_settings import quick
from proto import Identity, Kind, seal_envelope
from proto import canonical
from proto.config import (MAX_CONFIG_BYTES, MAX_CONFIG_DEPTH, ConfigPush, ConfigReport, merged,
                          parse_document)
from proto.errors import DecodeError, InvalidFieldError, OversizeError, ProtocolError

NOW_MS = 1_700_000_000_000
device, oracle, mallory, peer = (Identity.generate() for _ in range(4))


def config_envelope(sender: Identity, push: ConfigPush, to: Identity = device):
    return seal_envelope(sender, Kind.CONFIG, [to.public], push.encode(), ttl_s=60,
                         now_ms=NOW_MS)


def view(applied: AppliedConfig | None = None, peers: tuple[Identity, ...] = ()) -> InboxView:
    return InboxView(device, PeerList([p.public for p in peers]), set(), RecentlySeen(),
                     SentLog(), oracle.public, applied)


# -- payloads -----------------------------------------------------------------------------

def test_config_and_report_round_trip_in_one_spelling() -> None:
    push = ConfigPush(7, 3, {"b": [1, 2.5, None], "a": {"é": True}})
    assert ConfigPush.decode(push.encode()) == push
    # Keys sorted, no spaces, UTF-8 as is: the oracle's one spelling.
    assert canonical.decode(push.encode(), max_size=1000, what="t")[2] == \
        '{"a":{"é":true},"b":[1,2.5,null]}'
    report = ConfigReport(7, 3, {"uptime_s": 12})
    assert ConfigReport.decode(report.encode()) == report


@pytest.mark.parametrize("text,error", [
    ("[]", "must be a JSON object"), ('"x"', "must be a JSON object"),
    ("{", "not valid JSON"), ('{"a":1,"a":2}', "duplicate key"), ('{"a":NaN}', "NaN"),
    ('{"a":Infinity}', "Infinity"), ('{"a":"\\ud800"}', "lone surrogate"),
    ('{"a":1e400}', "out of range"), ('{"a":[-1.5e309]}', "out of range"),
    ("{" + '"a":{' * MAX_CONFIG_DEPTH + "}" * (MAX_CONFIG_DEPTH + 1), "nests deeper"),
    ("[" * 100_000, "bytes, more than"), ("[" * 20_000, "nests deeper"),
])
def test_bad_documents_are_refused_saying_why(text: str, error: str) -> None:
    with pytest.raises((InvalidFieldError, OversizeError)) as refused:
        parse_document(text)
    assert error in refused.value.message


def test_the_bounds_are_exact() -> None:
    padding = MAX_CONFIG_BYTES - len('{"a":""}')
    assert parse_document('{"a":"' + "x" * padding + '"}')
    with pytest.raises(OversizeError):
        parse_document('{"a":"' + "x" * (padding + 1) + '"}')
    nested = "{" + '"a":{' * (MAX_CONFIG_DEPTH - 1) + "}" * MAX_CONFIG_DEPTH
    assert parse_document(nested)
    with pytest.raises(OversizeError):  # the oracle never sends what a device would refuse
        ConfigPush(1, 1, {"a": "x" * (padding + 1)}).encode()


def test_every_truncation_and_wrong_shape_is_refused() -> None:
    encoded = ConfigPush(5, 9, {"interval_s": 30}).encode()
    for cut in range(len(encoded)):
        with pytest.raises(DecodeError):
            ConfigPush.decode(encoded[:cut])
    for value in ([5, 9], [5, 9, "{}", 1], [-1, 9, "{}"], [5, 2**63, "{}"], [5, 9, b"{}"],
                  [5, 9, "[]"], {"epoch": 5}):
        with pytest.raises(DecodeError):
            ConfigPush.decode(canonical.encode(value))
        with pytest.raises(DecodeError):
            ConfigReport.decode(canonical.encode(value))


@quick(300)
@given(st.binary(max_size=300))
def test_garbage_raises_only_protocol_errors(data: bytes) -> None:
    for kind in (ConfigPush, ConfigReport):
        try:
            kind.decode(data)
        except ProtocolError:
            pass


@quick(200)
@given(st.text(max_size=200))
def test_any_text_is_a_document_or_a_clear_refusal(text: str) -> None:
    try:
        document = parse_document(text)
    except ProtocolError as exc:
        assert exc.message
    else:
        assert isinstance(document, dict)


# -- the device's rules -------------------------------------------------------------------

def test_only_the_oracle_key_configures_a_device() -> None:
    forged = config_envelope(mallory, ConfigPush(1, 1, {"evil": True}))
    decision = decide(forged.raw, view(), now_ms=NOW_MS)
    assert isinstance(decision, Drop) and decision.reason is DropReason.UNAUTHORIZED_CONFIG
    # Not even a peer may; and without an oracle configured nobody may.
    assert decide(config_envelope(peer, ConfigPush(1, 1, {})).raw, view(peers=(peer,)),
                  now_ms=NOW_MS).reason is DropReason.UNAUTHORIZED_CONFIG
    no_oracle = InboxView(device, PeerList(), set(), RecentlySeen(), SentLog())
    assert decide(config_envelope(oracle, ConfigPush(1, 1, {})).raw, no_oracle,
                  now_ms=NOW_MS).reason is DropReason.UNAUTHORIZED_CONFIG


def test_a_forged_signature_or_altered_bytes_never_configure() -> None:
    genuine = config_envelope(oracle, ConfigPush(1, 1, {"a": 1}))
    raw = bytearray(genuine.raw)
    raw[-1] ^= 1  # the signature
    assert decide(bytes(raw), view(), now_ms=NOW_MS).reason is DropReason.INVALID
    raw = bytearray(genuine.raw)
    raw[-80] ^= 1  # the ciphertext
    assert decide(bytes(raw), view(), now_ms=NOW_MS).reason is DropReason.INVALID
    assert decide(genuine.raw[:-1], view(), now_ms=NOW_MS).reason is DropReason.INVALID
    # Sealed to someone else: not for this device.
    other = config_envelope(oracle, ConfigPush(1, 1, {}), to=peer)
    assert decide(other.raw, view(), now_ms=NOW_MS).reason is DropReason.INVALID


def test_a_config_whose_document_is_bad_is_dropped() -> None:
    bad = seal_envelope(oracle, Kind.CONFIG, [device.public], canonical.encode([1, 1, "[1]"]),
                        ttl_s=60, now_ms=NOW_MS)
    assert decide(bad.raw, view(), now_ms=NOW_MS).reason is DropReason.INVALID


def test_stamps_rank_like_peer_lists(tmp_path) -> None:
    applied = AppliedConfig.in_home(tmp_path)
    applied.apply(ConfigUpdate(10, 5, {"a": 1}), oracle.public, {"ok": True})

    def standing(epoch: int, version: int, sender: Identity = oracle) -> Standing:
        decision = decide(config_envelope(sender, ConfigPush(epoch, version, {})).raw,
                          InboxView(device, PeerList(), set(), RecentlySeen(), SentLog(),
                                    sender.public, applied), now_ms=NOW_MS)
        assert isinstance(decision, ConfigArrived)
        return decision.standing

    assert standing(10, 6) is Standing.NEWER
    assert standing(11, 1) is Standing.NEWER  # a restored oracle's new epoch
    assert standing(10, 5) is Standing.HELD
    assert standing(10, 4) is Standing.OLDER
    assert standing(9, 99) is Standing.OLDER  # an earlier epoch never comes back
    assert standing(1, 1, sender=mallory) is Standing.NEWER  # re-enrolled with a new oracle


def test_the_applied_config_survives_a_restart_and_refuses_what_it_outranks(tmp_path) -> None:
    AppliedConfig.in_home(tmp_path).apply(ConfigUpdate(3, 2, {"x": [1]}), oracle.public,
                                          {"y": 2})
    record = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert record == {"epoch": 3, "version": 2, "oracle": oracle.public.text,
                      "config": {"x": [1]}, "reported": {"y": 2}}
    again = AppliedConfig.in_home(tmp_path)
    assert (again.stamp, again.oracle, again.document, again.reported) == \
        ((3, 2), oracle.public, {"x": [1]}, {"y": 2})
    assert again.standing((3, 1), oracle.public) is Standing.OLDER
    (tmp_path / CONFIG_FILE).write_text('{"epoch": -1}')
    with pytest.raises(ValueError, match="epoch"):
        AppliedConfig.in_home(tmp_path)


def test_reports_are_taken_from_peers_only() -> None:
    report = ConfigReport(1, 1, {"ok": True})
    from_peer = seal_envelope(peer, Kind.CONFIG_REPORT, [device.public], report.encode(),
                              ttl_s=60, now_ms=NOW_MS)
    decision = decide(from_peer.raw, view(peers=(peer,)), now_ms=NOW_MS)
    assert isinstance(decision, ConfigReportArrived) and decision.report == report
    stranger = seal_envelope(mallory, Kind.CONFIG_REPORT, [device.public], report.encode(),
                             ttl_s=60, now_ms=NOW_MS)
    assert decide(stranger.raw, view(peers=(peer,)), now_ms=NOW_MS).reason is \
        DropReason.NON_PEER


# -- the merge rule -----------------------------------------------------------------------

def test_merge_is_deep_for_objects_and_later_documents_win() -> None:
    first = {"log": {"level": "info", "file": "/var/log/a"}, "ports": [1, 2], "x": 1}
    second = {"log": {"level": "debug"}, "ports": [3], "y": None}
    own = {"x": None, "log": {"file": "/tmp/b"}}
    assert merged([first, second, own]) == {
        "log": {"level": "debug", "file": "/tmp/b"}, "ports": [3], "x": None, "y": None}
    assert first == {"log": {"level": "info", "file": "/var/log/a"}, "ports": [1, 2], "x": 1}
    assert merged([{"a": {"b": 1}}, {"a": 2}, {"a": {"c": 3}}]) == {"a": {"c": 3}}
    assert merged([]) == {}


@quick(150)
@given(st.one_of(st.binary(max_size=200),
                 st.lists(st.one_of(st.integers(-5, 2**64), st.text(max_size=30),
                                    st.binary(max_size=10), st.none()), max_size=4)
                 .map(canonical.encode)))
def test_any_sealed_config_or_report_is_decided_without_raising(plaintext: bytes) -> None:
    """Whatever the oracle's key seals as CONFIG, or a peer as CONFIG_REPORT, the device
    decides: applied only if it parses, else dropped as invalid."""
    for sender, kind in ((oracle, Kind.CONFIG), (peer, Kind.CONFIG_REPORT)):
        envelope = seal_envelope(sender, kind, [device.public], plaintext, ttl_s=60,
                                 now_ms=NOW_MS)
        decision = decide(envelope.raw, view(peers=(peer,)), now_ms=NOW_MS)
        assert isinstance(decision, (ConfigArrived, ConfigReportArrived)) or \
            decision.reason is DropReason.INVALID
