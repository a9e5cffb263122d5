"""streams.json: a stream from alice to bob (SPEC §16), every byte of it, and what to refuse.

Alice opens a stream to bob for "tcp/22" with a window of 262 144 bytes; bob
accepts with the same window.  Every random byte is scripted (the stream's
ephemeral seed, its secretstream header, then the envelope's, SPEC §5), so the
open, the answer, both ends' keys and every chunk are reproducible.  The
invalid entries are what every implementation must refuse, each with its
error code.
"""

from __future__ import annotations

from .. import canonical
from ..envelope import Kind, decode_envelope, seal_envelope
from ..errors import ErrorCode
from ..frames import (StreamAbort, StreamAccept, StreamCredit, StreamData, StreamFin, StreamOpen,
                      encode_frame)
from ..streams import AcceptAnswer, Opening, StreamKeys, accept_open, begin_open, read_open
from .generate import CREATED_AT_MS, IDS, Script, _invalid, fill

SERVICE = "tcp/22"
WINDOW = 262_144
OPEN_TTL_S = 60
ANSWERED_AT_MS = CREATED_AT_MS + 12
# alice → bob, then bob → alice; the last chunk of each direction is its FIN.
CHUNKS = [("opener", b"SSH-2.0-OpenSSH_9.2\r\n", False), ("opener", b"", True),
          ("responder", b"SSH-2.0-dropbear\r\n", False), ("responder", b"bye", True)]


def _open_script(base: int) -> list[bytes]:
    return [fill(base, 32), fill(base + 1, 24), fill(base + 2, 16), fill(base + 3, 32),
            fill(base + 4, 32), fill(base + 5, 24), fill(base + 6, 24)]


def _random(script: list[bytes]) -> dict:
    names = ["stream_ephemeral_seed", "header", "msg_id", "ephemeral_seed", "content_key",
             "payload_nonce", "wrap_nonce"]
    return {name: chunk.hex() for name, chunk in zip(names, script)}


def _opened() -> tuple[Opening, list[bytes], bytes, StreamKeys, list[bytes]]:
    open_random = _open_script(0xC0)
    opening = begin_open(IDS["alice"], IDS["bob"].public, SERVICE, now_ms=CREATED_AT_MS,
                         ttl_s=OPEN_TTL_S, random_bytes=Script(*open_random))
    envelope = decode_envelope(opening.envelope.raw)
    accept_random = _open_script(0xD0)
    answer, bob = accept_open(IDS["bob"], envelope, read_open(envelope, IDS["bob"]),
                              now_ms=ANSWERED_AT_MS, ttl_s=OPEN_TTL_S,
                              random_bytes=Script(*accept_random))
    return opening, open_random, answer.raw, bob, accept_random


def stream_vectors() -> dict:
    opening, open_random, answer, bob, accept_random = _opened()
    alice = opening.complete(answer, IDS["alice"])
    stream_id = opening.stream_id
    open_envelope = decode_envelope(opening.envelope.raw)
    ends = {"opener": alice, "responder": bob}
    chunks = []
    for sender, plaintext, final in CHUNKS:
        chunk = ends[sender].sealer.seal(plaintext, final=final)
        frame = StreamFin(stream_id, chunk) if final else StreamData(stream_id, chunk)
        chunks.append({"from": sender, "plaintext": plaintext.hex(), "final": final,
                       "chunk": chunk.hex(), "frame": encode_frame(frame).hex()})
    return {
        "description": "A stream from alice (opener) to bob (SPEC §16). `open` and `accept` "
                       "are envelopes of kinds 5 and 6 (keys and seeds in keys.json), each "
                       "with the random bytes drawn in order, its sealed plaintext and the "
                       "frame that carries it. Keys: crypto_kx session keys over the two "
                       "stream ephemeral keys (from crypto_kx_seed_keypair of the seeds), "
                       "alice as client; the responder's send/receive keys are the "
                       "opener's receive/send keys. Each direction is a secretstream "
                       "(XChaCha20-Poly1305) whose state is init_pull(header, key) on both "
                       "sides, the sender's header from its own envelope; `chunks` are in "
                       "order per direction, the FINAL-tagged one in a STREAM_FIN frame. "
                       "`invalid`: inputs to refuse, with the operation (`check`) and the "
                       "error code.",
        "stream_id": stream_id.hex(),
        "open": {
            "opener": "alice", "peer": "bob", "created_at_ms": CREATED_AT_MS,
            "ttl_s": OPEN_TTL_S, "service": SERVICE, "window": WINDOW,
            "random": _random(open_random),
            "ephemeral_public": opening.request.ephemeral.hex(),
            "plaintext": opening.request.encode().hex(),
            "envelope": opening.envelope.raw.hex(),
            "content_hash": open_envelope.content_hash().hex(),
            "frame": encode_frame(StreamOpen(WINDOW, opening.envelope.raw)).hex(),
        },
        "accept": {
            "created_at_ms": ANSWERED_AT_MS, "ttl_s": OPEN_TTL_S, "window": WINDOW,
            "random": _random(accept_random),
            "ephemeral_public": AcceptAnswer.decode(_plaintext(answer)).ephemeral.hex(),
            "plaintext": _plaintext(answer).hex(),
            "envelope": answer.hex(),
            "frame": encode_frame(StreamAccept(stream_id, WINDOW, answer)).hex(),
        },
        "keys": {"opener_send": alice.send_key.hex(), "opener_receive": alice.receive_key.hex()},
        "chunks": chunks,
        "frames": {
            "credit": encode_frame(StreamCredit(stream_id, 65_553)).hex(),
            "abort": encode_frame(StreamAbort(stream_id, int(ErrorCode.STREAM_REFUSED),
                                              "no such service")).hex(),
        },
        "invalid": _invalid_streams(opening, answer, chunks),
    }


def _plaintext(answer: bytes) -> bytes:
    """What bob's answer seals (alice opens it)."""
    return decode_envelope(answer).open(IDS["alice"]).plaintext


def _invalid_streams(opening: Opening, answer: bytes, chunks: list[dict]) -> list[dict]:
    open_envelope = decode_envelope(opening.envelope.raw)
    request = read_open(open_envelope, IDS["bob"])
    carol_answer, _ = accept_open(IDS["carol"], open_envelope, request, now_ms=ANSWERED_AT_MS,
                                  ttl_s=OPEN_TTL_S, random_bytes=Script(*_open_script(0xE0)))
    other = begin_open(IDS["alice"], IDS["bob"].public, SERVICE, now_ms=CREATED_AT_MS,
                       ttl_s=OPEN_TTL_S, random_bytes=Script(*_open_script(0xF0)))
    other_envelope = decode_envelope(other.envelope.raw)
    other_answer, _ = accept_open(IDS["bob"], other_envelope, read_open(other_envelope,
                                                                       IDS["bob"]),
                                  now_ms=ANSWERED_AT_MS, ttl_s=OPEN_TTL_S,
                                  random_bytes=Script(*_open_script(0xE8)))
    as_data = seal_envelope(IDS["bob"], Kind.DATA, [IDS["alice"].public], _plaintext(answer),
                            ttl_s=OPEN_TTL_S, now_ms=ANSWERED_AT_MS,
                            random_bytes=Script(*_open_script(0xB0)[2:]))
    first, fin = chunks[0], chunks[1]
    flipped = bytearray(bytes.fromhex(first["chunk"]))
    flipped[-1] ^= 0x01
    stream_id = bytes.fromhex(first["frame"])[3:19]
    zero_point = canonical.encode([bytes(32), request.header, request.service])
    return [
        _invalid("an answer signed by carol, not the peer asked", "complete_open",
                 carol_answer.raw, ErrorCode.INVALID_FIELD),
        _invalid("bob's answer to another open of alice's", "complete_open", other_answer.raw,
                 ErrorCode.INVALID_FIELD),
        _invalid("bob's answer sealed as DATA", "complete_open", as_data.raw,
                 ErrorCode.INVALID_FIELD),
        _invalid("an open whose ephemeral key is the point at zero", "accept_open",
                 zero_point, ErrorCode.INVALID_FIELD),
        _invalid("the first chunk with one bit flipped", "open_chunks",
                 canonical.encode([[bytes(flipped), False]]), ErrorCode.STREAM_BROKEN),
        _invalid("the FIN chunk before the data chunk (reordered)", "open_chunks",
                 canonical.encode([[bytes.fromhex(fin["chunk"]), True],
                                   [bytes.fromhex(first["chunk"]), False]]),
                 ErrorCode.STREAM_BROKEN),
        _invalid("the FINAL chunk carried as STREAM_DATA (an end passed off as data)",
                 "open_chunks", canonical.encode([[bytes.fromhex(first["chunk"]), False],
                                                  [bytes.fromhex(fin["chunk"]), False]]),
                 ErrorCode.STREAM_BROKEN),
        _invalid("a data chunk carried as STREAM_FIN (a cut passed off as the end)",
                 "open_chunks", canonical.encode([[bytes.fromhex(first["chunk"]), True]]),
                 ErrorCode.STREAM_BROKEN),
        _invalid("the first chunk twice (replayed)", "open_chunks",
                 canonical.encode([[bytes.fromhex(first["chunk"]), False],
                                   [bytes.fromhex(first["chunk"]), False]]),
                 ErrorCode.STREAM_BROKEN),
        _invalid("STREAM_CREDIT of zero bytes", "frame",
                 canonical.encode([12, stream_id, 0]), ErrorCode.INVALID_FIELD),
        _invalid("STREAM_DATA with a 15-byte stream id", "frame",
                 canonical.encode([11, stream_id[:15], b"x"]), ErrorCode.INVALID_FIELD),
        _invalid("STREAM_OPEN without its window", "frame",
                 canonical.encode([9, opening.envelope.raw]), ErrorCode.MALFORMED),
    ]

