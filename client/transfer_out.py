"""Files this device sends (SPEC §17): a manifest, then a window of chunks through the outbox.

`send` hashes the file, then, in one commit, records the transfer and puts its
manifest in the outbox (tracked like any message: its receipt is the
transfer's one receipt).  Once a relay accepted the manifest, chunks follow:
at most `window` of them are in the outbox at a time, each read from the file
when its turn comes and committed to the outbox together with the transfer's
progress.  So the state file never holds more than a window of the file, a
relay refusing for quota (QUOTA_EXCEEDED, MAILBOX_FULL: transient, retried by
`Sender` after a backoff) holds the window still and the sender waits, and a
restart re-sends only the chunks of the window (each the same bytes, so a copy
a relay already stored is answered REPLAY, which means stored) and goes on
from where it was.  A final refusal of any chunk, the file changing under it,
or its TTL passing fails the transfer with a message saying which.
"""

from __future__ import annotations

import asyncio
import contextlib
import mimetypes
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from proto import Identity, Kind, Limits, PublicKey, seal_envelope
from proto.errors import ProtocolError
from proto.transfers import CHUNK_ENVELOPE_OVERHEAD, Chunk, Manifest, check_name, chunk_size_for

from .outbox import PendingSend
from .sending import Sender
from .state import DeviceState, TransferOutRow, transaction
from .transfer_in import DEFAULT_MAX_TRANSFER_BYTES, size_and_hash

DEFAULT_TRANSFER_WINDOW = 16

# (bytes a relay accepted so far, total bytes): called as each chunk is accepted.
Progress = Callable[[int, int], None]


class OutState(StrEnum):
    SENDING = "sending"
    SENT = "sent"  # every chunk accepted by a relay; the receipt says it was read
    FAILED = "failed"


class TransferError(Exception):
    """A file that cannot be sent (too large, unreadable), or a transfer that failed for good."""


@dataclass(frozen=True)
class SentFile:
    """A file every chunk of which a relay accepted.  The receipt for `msg_id` (the manifest's
    envelope) is the recipient's word that it has the whole file, verified."""

    transfer_id: bytes
    msg_id: bytes
    recipient: PublicKey
    size: int
    chunks: int


class OutgoingTransfers:
    """The sending half: one driver task per transfer under way, kept in the state file."""

    def __init__(self, sender: Sender, state: DeviceState, identity: Callable[[], Identity],
                 identities: Mapping[PublicKey, Identity], *,
                 max_bytes: int = DEFAULT_MAX_TRANSFER_BYTES,
                 window: int = DEFAULT_TRANSFER_WINDOW) -> None:
        """`identity()`: the key a new transfer is signed with; `identities`: the keys the
        device holds (live), since every chunk is signed by its manifest's key (a receiver
        keys transfers by sender) and a key rotated away from ends its transfers."""
        if window < 1:
            raise ValueError("the transfer window must be at least one chunk")
        self._sender = sender
        self._state = state
        self._identity = identity
        self._identities = identities
        self.max_bytes = max_bytes
        self.window = window
        self._drivers: dict[bytes, asyncio.Task[SentFile]] = {}
        self._progress: dict[bytes, list[Progress]] = {}

    def resume(self) -> None:
        """Go on with every transfer a previous run left under way."""
        for row in self._state.transfers_out(OutState.SENDING):
            self._start(row)

    async def stop(self) -> None:
        """Stop the drivers; their transfers stay under way in the state file."""
        for task in self._drivers.values():
            task.cancel()
        for task in list(self._drivers.values()):
            with contextlib.suppress(asyncio.CancelledError, TransferError):
                await task

    def check(self, path: Path) -> os.stat_result:
        """TransferError unless `path` is a readable file within this device's maximum."""
        try:
            info = path.stat()
        except OSError as exc:
            raise TransferError(f"cannot read {path}: {exc.strerror}") from None
        if not path.is_file():
            raise TransferError(f"{path} is not a regular file")
        if info.st_size > self.max_bytes:
            raise TransferError(f"{path.name} is {info.st_size} bytes, over the maximum of"
                                f" {self.max_bytes} for one transfer")
        return info

    async def send(self, peer: PublicKey, path: Path, *, ttl_s: int, max_envelope_bytes: int,
                   media_type: str | None = None, progress: Progress | None = None) -> SentFile:
        """Send `path` to `peer`, or go on with the transfer of that same file (path, size and
        modification time) to that peer already under way; return once every chunk is
        accepted.  `max_envelope_bytes`: the connected relay's limit, which sizes the chunks."""
        path = path.resolve()
        info = self.check(path)
        for row in self._state.transfers_out(OutState.SENDING):
            if (row.recipient, row.path, row.mtime_ns) == (peer.raw, str(path), info.st_mtime_ns):
                self._start(row)  # unless its driver runs already
                return await self._follow(row.transfer_id, progress)
        try:
            name = check_name(path.name)
        except ProtocolError as exc:
            raise TransferError(exc.message) from None
        size, digest = await asyncio.to_thread(size_and_hash, path)
        if size != info.st_size:
            raise TransferError(f"{path} changed while it was read")
        manifest = Manifest.for_file(
            os.urandom(16), size, digest, chunk_size_for(max_envelope_bytes), name,
            media_type or mimetypes.guess_type(name)[0] or "application/octet-stream")
        signer = self._identity()
        envelope = self._sender.seal(signer, Kind.TRANSFER_MANIFEST, [peer], manifest.encode(),
                                     ttl_s)
        row = TransferOutRow(manifest.transfer_id, signer.public.raw, peer.raw, str(path),
                             info.st_mtime_ns, manifest.encode(), envelope.msg_id,
                             envelope.expires_at_ms, 0, OutState.SENDING)
        with transaction(self._state):
            self._state.add_transfer_out(row)
            _, entry = self._sender.enqueue(envelope, manifest.encode(),
                                            kind=Kind.TRANSFER_MANIFEST)
        await self._sender.send_now(entry)
        self._start(row)
        return await self._follow(row.transfer_id, progress)

    async def _follow(self, transfer_id: bytes, progress: Progress | None) -> SentFile:
        """Wait for a driver; cancelling the wait leaves the transfer going (it is durable)."""
        if progress is not None:
            self._progress.setdefault(transfer_id, []).append(progress)
        try:
            return await asyncio.shield(self._drivers[transfer_id])
        finally:
            if progress is not None:
                self._progress[transfer_id].remove(progress)

    def _start(self, row: TransferOutRow) -> None:
        if row.transfer_id not in self._drivers or self._drivers[row.transfer_id].done():
            task = asyncio.create_task(self._drive(row), name="continuum-transfer")
            task.add_done_callback(_retrieve)
            self._drivers[row.transfer_id] = task

    async def _drive(self, row: TransferOutRow) -> SentFile:
        manifest = Manifest.decode(row.manifest)
        in_flight = [entry for entry in self._sender.outbox.entries()
                     if _chunk_of(entry) == manifest.transfer_id]
        try:
            manifest_entry = self._sender.outbox.get(row.manifest_msg_id)
            if manifest_entry is not None:
                await _accepted(manifest_entry, "the manifest")
            await self._send_chunks(row, manifest, in_flight)
        except TransferError as exc:
            self._fail(row, in_flight, str(exc))
            raise
        self._state.set_transfer_out(row.transfer_id, state=OutState.SENT)
        return SentFile(row.transfer_id, row.manifest_msg_id, PublicKey(row.recipient),
                        manifest.size, manifest.chunk_count)

    async def _send_chunks(self, row: TransferOutRow, manifest: Manifest,
                           in_flight: list[PendingSend]) -> None:
        peer = PublicKey(row.recipient)
        limits = Limits(max_envelope_bytes=manifest.chunk_size + CHUNK_ENVELOPE_OVERHEAD)
        next_index = row.next_index
        try:
            file = open(row.path, "rb")  # noqa: SIM115 (closed below, across awaits)
        except OSError as exc:
            raise TransferError(f"cannot read {row.path}: {exc.strerror}") from None
        with file:
            while next_index < manifest.chunk_count or in_flight:
                while next_index < manifest.chunk_count and len(in_flight) < self.window:
                    in_flight.append(self._queue_chunk(row, manifest, file.fileno(), next_index,
                                                       peer, limits))
                    next_index += 1
                    await self._sender.send_now(in_flight[-1])
                await asyncio.wait([entry.accepted for entry in in_flight],
                                   return_when=asyncio.FIRST_COMPLETED)
                for entry in [entry for entry in in_flight if entry.accepted.done()]:
                    in_flight.remove(entry)
                    await _accepted(entry, f"chunk {Chunk.decode(entry.plaintext or b'').index}")
                done = next_index - len(in_flight)
                for report in self._progress.get(row.transfer_id, ()):
                    report(min(manifest.size, done * manifest.chunk_size), manifest.size)

    def _queue_chunk(self, row: TransferOutRow, manifest: Manifest, fd: int, index: int,
                     peer: PublicKey, limits: Limits) -> PendingSend:
        """Seal chunk `index` and put it in the outbox with the transfer's progress, at once."""
        length = manifest.chunk_length(index)
        try:
            data = os.pread(fd, length, index * manifest.chunk_size)
            info = os.fstat(fd)  # after the read: a write before it shows in the mtime
        except OSError as exc:
            raise TransferError(f"cannot read {row.path}: {exc.strerror}") from None
        if len(data) != length or (info.st_size, info.st_mtime_ns) != (manifest.size,
                                                                        row.mtime_ns):
            raise TransferError(f"{row.path} changed since its transfer began")
        now = self._sender.now_ms()
        ttl_s = (row.expires_at_ms - now) // 1000
        if ttl_s < 1:
            raise TransferError("its ttl passed before every chunk was accepted")
        signer = self._identities.get(PublicKey(row.sender))
        if signer is None:
            raise TransferError("the key that began it was rotated away from: send the file"
                                " again")
        plaintext = Chunk(manifest.transfer_id, index, data).encode()
        try:
            envelope = seal_envelope(signer, Kind.TRANSFER_CHUNK, [peer], plaintext,
                                     ttl_s=ttl_s, now_ms=now, limits=limits)
        except ProtocolError as exc:
            raise TransferError(f"chunk {index} cannot be sealed: {exc.message}") from None
        with transaction(self._state):
            entry = self._sender.outbox.add(envelope, plaintext=plaintext, reply=True,
                                            kind=Kind.TRANSFER_CHUNK)
            self._state.set_transfer_out(row.transfer_id, next_index=index + 1)
        return entry

    def _fail(self, row: TransferOutRow, in_flight: list[PendingSend], error: str) -> None:
        with transaction(self._state):
            for entry in in_flight:
                self._sender.outbox.discard(entry.msg_id)
            self._state.set_transfer_out(row.transfer_id, state=OutState.FAILED, error=error)


async def _accepted(entry: PendingSend, what: str) -> None:
    """Wait for a relay's final answer to `entry`; TransferError if it refused for good."""
    try:
        await entry.accepted
    except ProtocolError as exc:
        raise TransferError(f"{what} was refused: {exc.code.name}: {exc.message}") from None


def _chunk_of(entry: PendingSend) -> bytes | None:
    """The transfer id of an outbox entry that is a chunk, else None."""
    if entry.kind is not Kind.TRANSFER_CHUNK or entry.plaintext is None:
        return None
    return Chunk.decode(entry.plaintext).transfer_id


def _retrieve(task: asyncio.Task[SentFile]) -> None:
    """A driver nobody awaits (resumed at start) may fail: its failure is in the state file."""
    if not task.cancelled():
        task.exception()
