"""Streams (SPEC §16): the two envelopes that open one, its keys, and its sealed chunks.

The opener sends one peer a STREAM_OPEN envelope (kind 5); the peer answers
with a STREAM_ACCEPT envelope (kind 6).  Both are signed and sealed like every
envelope, so each end knows who is at the other, and the relay, which verifies
both signatures, learns nothing of what they say (which service, which keys).
Each carries a fresh X25519 key of its sender and the 24-byte secretstream
header of the direction its sender will send in:

    STREAM_OPEN   plaintext  [ephemeral(32), header(24), service(tstr)]
    STREAM_ACCEPT plaintext  [open_hash(32), ephemeral(32), header(24)]

`open_hash` is the open envelope's content hash, so an answer accepts exactly
one open (the stream's id is that envelope's msg_id).  The keys are
libsodium's `crypto_kx` session keys over the two ephemeral keys, the opener
as client: the opener's `tx` seals opener → peer, its `rx` opens the other
direction.  Both ephemeral secrets are forgotten when the stream ends, so a
recorded stream stays closed to a later thief of either identity key.

Each direction is one libsodium secretstream (XChaCha20-Poly1305): chunks are
numbered implicitly, so a relay that drops, repeats, reorders or splices
chunks makes the next one fail to open; a direction ends with the one chunk
tagged FINAL, which only its sender can make, so a cut is never taken for an
end.  A sealing state is set up from a header the caller drew, exactly as
`init_push` would set it up after drawing that header itself (SPEC §16), so
the header can travel in the signed envelope before the key exists, and the
vectors are reproducible.

Pure: no clock, no I/O; random bytes come from the caller.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import nacl.bindings
import nacl.exceptions

from . import canonical
from .envelope import CONTENT_HASH_BYTES, Envelope, Kind, decode_envelope, seal_envelope
from .errors import DecodeError, InvalidFieldError, StreamBrokenError
from .keys import Identity, PublicKey
from .limits import DEFAULT_LIMITS, Limits
from .sealing import RandomBytes

_SS = nacl.bindings
HEADER_BYTES = _SS.crypto_secretstream_xchacha20poly1305_HEADERBYTES  # 24
CHUNK_OVERHEAD_BYTES = _SS.crypto_secretstream_xchacha20poly1305_ABYTES  # 17
STREAM_KEY_BYTES = _SS.crypto_secretstream_xchacha20poly1305_KEYBYTES  # 32
EPHEMERAL_KEY_BYTES = _SS.crypto_kx_PUBLIC_KEY_BYTES  # 32
EPHEMERAL_SEED_BYTES = _SS.crypto_kx_SEED_BYTES  # 32
_TAG_MESSAGE = _SS.crypto_secretstream_xchacha20poly1305_TAG_MESSAGE
_TAG_FINAL = _SS.crypto_secretstream_xchacha20poly1305_TAG_FINAL
MAX_SERVICE_CHARS = 128
# An open or an answer is acted on only while fresh; a minute is ample for a live peer.
OPEN_TTL_S = 60
_MAX_PAYLOAD_BYTES = 1024


def _bytes(value: object, length: int, name: str) -> bytes:
    if type(value) is not bytes or len(value) != length:
        raise InvalidFieldError(f"{name} must be {length} bytes")
    return value


def _array(data: bytes, length: int, what: str) -> list:
    value = canonical.decode(data, max_size=_MAX_PAYLOAD_BYTES, what=what)
    if type(value) is not list or len(value) != length:
        raise DecodeError(f"{what} must be a CBOR array of {length} elements")
    return value


@dataclass(frozen=True)
class OpenRequest:
    """The sealed plaintext of a STREAM_OPEN envelope: the opener's half of the key exchange
    and the service it asks for (its meaning is the application's, e.g. "tcp/22")."""

    ephemeral: bytes
    header: bytes
    service: str

    def encode(self) -> bytes:
        return canonical.encode([self.ephemeral, self.header, self.service])

    @classmethod
    def decode(cls, data: bytes) -> OpenRequest:
        ephemeral, header, service = _array(data, 3, "stream open")
        if type(service) is not str or not 1 <= len(service) <= MAX_SERVICE_CHARS:
            raise InvalidFieldError(f"stream service must be text of 1 to {MAX_SERVICE_CHARS}"
                                    " characters")
        return cls(_bytes(ephemeral, EPHEMERAL_KEY_BYTES, "stream ephemeral key"),
                   _bytes(header, HEADER_BYTES, "stream header"), service)


@dataclass(frozen=True)
class AcceptAnswer:
    """The sealed plaintext of a STREAM_ACCEPT envelope: which open it accepts, and the
    answering end's half of the key exchange."""

    open_hash: bytes
    ephemeral: bytes
    header: bytes

    def encode(self) -> bytes:
        return canonical.encode([self.open_hash, self.ephemeral, self.header])

    @classmethod
    def decode(cls, data: bytes) -> AcceptAnswer:
        open_hash, ephemeral, header = _array(data, 3, "stream accept")
        return cls(_bytes(open_hash, CONTENT_HASH_BYTES, "accepted open hash"),
                   _bytes(ephemeral, EPHEMERAL_KEY_BYTES, "stream ephemeral key"),
                   _bytes(header, HEADER_BYTES, "stream header"))


class ChunkSealer:
    """The sending direction of one stream end: each chunk sealed after the one before."""

    __slots__ = ("_state", "finished")

    def __init__(self, key: bytes, header: bytes) -> None:
        # The state init_push would make after drawing `header` (SPEC §16).
        self._state = _SS.crypto_secretstream_xchacha20poly1305_state()
        _SS.crypto_secretstream_xchacha20poly1305_init_pull(self._state, header, key)
        self.finished = False

    def seal(self, data: bytes, *, final: bool = False) -> bytes:
        """The next chunk; `final` ends the direction (nothing may follow it)."""
        if self.finished:
            raise StreamBrokenError("this direction of the stream has ended")
        self.finished = final
        return _SS.crypto_secretstream_xchacha20poly1305_push(
            self._state, data, None, _TAG_FINAL if final else _TAG_MESSAGE)


class ChunkOpener:
    """The receiving direction: chunks open only in the order they were sealed."""

    __slots__ = ("_state", "finished")

    def __init__(self, key: bytes, header: bytes) -> None:
        self._state = _SS.crypto_secretstream_xchacha20poly1305_state()
        _SS.crypto_secretstream_xchacha20poly1305_init_pull(self._state, header, key)
        self.finished = False

    def open(self, chunk: bytes, *, final: bool) -> bytes:
        """The plaintext of the next chunk, which must carry the FINAL tag exactly when
        `final` (it came in a STREAM_FIN); StreamBrokenError otherwise or if it does not
        open (altered, dropped, repeated, reordered, or not this stream's)."""
        if self.finished:
            raise StreamBrokenError("a chunk after the end of the stream")
        try:
            data, tag = _SS.crypto_secretstream_xchacha20poly1305_pull(self._state, chunk, None)
        except (nacl.exceptions.CryptoError, ValueError, TypeError):
            raise StreamBrokenError("a stream chunk does not open: altered, dropped, repeated,"
                                    " reordered or not this stream's") from None
        if tag != (_TAG_FINAL if final else _TAG_MESSAGE):
            raise StreamBrokenError("a stream chunk's tag disagrees with its frame"
                                    " (an end passed off as data, or data as an end)")
        self.finished = final
        return data


@dataclass(frozen=True)
class StreamKeys:
    """One end's two directions; the raw keys are kept for the vectors only."""

    sealer: ChunkSealer = field(repr=False)
    opener: ChunkOpener = field(repr=False)
    send_key: bytes = field(repr=False)
    receive_key: bytes = field(repr=False)


def session_keys(*, opener: bool, own_public: bytes, own_secret: bytes,
                 peer_public: bytes) -> tuple[bytes, bytes]:
    """(send, receive) keys of one end: `crypto_kx`, the opener as client.

    InvalidFieldError if the peer's ephemeral key is one no honest end draws (libsodium
    refuses a shared point of small order).
    """
    derive = (_SS.crypto_kx_client_session_keys if opener
              else _SS.crypto_kx_server_session_keys)
    try:
        receive, send = derive(own_public, own_secret, peer_public)
    except (nacl.exceptions.CryptoError, ValueError, TypeError):
        raise InvalidFieldError("the peer's stream ephemeral key is not usable") from None
    return send, receive


def _stream_keys(*, opener: bool, own: tuple[bytes, bytes], peer_public: bytes,
                 own_header: bytes, peer_header: bytes) -> StreamKeys:
    send, receive = session_keys(opener=opener, own_public=own[0], own_secret=own[1],
                                 peer_public=peer_public)
    return StreamKeys(ChunkSealer(send, own_header), ChunkOpener(receive, peer_header),
                      send, receive)


def _ephemeral(random_bytes: RandomBytes) -> tuple[bytes, bytes]:
    return _SS.crypto_kx_seed_keypair(random_bytes(EPHEMERAL_SEED_BYTES))


class Opening:
    """The opener's side between its STREAM_OPEN and the answer: the open it sent, and the
    secrets that finish the key exchange once the right peer accepts exactly that open."""

    __slots__ = ("envelope", "peer", "request", "_secret", "_open_hash")

    def __init__(self, envelope: Envelope, peer: PublicKey, request: OpenRequest,
                 secret: bytes) -> None:
        self.envelope, self.peer, self.request = envelope, peer, request
        self._secret = secret
        self._open_hash = envelope.content_hash()

    @property
    def stream_id(self) -> bytes:
        return self.envelope.msg_id

    def complete(self, answer: bytes, identity: Identity,
                 limits: Limits = DEFAULT_LIMITS) -> StreamKeys:
        """The stream's keys from the peer's STREAM_ACCEPT envelope.

        Raises (and the open is then void) unless the answer is a STREAM_ACCEPT signed
        by the peer this open went to, sealed to `identity`, naming this very open:
        SignatureError, DecryptError, InvalidFieldError, DecodeError.
        """
        envelope = decode_envelope(answer, limits)
        if envelope.sender != self.peer:
            raise InvalidFieldError(f"the answer comes from {envelope.sender.text}, not from"
                                    f" {self.peer.text}")
        contents = envelope.open(identity)
        if contents.kind is not Kind.STREAM_ACCEPT:
            raise InvalidFieldError(f"the answer is sealed as {contents.kind.name}, not"
                                    " STREAM_ACCEPT")
        accepted = AcceptAnswer.decode(contents.plaintext)
        if accepted.open_hash != self._open_hash:
            raise InvalidFieldError("the answer accepts another open than this one")
        return _stream_keys(opener=True, own=(self.request.ephemeral, self._secret),
                            peer_public=accepted.ephemeral, own_header=self.request.header,
                            peer_header=accepted.header)


def begin_open(identity: Identity, peer: PublicKey, service: str, *, now_ms: int,
               ttl_s: int = OPEN_TTL_S, limits: Limits = DEFAULT_LIMITS,
               random_bytes: RandomBytes = os.urandom) -> Opening:
    """Seal a STREAM_OPEN for `peer`; send `opening.envelope` in a STREAM_OPEN frame.

    Random bytes are drawn in the order: the stream's ephemeral seed, its header,
    then the envelope's (SPEC §5).
    """
    if peer == identity.public:
        raise InvalidFieldError("a stream needs another device at its other end")
    public, secret = _ephemeral(random_bytes)
    request = OpenRequest(public, random_bytes(HEADER_BYTES), service)
    OpenRequest.decode(request.encode())  # the service's bounds, before anything is sent
    envelope = seal_envelope(identity, Kind.STREAM_OPEN, [peer], request.encode(), ttl_s=ttl_s,
                             now_ms=now_ms, limits=limits, random_bytes=random_bytes)
    return Opening(envelope, peer, request, secret)


def read_open(envelope: Envelope, identity: Identity) -> OpenRequest:
    """What a STREAM_OPEN envelope asks of `identity`; it must be sealed as one, to
    `identity` alone (a stream has two ends)."""
    if envelope.recipient_keys != (identity.public,):
        raise InvalidFieldError("a stream open names exactly one recipient, this device")
    contents = envelope.open(identity)
    if contents.kind is not Kind.STREAM_OPEN:
        raise InvalidFieldError(f"sealed as {contents.kind.name}, not STREAM_OPEN")
    return OpenRequest.decode(contents.plaintext)


def accept_open(identity: Identity, envelope: Envelope, request: OpenRequest, *, now_ms: int,
                ttl_s: int = OPEN_TTL_S, limits: Limits = DEFAULT_LIMITS,
                random_bytes: RandomBytes = os.urandom) -> tuple[Envelope, StreamKeys]:
    """The STREAM_ACCEPT envelope answering `envelope` (read with `read_open`), and this
    end's keys.  Random bytes: the ephemeral seed, the header, then the envelope's."""
    public, secret = _ephemeral(random_bytes)
    header = random_bytes(HEADER_BYTES)
    keys = _stream_keys(opener=False, own=(public, secret), peer_public=request.ephemeral,
                        own_header=header, peer_header=request.header)
    answer = AcceptAnswer(envelope.content_hash(), public, header)
    sealed = seal_envelope(identity, Kind.STREAM_ACCEPT, [envelope.sender], answer.encode(),
                           ttl_s=ttl_s, now_ms=now_ms, limits=limits, random_bytes=random_bytes)
    return sealed, keys
