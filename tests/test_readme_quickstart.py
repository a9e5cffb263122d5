"""The README's two-device quickstart, run as a user would: its lines pasted into a shell.

Only what cannot be the same on a shared test machine is changed: the port
(a free one instead of 8470), `.venv/bin/` (this interpreter's environment)
and HOME (a temporary directory, so `~/.alice` is fresh).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from readme_support import readme_block
from relay_process import free_port

ROOT = Path(__file__).resolve().parent.parent


def test_the_readme_quickstart_works_as_written(tmp_path: Path) -> None:
    lines = "".join(line + "\n" for line in readme_block("A device"))
    assert "demo" not in lines  # two devices by hand, no demo script
    script = lines.replace(".venv/bin/", f"{Path(sys.executable).parent}/")
    script = script.replace("8470", str(free_port()))
    shell = subprocess.Popen(["bash", "-e", "-c", script], cwd=ROOT, text=True,
                             env={**os.environ, "HOME": str(tmp_path)}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = shell.communicate(timeout=90)
    finally:  # the relay it starts in the background, if the script stopped before `kill`
        with contextlib.suppress(ProcessLookupError):
            os.killpg(shell.pid, signal.SIGKILL)
        shell.wait(10)
    assert shell.returncode == 0, err
    alice, bob, *rest = out.splitlines()
    assert alice.startswith("cpk_") and bob.startswith("cpk_")
    [accepted] = [line for line in rest if line.startswith("accepted ")]
    msg_id = accepted.split()[1]
    [shown] = [line for line in rest if line.endswith(" hello bob")]
    assert f" {alice} {msg_id} " in shown
    assert f"{bob} delivered" in rest
    assert "{" not in err  # words on stderr, no log lines
