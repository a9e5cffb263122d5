"""The device's key files across a rotation: every state a crash can leave says what comes next."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.key_files import KeyFiles
from proto import Identity


def _home(tmp_path: Path) -> tuple[KeyFiles, Identity]:
    old = Identity.generate()
    old.save(tmp_path / "identity.key")
    return KeyFiles(tmp_path / "identity.key"), old


def test_a_rotation_walks_next_then_old_then_nothing(tmp_path: Path) -> None:
    files, old = _home(tmp_path)
    new = files.begin()
    assert files.pending().public == new.public and files.begin().public == new.public  # resume
    assert files.current().public == old.public and files.draining() is None
    files.confirm(old, new)
    assert files.current().public == new.public and files.pending() is None
    assert files.draining().public == old.public
    with pytest.raises(FileExistsError):  # no second rotation before the first is drained
        files.begin()
    files.drained()
    assert files.draining() is None and files.begin().public != new.public


def test_a_crash_inside_the_confirmation_resumes_as_not_confirmed(tmp_path: Path) -> None:
    files, old = _home(tmp_path)
    new = files.begin()
    old.save(tmp_path / "identity.key.old")  # .old written, then the crash before the rename
    files = KeyFiles(tmp_path / "identity.key")
    assert files.current().public == old.public and files.draining() is None
    assert files.begin().public == new.public  # rotate-key resumes with the same new key
    files.confirm(old, new)
    assert files.current().public == new.public and files.draining().public == old.public
