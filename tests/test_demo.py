"""The README's demo command works: the whole system end to end, as a user runs it."""

from __future__ import annotations

import subprocess
import sys


def test_demo_runs_every_step_and_exits_cleanly(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "demo", "--once", "--dir", str(tmp_path),
         "--relay-port", "0", "--oracle-port", "0"],
        capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "both devices received their signed peer lists" in out
    assert out.count("alice got bob's signed receipt: delivered") == 2
    assert "receipt status: pending" in out
    assert "bob decrypted: 'are you there, bob?'" in out
    assert "user admin   password " in out and "/login" in out
    assert (tmp_path / "oracle.key").stat().st_mode & 0o077 == 0


def test_demo_refuses_to_reuse_a_state_directory(tmp_path) -> None:
    (tmp_path / "oracle.db").write_bytes(b"")
    result = subprocess.run([sys.executable, "-m", "demo", "--once", "--dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "empty --dir" in result.stderr
