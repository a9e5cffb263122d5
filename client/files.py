"""Replace a small file so that a crash or a power cut leaves the old content or the new, whole.

Rename is atomic, but only what reached the disk survives a power cut: the
new content is fsynced before the rename and the directory after it.  Then
whatever the device records next (a receipt saying "this peer list is in
force", in the state file) can never be on disk without the file it refers to.
"""

from __future__ import annotations

import os
from pathlib import Path


def replace_file(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
