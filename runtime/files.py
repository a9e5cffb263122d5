"""Files that must survive a crash or a power cut: whole or not at all, and on disk.

A device's key files and the oracle's key chain each change in steps whose
order carries meaning (SPEC §15), so every step is a file written, synced,
renamed into place and its directory synced: a reader then sees the old
contents or the new, never half, and a finished step is never undone by a
power cut.
"""

from __future__ import annotations

import os
from pathlib import Path


def sibling(path: Path, suffix: str) -> Path:
    """`path` with `suffix` appended to its name (identity.key → identity.key.next)."""
    return path.with_name(path.name + suffix)


def sync(path: Path) -> None:
    """fsync a file or a directory (a directory: so a rename in it is on disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes) -> None:
    """Replace `path` with `data` (mode 0644) so a reader sees the old or the new, never half."""
    temporary = sibling(path, ".tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    sync(path.parent)
