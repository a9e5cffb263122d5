"""A private OpenSSH server on a free loopback port, for the tunnel tests and benchmarks.

Debian's OpenSSH, installed by `scripts/install-openssh` if missing.  Each
server gets a directory of its own: a throwaway ed25519 host key, a client key
pair and an `authorized_keys` holding only that client key, a config that
allows nothing but public-key logins of the current user on 127.0.0.1, and
its log.  It runs in the foreground (`-D`), so its PID is the one started and
is stopped by it; the system's sshd, if any, is never touched.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from child_process import ChildProcess

_ROOT = Path(__file__).resolve().parent.parent
SSHD = "/usr/sbin/sshd"


def install_openssh() -> None:
    """sshd, ssh and ssh-keygen, through the project's script (Debian's packages)."""
    if not (Path(SSHD).exists() and shutil.which("ssh") and shutil.which("ssh-keygen")):
        subprocess.run([str(_ROOT / "scripts" / "install-openssh")], check=True, timeout=600)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PrivateSshd(ChildProcess):
    def __init__(self) -> None:
        install_openssh()
        self.dir = Path(tempfile.mkdtemp(prefix="continuum-sshd-"))
        self.port = _free_port()
        self.user = getpass.getuser()
        self.client_key = self.dir / "client_key"
        for key in (self.dir / "host_key", self.client_key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                           check=True, capture_output=True, timeout=30)
        (self.dir / "authorized_keys").write_text(
            (self.dir / "client_key.pub").read_text())
        self.config = self.dir / "sshd_config"
        self.config.write_text("\n".join([
            f"Port {self.port}", "ListenAddress 127.0.0.1",
            f"HostKey {self.dir / 'host_key'}",
            f"AuthorizedKeysFile {self.dir / 'authorized_keys'}",
            f"PidFile {self.dir / 'sshd.pid'}",
            f"AllowUsers {self.user}",
            "PubkeyAuthentication yes", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "UsePAM no",
            "StrictModes no",  # the temporary directory's modes are the test's
            "PermitRootLogin prohibit-password", "AllowTcpForwarding yes",
            "LogLevel ERROR", ""]))
        self.log_path = self.dir / "sshd.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 10.0) -> PrivateSshd:
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation dir
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.config)],
                                            stdout=log, stderr=log)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"sshd exited: {self.log_path.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as conn:
                    if conn.recv(4).startswith(b"SSH-"):
                        return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"sshd on port {self.port} did not start")

    def ssh_command(self, port: int, *args: str) -> list[str]:
        """An `ssh` to this server's user on 127.0.0.1:`port` (this server's, or a tunnel's),
        with the client key, no questions and no known-hosts file."""
        return ["ssh", "-i", str(self.client_key), "-p", str(port),
                "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "LogLevel=ERROR", "-F", "/dev/null", f"{self.user}@127.0.0.1", *args]

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PrivateSshd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.remove()
