"""Private Mosquitto and NATS JetStream servers for the peer run (benchmarks/peers.py).

Each broker is started from its Debian binary on a free 127.0.0.1 port with a
config file and data directory of its own in a temporary directory, and is
stopped by its PID: the system instances (1883, 4222) are never touched, and
nothing a run stores outlives it.  Their settings mirror what the relay does
for a device: QoS 1 / explicit acks, persistence on, the relay's delivery
window (64 messages in flight to a receiver) and TCP_NODELAY.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from common import free_port, stop_process_group

# /usr/sbin is where Debian puts both daemons; it is not on every user's PATH.
_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
DELIVERY_WINDOW = 64  # continuum.settings.Settings.delivery_window: deliveries unacked per receiver


def find_binary(name: str) -> str | None:
    """The broker's executable, or None when it is not installed here."""
    return shutil.which(name, path=_SEARCH_PATH)


class BrokerProcess:
    """One broker on a free loopback port; a context manager that always stops it by PID."""

    binary_name = ""
    scheme = ""

    def __init__(self) -> None:
        binary = find_binary(self.binary_name)
        if binary is None:
            raise FileNotFoundError(f"{self.binary_name} is not installed")
        self.binary = binary
        self.port = free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix=f"continuum-peer-{self.binary_name}-"))
        self.log_path = self.workdir / "server.log"
        self.process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        """The command line, after writing whatever config it names into `workdir`."""
        raise NotImplementedError

    def version(self) -> str:
        raise NotImplementedError

    def _with_config(self, name: str, lines: list[str]) -> list[str]:
        """Write `lines` as the config file `name` in `workdir`; the command that reads it."""
        config = self.workdir / name
        config.write_text("\n".join(lines) + "\n")
        return [self.binary, "-c", str(config)]

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def __enter__(self) -> BrokerProcess:
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        try:
            self._wait_listening(timeout_s=20.0)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        process, self.process = self.process, None
        stop_process_group(process, signal.SIGTERM, grace_s=20)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _wait_listening(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.binary_name} exited with {self.process.returncode}:\n"
                                   f"{self.log_path.read_text(errors='replace')[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"{self.binary_name} not listening within {timeout_s}s")


class Mosquitto(BrokerProcess):
    """Mosquitto with persistence on.  Its persistence is a snapshot of the in-memory store
    written every `autosave_interval` and at exit, so its PUBACK is not a disk write, like
    the relay's memory store (and unlike its SQLite file or Redis AOF)."""

    binary_name = "mosquitto"
    scheme = "mqtt"

    def command(self) -> list[str]:
        return self._with_config("mosquitto.conf", [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            # As root it would switch to the `mosquitto` user, who cannot write `workdir`.
            f"user {pwd.getpwuid(os.getuid()).pw_name}",
            "persistence true",
            f"persistence_location {self.workdir}/",
            f"max_inflight_messages {DELIVERY_WINDOW}",
            "max_queued_messages 0",  # unlimited, like a mailbox: never drop a QoS 1 message
            "set_tcp_nodelay true",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
        ])

    def version(self) -> str:
        run = subprocess.run([self.binary, "-h"], capture_output=True, text=True, timeout=10)
        return (run.stdout or run.stderr).splitlines()[0].strip()


class NatsServer(BrokerProcess):
    """nats-server with JetStream on file storage; streams and consumers are made by the
    receivers (benchmarks/peer_clients.py), as a device's mailbox is made by its connect."""

    binary_name = "nats-server"
    scheme = "nats"

    def command(self) -> list[str]:
        return self._with_config("nats.conf", [
            f"listen: 127.0.0.1:{self.port}",
            "server_name: continuum-peer",
            f'jetstream {{ store_dir: "{self.workdir / "jetstream"}" }}',
        ])

    def version(self) -> str:
        return subprocess.run([self.binary, "--version"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
