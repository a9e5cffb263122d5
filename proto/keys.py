"""Identities: Ed25519 key pairs and their one human-readable spelling.

A device is its Ed25519 public key.  The text form is used everywhere a
person sees a key (CLI, logs, config, dashboard), so it carries a short
checksum: a mistyped key is refused instead of silently addressing nobody.

    public key:  "cpk_" + base32(pk ‖ BLAKE2b-32(pk))                lower case, no padding
    secret key:  "csk_" + base32(seed ‖ BLAKE2b-32("csk_" ‖ seed))

The two checksums differ, so the forms are domain-separated: a secret's body
pasted after "cpk_" fails its checksum instead of passing for a public key
(which would show a secret wherever public keys are shown), and a public
key's body after "csk_" fails instead of becoming a seed everyone knows.
Only the secret's checksum covers its prefix: a public key is spelled as in
protocol 1, so every key text in peer lists, databases and configuration
stays valid; secret texts live in key files, which `Identity.load` rewrites.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import nacl.bindings
import nacl.exceptions
import nacl.signing

from .errors import InvalidFieldError, SignatureError

KEY_BYTES = 32
SIGNATURE_BYTES = 64
PUBLIC_PREFIX = "cpk_"
SECRET_PREFIX = "csk_"
_CHECKSUM_BYTES = 4
# Point checks cost ~50 µs (a scalar multiplication); a fleet addresses the same
# keys again and again, so answers are remembered.  Bounded: a flood of made-up
# keys evicts old answers, it does not grow memory.
_POINT_CACHE_SIZE = 16_384


# What each form's checksum covers before the key bytes (see the module docstring).
_CHECKSUM_DOMAIN = {PUBLIC_PREFIX: b"", SECRET_PREFIX: SECRET_PREFIX.encode("ascii")}


def _checksum(prefix: str, raw: bytes, domain: bytes | None = None) -> bytes:
    covered = _CHECKSUM_DOMAIN[prefix] if domain is None else domain
    return hashlib.blake2b(covered + raw, digest_size=_CHECKSUM_BYTES).digest()


def _to_text(prefix: str, raw: bytes) -> str:
    body = base64.b32encode(raw + _checksum(prefix, raw)).decode("ascii").rstrip("=").lower()
    return prefix + body


def _from_text(prefix: str, text: str, what: str, domain: bytes | None = None) -> bytes:
    if not isinstance(text, str) or not text.startswith(prefix):
        raise InvalidFieldError(f"{what} must start with {prefix!r}")
    body = text[len(prefix):].strip().upper()
    try:
        decoded = base64.b32decode(body + "=" * (-len(body) % 8))
    except (ValueError, binascii.Error):
        raise InvalidFieldError(f"{what} is not valid base32") from None
    if len(decoded) != KEY_BYTES + _CHECKSUM_BYTES:
        raise InvalidFieldError(f"{what} has the wrong length")
    raw, check = decoded[:KEY_BYTES], decoded[KEY_BYTES:]
    if _checksum(prefix, raw, domain) != check:
        raise InvalidFieldError(f"{what} checksum mismatch (typo?)")
    # The last base32 character carries 2 unused bits that b32decode ignores;
    # without this check a typo there would still name the same key.
    if base64.b32encode(decoded).decode("ascii").rstrip("=") != body:
        raise InvalidFieldError(f"{what} is not in canonical form (typo at the end?)")
    return raw


@dataclass(frozen=True, order=True)
class PublicKey:
    """An Ed25519 verify key; hashable and ordered by its bytes."""

    raw: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.raw, bytes) or len(self.raw) != KEY_BYTES:
            raise InvalidFieldError(f"public key must be {KEY_BYTES} bytes")

    @classmethod
    def from_text(cls, text: str) -> PublicKey:
        return cls(_from_text(PUBLIC_PREFIX, text, "public key"))

    @property
    def text(self) -> str:
        return _to_text(PUBLIC_PREFIX, self.raw)

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"PublicKey({self.text})"

    def is_valid_point(self) -> bool:
        """Whether these bytes are a key a device can hold and be sealed to.

        Any 32 bytes decode as a PublicKey, but only a canonical point of
        Ed25519's prime-order subgroup has a secret behind it and converts to
        the X25519 key sealing needs: mail addressed to anything else could
        never be read, so a relay refuses to store it.
        """
        return _is_valid_point(self.raw)

    def verify(self, message: bytes, signature: bytes) -> None:
        """Raise SignatureError unless `signature` is this key's over `message`.

        The key must be a canonical point of the prime-order subgroup
        (`is_valid_point`): libsodium's verify alone accepts some signatures
        under a key with a small-order component (about one message in eight),
        and a verifier built on another library may not, so two
        implementations would disagree on the same envelope.  libsodium
        itself refuses non-canonical S and small-order R and A.
        """
        if len(signature) != SIGNATURE_BYTES:
            raise SignatureError("signature has the wrong length")
        if not _is_valid_point(self.raw):
            raise SignatureError(f"{self.text} is not a prime-order Ed25519 public key")
        try:
            nacl.signing.VerifyKey(self.raw).verify(message, signature)
        except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError,
                nacl.exceptions.TypeError):
            raise SignatureError(f"signature does not verify for {self.text}") from None


@functools.lru_cache(maxsize=_POINT_CACHE_SIZE)
def _is_valid_point(raw: bytes) -> bool:
    return bool(nacl.bindings.crypto_core_ed25519_is_valid_point(raw))


class Identity:
    """A private Ed25519 key; never printed, logged or sent anywhere."""

    __slots__ = ("_signing", "public")

    def __init__(self, seed: bytes) -> None:
        if len(seed) != KEY_BYTES:
            raise InvalidFieldError(f"secret seed must be {KEY_BYTES} bytes")
        self._signing = nacl.signing.SigningKey(seed)
        self.public = PublicKey(bytes(self._signing.verify_key))

    @classmethod
    def generate(cls) -> Identity:
        return cls(os.urandom(KEY_BYTES))

    @classmethod
    def from_text(cls, text: str) -> Identity:
        try:
            return cls(_from_text(SECRET_PREFIX, text, "secret key"))
        except InvalidFieldError as error:
            try:
                _from_text(SECRET_PREFIX, text, "secret key", domain=b"")
            except InvalidFieldError:
                raise error from None
            raise InvalidFieldError(
                "secret key in the spelling of protocol 1 (its checksum does not cover the"
                " prefix): write it to a key file (0600), which is rewritten in today's form"
                " when read") from None

    def secret_text(self) -> str:
        """The secret's text form, for writing the key file only."""
        return _to_text(SECRET_PREFIX, bytes(self._signing))

    @property
    def signing_key(self) -> nacl.signing.SigningKey:
        return self._signing

    def sign(self, message: bytes) -> bytes:
        return self._signing.sign(message).signature

    def __repr__(self) -> str:
        return f"Identity(public={self.public.text})"

    def save(self, path: Path) -> None:
        """Write the key file readable by its owner only (0600), never over another key."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(self.secret_text() + "\n")
            handle.flush()
            os.fsync(handle.fileno())  # a key is for good: never an empty file after a power cut

    @classmethod
    def load_or_create(cls, path: Path) -> Identity:
        """A service's key: created (0600) on first start, the same key ever after."""
        if not path.exists():
            cls.generate().save(path)
        return cls.load(path)

    @classmethod
    def load(cls, path: Path) -> Identity:
        """Read a key file, refusing one that others can read.  A file written before
        protocol 2 (its checksum did not cover the prefix) is rewritten in today's form."""
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise PermissionError(
                f"{path} is readable by others (mode {mode:o}); run: chmod 600 {path}")
        text = path.read_text(encoding="ascii").strip()
        try:
            return cls.from_text(text)
        except InvalidFieldError as error:
            try:
                identity = cls(_from_text(SECRET_PREFIX, text, "secret key", domain=b""))
            except InvalidFieldError:
                raise error from None
        replacement = path.with_name(path.name + ".upgrade")
        replacement.unlink(missing_ok=True)
        identity.save(replacement)
        os.replace(replacement, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        return identity
