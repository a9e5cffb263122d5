"""Pure decision: what a device does with one delivered envelope.

`decide(raw, view, limits, now_ms=…)` takes the delivered bytes, a read-only
view of the device's state (its identity, peers, trusted keys, what it has
seen and what it awaits), the connection's limits and the time, and returns
one decision; it changes nothing and reads no clock, so every rule below is
tested without a network.  (What it has seen and awaits may be read from the
device's state file; `decide` only asks whether a pair is in them.)  The
device shell then acts on the decision and acknowledges the delivery
whatever it was: a message that can never be accepted must not be
re-delivered forever.

Rules, cheapest first so hostile input costs as little as possible:

1. bytes that are not a well-formed envelope, or not addressed to this
   device → drop (invalid);
2. an envelope past `created_at + ttl + skew` by the device's `now`
   (`freshness`, SPEC §11) → drop (stale): no honest relay delivers it, so
   it is a replay, whatever a restart forgot;
3. a signature that does not verify → drop (invalid);
4. a (sender, msg_id) already handled → drop (duplicate);
5. a relay's notice (the one thing the clear header says of what an envelope
   means, its origin) only from relay keys proven in a WELCOME, checked
   before decrypting;
6. a payload that does not decrypt, whose sealed kind disagrees with its
   origin, or that does not parse for its kind → drop (invalid);
7. who may send what, now that the kind is known: DATA from peers only;
   PEER_CHANGE from the oracle key followed only (configured, or where its
   key chain led: rule 10).  The kind is sealed so that relays cannot tell
   receipts from data from peer changes; the price is that these refusals
   cost one decryption (of an envelope whose signature verified);
8. RECEIPT only from a peer, or from a recipient of a message this device
   sent and still tracks (the oracle has no peers but needs its receipts);
9. a PEER_CHANGE is ranked against the held list by (epoch, version) and
   oracle (`PeerList.standing`): the device applies NEWER, receipts NEWER and
   HELD, and neither applies nor receipts OLDER;
10. with an oracle configured, DATA from a non-peer is the one exception to
   rule 7: it may be the oracle's new key announcing itself (SPEC §15), so it
   is taken only as the oracle's key chain sent by the key that chain ends at,
   which leads from the configured oracle key (follow it) or already is it (a
   re-delivery: receipt again); anything else is dropped as a non-peer's.
   Only the oracle can write to a device at relays that enforce peer groups,
   so elsewhere a stranger's message costs one decryption;
11. a stream's open or answer (SPEC §16) stored in a mailbox → drop (invalid):
   they are live, in stream frames only, so a stored copy is a replay or a mistake;
12. a CALL (SPEC §18) only from a peer or the oracle key followed, else drop
   (non-peer): a stranger's call never reaches a handler.  A RESPONSE is taken
   from anyone here; the device matches it against its outstanding calls (the
   callee and the correlation id), which `decide` does not hold.
13. CONFIG (SPEC §21) only from the oracle key followed, ranked against the applied
   configuration by (epoch, version) and oracle like a PEER_CHANGE (rule 9);
   CONFIG_REPORT only from a peer (the oracle's peers are its devices).
14. a transfer's manifest or chunk (SPEC §17) from peers only, parsed strictly; whether it
   fits a transfer under way is the receiver's to say (`transfer_in`), with its state.
"""

from __future__ import annotations

from collections.abc import Collection, Container
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from proto import (DEFAULT_LIMITS, Contents, Envelope, Identity, Kind, Limits, Origin, PublicKey,
                   decode_envelope)
from proto.calls import Call, Response
from proto.errors import ProtocolError
from proto.config import ConfigPush, ConfigReport
from proto.payloads import ExpiryNotice, PeerChange, Receipt
from proto.rotation import OracleKeyChain
from proto.transfers import Chunk, Manifest

from .config import AppliedConfig, ConfigUpdate
from .dedup import MessageKey
from .freshness import is_fresh, is_from_the_future
from .peers import PeerList, Standing


class DropReason(StrEnum):
    """Why a delivery was dropped; each has its own counter in `DeviceStats`."""

    INVALID = "invalid"
    STALE = "stale"
    DUPLICATE = "duplicate"
    NON_PEER = "non_peer"
    UNTRUSTED_EXPIRY = "untrusted_expiry"
    UNAUTHORIZED_PEER_CHANGE = "unauthorized_peer_change"
    UNEXPECTED_RECEIPT = "unexpected_receipt"
    UNAUTHORIZED_CONFIG = "unauthorized_config"
    REFUSED_TRANSFER = "refused_transfer"  # a file over this device's bounds (SPEC §17)


@dataclass(frozen=True)
class InboundMessage:
    """A decrypted DATA message from a peer, as the application sees it."""

    sender: PublicKey
    msg_id: bytes
    payload: bytes
    kind: Kind
    created_at_ms: int


@dataclass(frozen=True)
class Drop:
    reason: DropReason
    detail: str
    envelope: Envelope | None = None


@dataclass(frozen=True)
class Surface:
    """Hand `message` to the application (and send the sender a receipt)."""

    envelope: Envelope
    message: InboundMessage


@dataclass(frozen=True)
class ReceiptArrived:
    """`envelope.sender` decrypted our message `receipt.msg_id`."""

    envelope: Envelope
    receipt: Receipt


@dataclass(frozen=True)
class ExpiryArrived:
    """A relay says our message expired unread in one recipient's mailbox."""

    envelope: Envelope
    notice: ExpiryNotice


@dataclass(frozen=True)
class OracleKeyChanged:
    """The oracle's key chain from `chain.current`: the oracle moved there (`moved`), or the
    device follows that key already (a re-delivery)."""

    envelope: Envelope
    chain: OracleKeyChain
    moved: bool


@dataclass(frozen=True)
class PeerChangeArrived:
    """The oracle's peer list; `standing` says whether it replaces the stored one (NEWER),
    is the one held (HELD), or is behind it (OLDER: neither applied nor receipted)."""

    envelope: Envelope
    change: PeerChange
    standing: Standing


@dataclass(frozen=True)
class CallArrived:
    """A peer (or the oracle) calls this device; its deadline is not checked yet."""

    envelope: Envelope
    call: Call


@dataclass(frozen=True)
class ResponseArrived:
    """A response to one of our calls, if it matches one outstanding (the device checks)."""

    envelope: Envelope
    response: Response


@dataclass(frozen=True)
class ConfigArrived:
    """The oracle's configuration; `standing` as for a peer change: apply NEWER, report
    NEWER and HELD, neither apply nor report OLDER."""

    envelope: Envelope
    update: ConfigUpdate
    standing: Standing


@dataclass(frozen=True)
class ConfigReportArrived:
    """A device's report of the configuration it applied (the oracle reads these)."""

    envelope: Envelope
    report: ConfigReport


@dataclass(frozen=True)
class ManifestArrived:
    """A peer starts sending a file (SPEC §17)."""

    envelope: Envelope
    manifest: Manifest


@dataclass(frozen=True)
class ChunkArrived:
    """One slice of a file a peer sends (SPEC §17)."""

    envelope: Envelope
    chunk: Chunk


Decision = (Drop | Surface | ReceiptArrived | ExpiryArrived | PeerChangeArrived
            | OracleKeyChanged | CallArrived | ResponseArrived | ConfigArrived
            | ConfigReportArrived | ManifestArrived | ChunkArrived)


class SentMessages(Protocol):
    """What `decide` reads of the messages this device sent (`tracking.SentLog`)."""

    def __contains__(self, pair: object) -> bool: ...

    def sealed_as(self, msg_id: bytes) -> Collection[bytes] | None: ...


@dataclass(frozen=True)
class InboxView:
    """What `decide` may read of the device's state; live objects, never modified here."""

    identity: Identity
    peers: PeerList
    relay_keys: Container[PublicKey]
    seen: Container[MessageKey]
    # (our msg_id, recipient) pairs for which a receipt is still awaited, and the
    # content hash a receipt for each of our messages must name.
    awaiting_receipt: SentMessages
    oracle_key: PublicKey | None = None
    config: AppliedConfig | None = None


def decide(raw: bytes, view: InboxView, limits: Limits = DEFAULT_LIMITS, *,
           now_ms: int) -> Decision:
    """Return what to do with one delivered envelope; never raises on bad input.

    `limits` are the connection's (the relay's announced envelope limit, bounded
    by the device's cap): what the relay accepted, the device can decode.
    `now_ms` is the freshness rule's now (`freshness.device_now_ms`).
    """
    try:
        envelope = decode_envelope(raw, limits)
    except ProtocolError as exc:
        return Drop(DropReason.INVALID, f"undecodable envelope: {exc.message}")
    if view.identity.public not in envelope.recipient_keys:
        return Drop(DropReason.INVALID, "this device is not a recipient", envelope)
    if is_from_the_future(envelope, now_ms):
        ahead_s = (envelope.created_at_ms - now_ms) // 1000
        return Drop(DropReason.STALE, f"created {ahead_s} s ahead of this device's clock:"
                    " no relay may have stored it", envelope)
    if not is_fresh(envelope, now_ms):
        age_s = (now_ms - envelope.created_at_ms) // 1000
        return Drop(DropReason.STALE, f"created {age_s} s ago with a ttl of {envelope.ttl_s} s:"
                    " no relay may deliver it any more (a replay)", envelope)
    try:
        envelope.verify()
    except ProtocolError as exc:
        return Drop(DropReason.INVALID, exc.message, envelope)
    if (envelope.sender, envelope.msg_id) in view.seen:
        return Drop(DropReason.DUPLICATE, "already handled", envelope)
    if envelope.origin is Origin.RELAY and envelope.sender not in view.relay_keys:
        return Drop(DropReason.UNTRUSTED_EXPIRY, f"{envelope.sender.text} is not a relay key",
                    envelope)
    try:
        return _interpret(envelope, envelope.open(view.identity), view, limits)
    except ProtocolError as exc:
        return Drop(DropReason.INVALID, exc.message, envelope)


def _interpret(envelope: Envelope, contents: Contents, view: InboxView,
               limits: Limits) -> Decision:
    """Rules 7 to 14 for the decrypted contents; DecodeError propagates to `decide`."""
    sender, kind, plaintext = envelope.sender, contents.kind, contents.plaintext
    if kind is Kind.DATA:
        if sender in view.peers:
            return Surface(envelope, InboundMessage(sender, envelope.msg_id, plaintext, kind,
                                                    envelope.created_at_ms))
        if view.oracle_key is None:
            return Drop(DropReason.NON_PEER, f"{sender.text} is not a peer", envelope)
        return _oracle_key_change(envelope, plaintext, view)
    if kind is Kind.PEER_CHANGE:
        if view.oracle_key is None or sender != view.oracle_key:
            return Drop(DropReason.UNAUTHORIZED_PEER_CHANGE,
                        f"{sender.text} is not the oracle key", envelope)
        change = PeerChange.decode(plaintext)
        return PeerChangeArrived(envelope, change, view.peers.standing(change.stamp, sender))
    if kind is Kind.CALL:
        if sender not in view.peers and sender != view.oracle_key:
            return Drop(DropReason.NON_PEER, f"a call from {sender.text}, not a peer", envelope)
        return CallArrived(envelope, Call.decode(plaintext, limits))
    if kind is Kind.RESPONSE:
        return ResponseArrived(envelope, Response.decode(plaintext, limits))
    if kind is Kind.CONFIG:
        if view.oracle_key is None or sender != view.oracle_key:
            return Drop(DropReason.UNAUTHORIZED_CONFIG,
                        f"{sender.text} is not the oracle key", envelope)
        update = ConfigPush.decode(plaintext)
        held = view.config if view.config is not None else AppliedConfig()
        return ConfigArrived(envelope, update, held.standing(update.stamp, sender))
    if kind is Kind.CONFIG_REPORT:
        if sender not in view.peers:
            return Drop(DropReason.NON_PEER, f"{sender.text} is not a peer", envelope)
        return ConfigReportArrived(envelope, ConfigReport.decode(plaintext))
    if kind in (Kind.TRANSFER_MANIFEST, Kind.TRANSFER_CHUNK):
        if sender not in view.peers:
            return Drop(DropReason.NON_PEER, f"{sender.text} is not a peer", envelope)
        if kind is Kind.TRANSFER_MANIFEST:
            return ManifestArrived(envelope, Manifest.decode(plaintext))
        return ChunkArrived(envelope, Chunk.decode(plaintext))
    if kind in (Kind.STREAM_OPEN, Kind.STREAM_ACCEPT):
        return Drop(DropReason.INVALID, f"a {kind.name} travels in stream frames (SPEC §16),"
                    " never in a mailbox", envelope)
    if kind is Kind.RECEIPT:
        receipt = Receipt.decode(plaintext)
        ours = view.awaiting_receipt.sealed_as(receipt.msg_id)
        if ours is not None and receipt.content_hash not in ours:
            return Drop(DropReason.INVALID, "receipt names other content than we sent",
                        envelope)
        if (sender not in view.peers
                and (receipt.msg_id, sender) not in view.awaiting_receipt):
            return Drop(DropReason.UNEXPECTED_RECEIPT,
                        f"receipt from non-peer {sender.text} for no message of ours",
                        envelope)
        return ReceiptArrived(envelope, receipt)
    return ExpiryArrived(envelope, ExpiryNotice.decode(plaintext))  # from a relay key (rule 5)


def _oracle_key_change(envelope: Envelope, plaintext: bytes, view: InboxView) -> Decision:
    """Rule 10: DATA from a non-peer counts only as the oracle's key chain from its end."""
    sender, oracle = envelope.sender, view.oracle_key
    not_peer = Drop(DropReason.NON_PEER, f"{sender.text} is not a peer", envelope)
    assert oracle is not None  # rule 7 dropped non-peer DATA without an oracle
    try:
        # A chain that does not lead from our oracle to its sender (a move), or that our
        # oracle sends about its own key, is a stranger's message: refused before its
        # signatures are checked (up to 256, 42x a plain message's cost).  Once checked, the
        # chain's keys are those it claimed.
        value = OracleKeyChain.decode_value(plaintext)
        former, current = OracleKeyChain.claimed_keys(value)
        moved = sender == current and oracle in former
        if not moved and not (sender == oracle and current == oracle):
            return not_peer
        chain = OracleKeyChain.from_value(value, trusted=oracle)
    except ProtocolError:
        return not_peer
    return OracleKeyChanged(envelope, chain, moved=moved)
