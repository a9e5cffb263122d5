"""transfers.json: a file from alice to bob as a manifest and two chunks (SPEC §17).

The file is 40 bytes in chunks of 32, so the second chunk is the 8-byte
remainder.  Each envelope is written out as in envelopes.json (every random
byte scripted); the invalid entries are plaintexts every implementation must
refuse, each with its error code (`manifest`: decode it; `chunk`: decode it
and check it against this vector's manifest).
"""

from __future__ import annotations

import hashlib

from .. import canonical
from ..envelope import Kind
from ..errors import ErrorCode
from ..transfers import Chunk, Manifest
from .generate import _envelope_vector, _invalid, fill

FILE = b"Continuum moves this file in 2 chunks.\r\n"
CHUNK_SIZE = 32
NAME = "notes.txt"
MEDIA_TYPE = "text/plain"


def _manifest() -> Manifest:
    return Manifest.for_file(fill(0xE0, 16), len(FILE),
                             hashlib.blake2b(FILE, digest_size=32).digest(), CHUNK_SIZE, NAME,
                             MEDIA_TYPE)


def _invalid_plaintexts(manifest: Manifest) -> list[dict]:
    tid, digest = manifest.transfer_id, manifest.file_hash
    return [
        _invalid("chunk count is not ceil(size / chunk size)", "manifest",
                 canonical.encode([tid, 40, digest, 32, 3, NAME, MEDIA_TYPE]),
                 ErrorCode.INVALID_FIELD),
        _invalid("a path for a name", "manifest",
                 canonical.encode([tid, 40, digest, 32, 2, "../notes.txt", MEDIA_TYPE]),
                 ErrorCode.INVALID_FIELD),
        _invalid("a hash of 31 bytes", "manifest",
                 canonical.encode([tid, 40, digest[:31], 32, 2, NAME, MEDIA_TYPE]),
                 ErrorCode.INVALID_FIELD),
        _invalid("six elements", "manifest",
                 canonical.encode([tid, 40, digest, 32, 2, NAME]), ErrorCode.MALFORMED),
        _invalid("an index past the last chunk", "chunk",
                 Chunk(tid, 2, FILE[:8]).encode(), ErrorCode.INVALID_FIELD),
        _invalid("a first chunk one byte short", "chunk",
                 Chunk(tid, 0, FILE[:31]).encode(), ErrorCode.INVALID_FIELD),
        _invalid("a last chunk longer than the remainder", "chunk",
                 Chunk(tid, 1, FILE[32:] + b"!").encode(), ErrorCode.INVALID_FIELD),
        _invalid("a chunk of another transfer", "chunk",
                 Chunk(fill(0xE1, 16), 0, FILE[:32]).encode(), ErrorCode.INVALID_FIELD),
    ]


def transfer_vectors() -> dict:
    manifest = _manifest()
    chunks = [Chunk(manifest.transfer_id, i, FILE[i * CHUNK_SIZE:(i + 1) * CHUNK_SIZE])
              for i in range(manifest.chunk_count)]
    manifest_envelope, _ = _envelope_vector("manifest", "alice", ["bob"],
                                            Kind.TRANSFER_MANIFEST, manifest.encode(), 0xE2)
    chunk_envelopes = [_envelope_vector(f"chunk_{c.index}", "alice", ["bob"],
                                        Kind.TRANSFER_CHUNK, c.encode(), 0xE4 + 2 * c.index)[0]
                       for c in chunks]
    return {
        "description": "A 40-byte file from alice to bob in chunks of 32 (SPEC §17): the file"
                       " and its BLAKE2b-256, the manifest and each chunk as fields, plaintext"
                       " and sealed envelope (as in envelopes.json), and plaintexts to refuse.",
        "file": FILE.hex(),
        "file_hash": manifest.file_hash.hex(),
        "manifest": {
            "fields": {"transfer_id": manifest.transfer_id.hex(), "size": manifest.size,
                       "hash": manifest.file_hash.hex(), "chunk_size": manifest.chunk_size,
                       "chunk_count": manifest.chunk_count, "name": manifest.name,
                       "media_type": manifest.media_type},
            "encoded": manifest.encode().hex(),
            "envelope": manifest_envelope,
        },
        "chunks": [{"fields": {"transfer_id": c.transfer_id.hex(), "index": c.index,
                               "data": c.data.hex()},
                    "encoded": c.encode().hex(), "envelope": envelope}
                   for c, envelope in zip(chunks, chunk_envelopes)],
        "invalid": _invalid_plaintexts(manifest),
    }
