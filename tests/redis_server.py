"""Real Redis servers for the tests: the one on 127.0.0.1:6379 if it answers, else our own.

Loaded as a pytest plugin by conftest.  Nothing is faked: tests talk to a
real redis-server.  Each test gets a unique key prefix and its keys are
deleted afterwards, so tests never see each other's data nor disturb other
users of a shared Redis.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from child_process import ChildProcess
from relay_process import free_port

_ROOT = Path(__file__).resolve().parent.parent
_SHARED_PORT = 6379


def answers_ping(port: int, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def redis_server_binary() -> str:
    """Path of redis-server, installing Debian's package through scripts/install-redis if absent."""
    found = shutil.which("redis-server")
    if found is None:
        subprocess.run([str(_ROOT / "scripts" / "install-redis")], check=True, timeout=300)
        found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError("redis-server is not installed and could not be installed")
    return found


class RedisServer(ChildProcess):
    """A redis-server process on a fixed loopback port and data dir, so a restart finds its AOF."""

    def __init__(self, *options: str, port: int | None = None) -> None:
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="continuum-redis-"))
        self.options = options
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        self.process = subprocess.Popen(
            [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.dir), "--save", "", *self.options],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while not answers_ping(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.02)
        return self

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def start_cluster_node() -> RedisServer:
    """A one-node Redis Cluster owning all slots: enough to make CROSSSLOT mistakes fail."""
    # The cluster bus defaults to port + 10000, which overflows for ports above
    # 55535: give it a free port of its own so any data port works.
    node = RedisServer("--appendonly", "no", "--cluster-enabled", "yes",
                       "--cluster-config-file", "nodes.conf",
                       "--cluster-port", str(free_port())).start()
    subprocess.run(["redis-cli", "-p", str(node.port), "CLUSTER", "ADDSLOTSRANGE", "0", "16383"],
                   check=True, capture_output=True, timeout=10)
    deadline = time.monotonic() + 10
    while b"cluster_state:ok" not in subprocess.run(
            ["redis-cli", "-p", str(node.port), "CLUSTER", "INFO"],
            capture_output=True, timeout=10).stdout:
        if time.monotonic() > deadline:
            node.remove()
            raise RuntimeError("one-node cluster did not reach cluster_state:ok")
        time.sleep(0.05)
    return node


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A redis-server of the test's own (no persistence): for tests that kill its clients,
    or its relays' workers, without touching the shared one."""
    server = RedisServer("--appendonly", "no").start()
    try:
        yield server
    finally:
        server.remove()


@pytest.fixture(scope="session")
def redis_base_url() -> Iterator[str]:
    """redis://127.0.0.1:PORT of a running Redis: the shared one, else one started for the session."""
    if answers_ping(_SHARED_PORT):
        yield f"redis://127.0.0.1:{_SHARED_PORT}"
        return
    server = RedisServer("--appendonly", "no").start()
    try:
        yield server.url
    finally:
        server.remove()


@pytest.fixture(scope="session")
def redis_cluster_base_url() -> Iterator[str]:
    node = start_cluster_node()
    try:
        yield node.url
    finally:
        node.remove()


def unique_prefix() -> str:
    return f"continuum-test-{uuid.uuid4().hex[:12]}:"


def delete_prefix(url: str, prefix: str) -> None:
    with redis.Redis.from_url(url) as client:
        for key in list(client.scan_iter(match=f"{prefix}*", count=1000)):
            client.delete(key)  # one by one: on a cluster, keys of several slots


@pytest.fixture
def redis_url(redis_base_url: str) -> Iterator[str]:
    """A store URL with a key prefix of its own; its keys are deleted after the test."""
    prefix = unique_prefix()
    yield f"{redis_base_url}/0?prefix={prefix}"
    delete_prefix(redis_base_url, prefix)


@pytest.fixture
def redis_cluster_url(redis_cluster_base_url: str) -> Iterator[str]:
    prefix = unique_prefix()
    yield f"{redis_cluster_base_url}?cluster=true&prefix={prefix}"
    delete_prefix(redis_cluster_base_url, prefix)


def subscribers_of(port: int, pid: int) -> list[dict[str, str]]:
    """The pub/sub connections of process `pid` to the Redis on `port` (CLIENT LIST fields,
    e.g. `id`, `sub`: channels subscribed), matched by the local ports `ss` shows for pid."""
    sockets = subprocess.run(["ss", "-tnpH"], capture_output=True, text=True, timeout=10,
                             check=True).stdout
    mine = {line.split()[3].rsplit(":", 1)[1] for line in sockets.splitlines()
            if f"pid={pid}," in line}
    clients = subprocess.run(["redis-cli", "-p", str(port), "CLIENT", "LIST", "TYPE", "pubsub"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    fields = [dict(item.split("=", 1) for item in line.split() if "=" in item)
              for line in clients.splitlines()]
    return [client for client in fields if client["addr"].rsplit(":", 1)[1] in mine]


def kill_client(port: int, client_id: str) -> None:
    """CLIENT KILL one connection: what Redis itself does to a subscriber over its
    `client-output-buffer-limit pubsub`."""
    subprocess.run(["redis-cli", "-p", str(port), "CLIENT", "KILL", "ID", client_id],
                   capture_output=True, timeout=10, check=True)
