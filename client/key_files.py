"""The device's key files across a key rotation (SPEC §15), each step one atomic file change.

    identity.key        the key the device is
    identity.key.next   the key it is rotating to, until the oracle confirms the rotation
    identity.key.old    the key it rotated away from, until that key's mailbox is drained

A rotation goes: create `.next`; (the oracle confirms) write `.old` as a copy of
the current key, then move `.next` over `identity.key`; (the old mailbox is
drained) delete `.old`.  A crash between any two steps leaves a state that says
what to do next, so nothing is lost:

- `.next` present: the rotation is not confirmed; `rotate-key` resumes it with
  that key (the oracle applies a rotation once; the old key still works until it
  does).  A stray `.old` equal to `identity.key` is from a crash within the
  confirmation and is ignored until then.
- `.old` present and different from `identity.key`: confirmed, not yet drained;
  `listen` drains it.

Every file is written and synced before the rename that makes it count, so a
power cut does not leave a half-written key either.
"""

from __future__ import annotations

import os
from pathlib import Path

from proto import Identity
from runtime.files import sibling, sync, write_atomically

__all__ = ["KeyFiles", "write_atomically"]


class KeyFiles:
    """`identity.key` and its rotation companions in one home directory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.next_path = sibling(path, ".next")
        self.old_path = sibling(path, ".old")

    def current(self) -> Identity:
        return Identity.load(self.path)

    def pending(self) -> Identity | None:
        """The key a rotation not yet confirmed is moving to."""
        return Identity.load(self.next_path) if self.next_path.exists() else None

    def begin(self) -> Identity:
        """The key to rotate to: the pending one (resume), else a new one, saved first."""
        pending = self.pending()
        if pending is not None:
            return pending
        if self.draining() is not None:
            raise FileExistsError(f"{self.old_path} is an old key still to drain: run listen"
                                  " until it is drained, then rotate again")
        new = Identity.generate()
        self._save(new, self.next_path)
        return new

    def confirm(self, old: Identity, new: Identity) -> None:
        """The oracle confirmed: keep `old` to drain it, and make `new` (`.next`) the key."""
        if not self.old_path.exists():
            self._save(old, self.old_path)
        os.replace(self.next_path, self.path)
        sync(self.path.parent)

    def draining(self) -> Identity | None:
        """The old key whose mailbox still has to be drained, if any."""
        if not self.old_path.exists():
            return None
        old = Identity.load(self.old_path)
        return old if old.public != self.current().public else None

    def drained(self) -> None:
        """The old key's mailbox is empty: the old key is no longer needed."""
        self.old_path.unlink(missing_ok=True)

    @staticmethod
    def _save(identity: Identity, path: Path) -> None:
        identity.save(path)  # 0600, never over another file
        sync(path)
        sync(path.parent)
