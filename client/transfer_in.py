"""Files arriving from peers (SPEC §17): chunks to a partial file, verified, surfaced once.

A peer's manifest opens a transfer: a row in the state file and a partial file
under the home (`transfers/partial/`).  Each chunk that fits the manifest is
written at its offset and fsynced, then recorded (with its envelope as seen) in
one commit, and only then ACKed: so a crash loses nothing the relay no longer
holds, and a chunk sent or delivered twice is a duplicate, whichever side
restarted.  Once every chunk is on disk the whole file's size and BLAKE2b-256
are checked against the manifest; a file that matches moves to
`transfers/received/` and is offered to the application (`Device.files()`),
which takes each file once: the transfer's one receipt (for the manifest's
envelope) is queued in the same commit that marks it taken.  A file that does
not match is deleted and never offered.

Bounds: a manifest over `max_bytes`, or beyond `max_incoming` files arriving or
waiting to be taken, or beyond `max_incoming_per_peer` of them from its sender, is
refused (so at most max_incoming x max_bytes on disk, and no one peer holds every
place: its files that never finish would otherwise refuse every other peer's until
they expire); a transfer not finished when its manifest expires (created_at + ttl +
skew), or `max_hold_ms` after it began by the device's own clock if that comes first, is
forgotten with its partial file (`expire`): a TTL is the sender's to sign, and a relay
that does not cap TTLs would let a peer's stalled files hold their places for decades.
Refusals are drops with a reason the CLI prints; the sender hears nothing
(no receipt comes), which the README states.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import deque
from dataclasses import dataclass
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path

from proto import Envelope, Limits, PublicKey, decode_envelope
from proto.errors import ProtocolError
from proto.transfers import Manifest, file_hasher
from runtime.clock import now_ms
from runtime.logs import library_logger

from .dedup import RecentlySeen
from .freshness import valid_until_ms
from .inbox import ChunkArrived, Drop, DropReason, ManifestArrived
from .state import DeviceState, TransferInRow, transaction

log = library_logger("continuum.client")

DEFAULT_MAX_TRANSFER_BYTES = 1024**3
DEFAULT_MAX_INCOMING = 8
# The relay's default longest TTL (`--max-ttl-s`): through a default relay no honest
# transfer's manifest stays valid longer, so the cap only bites what others let through.
DEFAULT_MAX_HOLD_MS = 7 * 24 * 3600 * 1000
TRANSFERS_DIR = "transfers"
_READ_BYTES = 1024 * 1024


class InState(StrEnum):
    RECEIVING = "receiving"
    COMPLETE = "complete"  # verified, waiting for the application
    SURFACED = "surfaced"  # taken by the application, receipt queued
    FAILED = "failed"  # did not match its manifest: deleted, never offered
    REFUSED = "refused"  # over a bound: remembered so its chunks are dropped quietly


@dataclass(frozen=True)
class ReceivedFile:
    """A verified file from a peer.  `path` is under the home and now the application's: move
    or delete it.  `msg_id` is the manifest envelope's (what the one receipt names)."""

    sender: PublicKey
    transfer_id: bytes
    msg_id: bytes
    name: str
    media_type: str
    size: int
    path: Path


class IncomingTransfers:
    """The receiving half; `Device` hands it each manifest and chunk, in delivery order."""

    def __init__(self, home: Path, state: DeviceState, seen: RecentlySeen, *,
                 max_bytes: int = DEFAULT_MAX_TRANSFER_BYTES,
                 max_incoming: int = DEFAULT_MAX_INCOMING,
                 max_incoming_per_peer: int | None = None,
                 max_hold_ms: int = DEFAULT_MAX_HOLD_MS,
                 clock: Callable[[], int] = now_ms) -> None:
        """`max_incoming_per_peer`: None for half of `max_incoming` (at least one);
        `clock`: the device's own, in ms (never the relay's or the sender's)."""
        self._root = home / TRANSFERS_DIR
        self._state = state
        self._seen = seen
        self.max_bytes = max_bytes
        self.max_incoming = max_incoming
        self.max_incoming_per_peer = (max(1, max_incoming // 2) if max_incoming_per_peer is None
                                      else max_incoming_per_peer)
        self.max_hold_ms = max_hold_ms
        self._clock = clock
        self.ready: deque[ReceivedFile] = deque()
        self.ready_event = asyncio.Event()
        self._handling = asyncio.Lock()

    async def load(self) -> None:
        """Offer again what a previous run verified and nobody took; finish verifying what it
        received in full but did not get to check (which offers it, so after the others:
        the other way round offered each of those twice)."""
        for row in self._state.transfers_in(InState.COMPLETE):
            self._offer(row)
        for row in self._state.transfers_in(InState.RECEIVING):
            if row.received == Manifest.decode(row.manifest).chunk_count:
                mismatch = await self._verify(row)
                if mismatch is not None:
                    log.warning("transfer_mismatch", sender=PublicKey(row.sender).text,
                                detail=mismatch)

    # -- deliveries ---------------------------------------------------------------------

    async def on_delivery(self, decision: ManifestArrived | ChunkArrived) -> Drop | None:
        """Take a manifest or chunk in (committed with its envelope as seen), or say why not.

        One at a time: a key's mailbox draining beside its successor's hands a sender's
        chunks in on two connections at once, and a chunk decides from its transfer's row
        (held? the last one?) across the awaits that write it."""
        async with self._handling:
            if isinstance(decision, ManifestArrived):
                return self._on_manifest(decision.envelope, decision.manifest)
            return await self._on_chunk(decision)

    def _on_manifest(self, envelope: Envelope, manifest: Manifest) -> Drop | None:
        sender = envelope.sender
        if self._state.transfer_in(sender.raw, manifest.transfer_id) is not None:
            return Drop(DropReason.DUPLICATE, "a transfer of that id is already known", envelope)
        refusal = None
        if manifest.size > self.max_bytes:
            refusal = (f"file {manifest.name!r} of {manifest.size} bytes exceeds this device's"
                       f" maximum of {self.max_bytes}")
        elif len(held := self._held()) >= self.max_incoming:
            refusal = (f"file {manifest.name!r}: {self.max_incoming} files are already under"
                       " way or waiting to be taken")
        elif sum(row.sender == sender.raw for row in held) >= self.max_incoming_per_peer:
            refusal = (f"file {manifest.name!r}: {self.max_incoming_per_peer} files of"
                       f" {sender.text} are already under way or waiting to be taken")
        elif self._received_path(sender.raw, manifest).exists():
            # The same peer's transfer id again, once the row of its first use was forgotten:
            # completing it would replace a file the application was already given.
            refusal = (f"file {manifest.name!r}: a file of that transfer id is already in"
                       f" {self._root / 'received'}")
        if refusal is not None:  # told once; its chunks are then duplicates, counted only
            with transaction(self._state):
                self._state.add_transfer_in(TransferInRow(
                    sender.raw, manifest.transfer_id, manifest.encode(), b"", 0,
                    InState.REFUSED, valid_until_ms(envelope)))
                self._seen.add((sender, envelope.msg_id), valid_until_ms(envelope))
            return Drop(DropReason.REFUSED_TRANSFER, refusal, envelope)
        forget_at_ms = min(valid_until_ms(envelope), self._clock() + self.max_hold_ms)
        row = TransferInRow(sender.raw, manifest.transfer_id, manifest.encode(), envelope.raw, 0,
                            InState.RECEIVING, forget_at_ms)
        partial = self._partial_path(row)
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.touch(mode=0o600)
        with transaction(self._state):
            self._state.add_transfer_in(row)
            self._seen.add((sender, envelope.msg_id), valid_until_ms(envelope))
        if manifest.chunk_count == 0:  # an empty file is complete on its manifest
            self._complete(row)
        return None

    def _held(self) -> list[TransferInRow]:
        """Files arriving or complete and not taken yet: each holds disk (up to `max_bytes`),
        a row and, once complete, memory until the application takes it.  Counting only
        those arriving let a peer leave any number complete (empty files complete on their
        manifest)."""
        return (self._state.transfers_in(InState.RECEIVING)
                + self._state.transfers_in(InState.COMPLETE))

    async def _on_chunk(self, decision: ChunkArrived) -> Drop | None:
        envelope, chunk = decision.envelope, decision.chunk
        row = self._state.transfer_in(envelope.sender.raw, chunk.transfer_id)
        if row is None:
            return Drop(DropReason.INVALID, "chunk of a transfer this device does not hold"
                        " (never announced, refused, or forgotten)", envelope)
        if row.state != InState.RECEIVING:
            return Drop(DropReason.DUPLICATE, f"chunk of a transfer already {row.state}",
                        envelope)
        manifest = Manifest.decode(row.manifest)
        try:
            manifest.check_chunk(chunk)
        except ProtocolError as exc:
            return Drop(DropReason.INVALID, exc.message, envelope)
        if self._state.has_chunk(row.sender, row.transfer_id, chunk.index):
            return Drop(DropReason.DUPLICATE, f"chunk {chunk.index} is already on disk", envelope)
        await asyncio.to_thread(_write_at, self._partial_path(row), chunk.data,
                                chunk.index * manifest.chunk_size)
        with transaction(self._state):
            self._state.add_chunk(row.sender, row.transfer_id, chunk.index)
            self._seen.add((envelope.sender, envelope.msg_id), valid_until_ms(envelope))
        if row.received + 1 == manifest.chunk_count:
            mismatch = await self._verify(row)
            if mismatch is not None:
                return Drop(DropReason.INVALID, mismatch, envelope)
        return None

    # -- completion -----------------------------------------------------------------------

    async def _verify(self, row: TransferInRow) -> str | None:
        """Check the whole file; offer it, or delete it and say why.

        The file is where the last run left it: in `partial/`, or already moved to its
        target by a run whose commit of COMPLETE did not happen (killed, or the commit
        failed).  Gone from both, the transfer fails rather than stop the device's start."""
        manifest = Manifest.decode(row.manifest)
        held = next((path for path in (self._partial_path(row), self.received_path(row))
                     if path.exists()), None)
        if held is None:
            self._state.set_transfer_in_state(row.sender, row.transfer_id, InState.FAILED)
            return f"file {manifest.name!r}: its data is gone from the home, never offered"
        size, digest = await asyncio.to_thread(size_and_hash, held)
        if size != manifest.size or digest != manifest.file_hash:
            self._state.set_transfer_in_state(row.sender, row.transfer_id, InState.FAILED)
            with contextlib.suppress(FileNotFoundError):
                held.unlink()
            return (f"file {manifest.name!r} does not match its manifest"
                    f" ({size} bytes, hash {digest.hex()[:16]}…): deleted, never offered")
        self._complete(row)
        return None

    def _complete(self, row: TransferInRow) -> None:
        target, partial = self.received_path(row), self._partial_path(row)
        target.parent.mkdir(parents=True, exist_ok=True)
        if partial.exists():  # else a run moved it and stopped before its commit (`_verify`)
            os.replace(partial, target)  # before the commit: a crash re-verifies at `load`
        self._state.set_transfer_in_state(row.sender, row.transfer_id, InState.COMPLETE)
        self._offer(row)

    def _offer(self, row: TransferInRow) -> None:
        manifest = Manifest.decode(row.manifest)
        envelope = _envelope(row)
        self.ready.append(ReceivedFile(PublicKey(row.sender), row.transfer_id, envelope.msg_id,
                                       manifest.name, manifest.media_type, manifest.size,
                                       self.received_path(row)))
        self.ready_event.set()

    def taken(self, received: ReceivedFile) -> Envelope:
        """The application took `received`: mark it (inside the caller's commit, with the
        receipt) and return the manifest's envelope the receipt names."""
        row = self._state.transfer_in(received.sender.raw, received.transfer_id)
        assert row is not None and row.state == InState.COMPLETE
        self._state.set_transfer_in_state(row.sender, row.transfer_id, InState.SURFACED)
        return _envelope(row)

    # -- bounds ---------------------------------------------------------------------------

    def expire(self, now_ms: int) -> None:
        """Forget transfers past their manifest's validity: a partial one with its file; a
        verified one nobody took stays until taken."""
        for row in self._state.transfers_in_to_forget(now_ms):
            if row.state == InState.COMPLETE:
                continue
            with contextlib.suppress(FileNotFoundError):
                self._partial_path(row).unlink()
            self._state.remove_transfer_in(row.sender, row.transfer_id)

    def _partial_path(self, row: TransferInRow) -> Path:
        return self._root / "partial" / f"{row.sender.hex()}-{row.transfer_id.hex()}"

    def received_path(self, row: TransferInRow) -> Path:
        return self._received_path(row.sender, Manifest.decode(row.manifest))

    def _received_path(self, sender: bytes, manifest: Manifest) -> Path:
        return (self._root / "received" / f"{sender.hex()}-{manifest.transfer_id.hex()}"
                / manifest.name)


def _envelope(row: TransferInRow) -> Envelope:
    return decode_envelope(row.envelope, Limits(max_envelope_bytes=len(row.envelope)))


def _write_at(path: Path, data: bytes, offset: int) -> None:
    """Write a chunk where it belongs and make it durable before it is recorded."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def size_and_hash(path: Path) -> tuple[int, bytes]:
    """A file's size and the hash a manifest names, read a block at a time."""
    hasher = file_hasher()
    size = 0
    with path.open("rb") as file:
        while block := file.read(_READ_BYTES):
            hasher.update(block)
            size += len(block)
    return size, hasher.digest()
