"""Size bounds shared by every decoder, so no input can make us allocate without limit."""

from __future__ import annotations

from dataclasses import dataclass

PROTOCOL_VERSION = 2
DEFAULT_MAX_ENVELOPE_BYTES = 64 * 1024
DEFAULT_MAX_RECIPIENTS = 64
MAX_TTL_SECONDS = 2**32 - 1
# A frame wraps one envelope plus a few small fields.
FRAME_OVERHEAD_BYTES = 256


@dataclass(frozen=True)
class Limits:
    """Bounds applied while decoding; the relay and devices must agree on them."""

    max_envelope_bytes: int = DEFAULT_MAX_ENVELOPE_BYTES
    max_recipients: int = DEFAULT_MAX_RECIPIENTS

    @property
    def max_frame_bytes(self) -> int:
        return self.max_envelope_bytes + FRAME_OVERHEAD_BYTES


DEFAULT_LIMITS = Limits()
