"""Tunnels: throughput and round trip through the relay, against direct TCP and `ssh -L`,
in one run; and the relay's memory with 100 streams whose receivers stopped reading.

    .venv/bin/python benchmarks/tunnel.py [--megabytes 100] [--round-trips 2000] [--rounds 3]
                                          [--redis redis://127.0.0.1:6379/0] [--streams 100]

Every path carries the same traffic to the same TCP server (a child process):

- `direct`: the client connects to the server itself;
- `ssh -L`: OpenSSH's local forward (Debian's openssh, `scripts/install-openssh`) through a
  private sshd on a free loopback port (throwaway host key, one authorized key);
- `continuum`: `continuum-client tunnel` (user) → one relay (embedded store) →
  `continuum-client expose` (device) → the server; all separate processes, as deployed;
- `continuum, 2 replicas`: the same with the user and the device on two relays sharing a
  Redis (skipped when none answers).

Throughput: one TCP connection sends `--megabytes` MB and closes its sending side; the
server counts them and answers the count: MB/s from connect to the answer.  Round trip:
`--round-trips` 64-byte requests, each echoed, on one connection (opened beforehand).
Each path runs `--rounds` times, interleaved; the table shows medians and the ratios the
issue sets targets for (>= 50 % of ssh -L's throughput; < 2 ms added p50 round trip).
CPU: user+sys seconds of each path's processes during the throughput run (the table), and by
process with the server, the client and the rest of the machine (`others`: other work on a
shared machine, which the paths compete with).

Memory (`--streams N`): a relay, a device exposing a port whose service accepts and never
reads, and a user's tunnel to it.  The relay's RSS is read with both devices connected,
with N streams open, with N streams into which the client wrote until nothing more was
taken (the service stopped reading: its device stops granting credit), and, on a fresh
relay, with N streams whose receiving device is SIGSTOPped (it reads nothing from its
relay connection: what waits is in the relay), measured before the relay's 30 s
write timeout closes that connection.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import signal
import socket
import socketserver
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

from common import (RelayProcess, cpu_seconds, free_port, machine_busy_seconds, memory_kib,
                    percentiles, table, write_results)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from sshd_server import PrivateSshd  # noqa: E402

CLIENT = str(Path(sys.executable).parent / "continuum-client")
BLOCK = 256 * 1024
REQUEST = b"r" * 64


# -- the TCP server every path reaches (a child process) --------------------------------------

class _Handler(socketserver.BaseRequestHandler):
    """First byte: `T` count bytes until EOF and answer the count; `E` echo until EOF."""

    def handle(self) -> None:
        conn: socket.socket = self.request
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            mode = conn.recv(1)
            if mode == b"T":
                total = 0
                while chunk := conn.recv(BLOCK):
                    total += len(chunk)
                conn.sendall(total.to_bytes(8, "big"))
            elif mode == b"E":
                while chunk := conn.recv(65536):
                    conn.sendall(chunk)
        except ConnectionError:
            pass  # a path's processes were stopped with the connection open


class _Hole(socketserver.BaseRequestHandler):
    """Accepts and never reads: a service that stopped reading."""

    def handle(self) -> None:
        time.sleep(3600)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def serve(port: int, hole_port: int) -> None:
    servers = [_Server(("127.0.0.1", port), _Handler), _Server(("127.0.0.1", hole_port), _Hole)]
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for thread in threads:
        thread.start()
    threads[0].join()


# -- clients -----------------------------------------------------------------------------------

def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=120)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def throughput(port: int, total: int) -> float:
    """MB/s of one connection sending `total` bytes, until the server confirms them all."""
    block = memoryview(os.urandom(BLOCK))
    started = time.perf_counter()
    with _connect(port) as sock:
        sock.sendall(b"T")
        sent = 0
        while sent < total:
            piece = block[:min(BLOCK, total - sent)]
            sock.sendall(piece)
            sent += len(piece)
        sock.shutdown(socket.SHUT_WR)
        answer = _read_exactly(sock, 8)
    elapsed = time.perf_counter() - started
    if int.from_bytes(answer, "big") != total:
        raise RuntimeError(f"the server counted {int.from_bytes(answer, 'big')} of {total} bytes")
    return total / elapsed / 1e6


def round_trips(port: int, count: int) -> list[int]:
    """Nanoseconds per 64-byte request echoed, on one connection opened beforehand."""
    samples = []
    with _connect(port) as sock:
        sock.sendall(b"E" + REQUEST)
        _read_exactly(sock, len(REQUEST))  # the stream is open and warm
        for _ in range(count):
            started = time.monotonic_ns()
            sock.sendall(REQUEST)
            _read_exactly(sock, len(REQUEST))
            samples.append(time.monotonic_ns() - started)
    return samples


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("closed early")
        data += chunk
    return bytes(data)


def _wait_listening(port: int, process: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


# -- paths -------------------------------------------------------------------------------------

class Path_:
    """One way from the client to the server: its local port and its processes, by role."""

    def __init__(self, name: str, port: int, pids: dict[str, int]) -> None:
        self.name, self.port, self.pids = name, port, pids


def _cli(home: Path, *args: str, log: Path | None = None) -> subprocess.Popen[bytes]:
    out = open(log, "wb") if log else subprocess.DEVNULL
    return subprocess.Popen([CLIENT, "--home", str(home), *args], stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _cli_ok(home: Path, *args: str) -> str:
    return subprocess.run([CLIENT, "--home", str(home), *args], check=True, capture_output=True,
                          text=True, timeout=30).stdout.strip()


def _wait_line(log: Path, words: str, process: subprocess.Popen[bytes],
               timeout_s: float = 30) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        for line in text.splitlines():
            if words in line:
                return line
        if process.poll() is not None:
            raise RuntimeError(f"exited with {process.returncode}: {text}")
        time.sleep(0.05)
    raise TimeoutError(f"no {words!r} in {log}")


def continuum_path(stack: ExitStack, name: str, work: Path, target: int,
                   device_relay: RelayProcess, user_relay: RelayProcess,
                   window: int | None = None) -> tuple[Path_, dict]:
    """expose on a device, tunnel on the user's side; returns the path and its processes."""
    work.mkdir()
    device, user = work / "device", work / "user"
    device_key, user_key = _cli_ok(device, "keygen"), _cli_ok(user, "keygen")
    _cli_ok(device, "peers", "add", user_key)
    _cli_ok(user, "peers", "add", device_key)
    windows = () if window is None else ("--window", str(window))
    expose = _cli(device, "--relay", device_relay.url, "expose", str(target), *windows,
                  log=work / "expose.log")
    stack.callback(_stop, expose)
    _wait_line(work / "expose.log", "exposing", expose)
    tunnel = _cli(user, "--relay", user_relay.url, "tunnel", f"{device_key}:{target}",
                  "--listen", "127.0.0.1:0", *windows, log=work / "tunnel.log")
    stack.callback(_stop, tunnel)
    line = _wait_line(work / "tunnel.log", "listening on", tunnel)
    port = int(line.split()[2].rsplit(":", 1)[1])
    relays = ({"relay": device_relay.pid} if device_relay is user_relay
              else {"relay (user)": user_relay.pid, "relay (device)": device_relay.pid})
    return Path_(name, port, {"tunnel": tunnel.pid, **relays, "expose": expose.pid}), {
        "expose": expose, "tunnel": tunnel}


def ssh_path(stack: ExitStack, target: int) -> Path_:
    sshd = PrivateSshd().start()
    stack.callback(sshd.remove)
    port = free_port()
    command = sshd.ssh_command(sshd.port, "-N", "-o", "ExitOnForwardFailure=yes",
                               "-L", f"127.0.0.1:{port}:127.0.0.1:{target}")
    forward = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    stack.callback(_stop, forward)
    _wait_listening(port, forward)
    # sshd forks a session process per login (and privilege-separated children of it).
    sessions = _children(sshd.process.pid)
    return Path_("ssh -L", port, {"ssh": forward.pid,
                                  **{f"sshd {i}": pid for i, pid in enumerate(sessions)}})


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            found += [int(child), *_children(int(child))]
    return found


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def _redis_answers(url: str) -> bool:
    import redis
    try:
        with redis.Redis.from_url(url, socket_connect_timeout=1) as client:
            return bool(client.ping())
    except redis.RedisError:
        return False


# -- the measurements ------------------------------------------------------------------------

def measure(paths: list[Path_], total: int, trips: int, rounds: int,
            server_pid: int) -> dict[str, dict]:
    """Medians over the rounds: MB/s, p50/p99 ms, CPU s of the path's processes (and of the
    server, the client and everything else on the machine) during the throughput run."""
    results: dict[str, dict[str, list[float]]] = {p.name: {} for p in paths}
    me = os.getpid()
    for round_ in range(rounds):
        for path in paths:
            pids = {role: pid for role, pid in path.pids.items()
                    if Path(f"/proc/{pid}").exists()}
            watched = {**pids, "server": server_pid, "client": me}
            before = {role: cpu_seconds(pid) for role, pid in watched.items()}
            busy_before = machine_busy_seconds()
            mb_s = throughput(path.port, total)
            cpu = {role: cpu_seconds(pid) - before[role] for role, pid in watched.items()}
            cpu["others"] = machine_busy_seconds() - busy_before - sum(cpu.values())
            latency = percentiles(round_trips(path.port, trips))
            entry = results[path.name]
            for key, value in [("mb_s", mb_s), ("p50", latency["p50"]), ("p99", latency["p99"]),
                               ("cpu_s", sum(cpu[role] for role in pids)),
                               *((f"cpu {role}", v) for role, v in cpu.items())]:
                entry.setdefault(key, []).append(value)
            print(f"  round {round_ + 1} {path.name:<22} {mb_s:8.1f} MB/s  p50"
                  f" {latency['p50']:.3f} ms  p99 {latency['p99']:.3f} ms  cpu "
                  + " ".join(f"{role} {v:.2f}" for role, v in cpu.items()), flush=True)
    return {name: {key: statistics.median(values) for key, values in entry.items()}
            for name, entry in results.items()}


def _fill(sockets: list[socket.socket], quiet_s: float = 1.5, limit_s: float = 10) -> list[int]:
    """Write into every socket until none takes anything for `quiet_s` (or `limit_s` passed);
    bytes taken by each (-1: it was reset)."""
    block = os.urandom(65536)
    taken = [0] * len(sockets)
    for sock in sockets:
        sock.setblocking(False)
    last_progress = started = time.monotonic()
    while time.monotonic() - last_progress < quiet_s and time.monotonic() - started < limit_s:
        progressed = False
        for i, sock in enumerate(sockets):
            if taken[i] < 0:
                continue
            try:
                taken[i] += sock.send(block)
                progressed = True
            except BlockingIOError:
                pass
            except ConnectionError:
                taken[i] = -1
        if progressed:
            last_progress = time.monotonic()
        else:
            time.sleep(0.05)
    return taken


def memory_figure(work: Path, hole: int, streams: int) -> dict[str, object]:
    """Relay RSS with `streams` streams whose receivers stopped reading (see the docstring)."""
    figure: dict[str, object] = {}
    for case in ("service stops reading", "receiving device stopped (SIGSTOP)"):
        with ExitStack() as stack:
            relay = stack.enter_context(RelayProcess(
                "--log-level", "warning", "--max-streams-per-device", str(streams + 10),
                "--max-pending-streams-per-device", str(streams + 10),
                "--stream-opens-per-s", "1000", "--stream-open-burst", str(streams + 10)))
            path, processes = continuum_path(stack, "memory", work / case.split()[1], hole,
                                             relay, relay)
            time.sleep(1.0)
            base = memory_kib(relay.pid)["VmRSS"]
            sockets = [stack.enter_context(_connect(path.port)) for _ in range(streams)]
            for sock in sockets:  # one byte each: the stream is open once it has gone through
                sock.sendall(b"x")
            time.sleep(2.0)
            opened = memory_kib(relay.pid)["VmRSS"]
            if case.startswith("receiving"):
                os.kill(processes["expose"].pid, signal.SIGSTOP)
                stack.callback(os.kill, processes["expose"].pid, signal.SIGCONT)
            taken = _fill(sockets)
            time.sleep(1.0)
            stalled = memory_kib(relay.pid)
            alive = [t for t in taken if t >= 0] or [0]
            figure[case] = {"rss_connected_kib": base, "rss_streams_open_kib": opened,
                            "rss_stalled_kib": stalled["VmRSS"], "peak_kib": stalled["VmHWM"],
                            "client_bytes_taken_per_stream": statistics.median(alive),
                            "streams_reset": len(taken) - len([t for t in taken if t >= 0])}
            print(f"  {case}: relay RSS {base / 1024:.1f} MiB connected, {opened / 1024:.1f}"
                  f" with {streams} streams, {stalled['VmRSS'] / 1024:.1f} stalled (peak"
                  f" {stalled['VmHWM'] / 1024:.1f}); the client wrote"
                  f" {statistics.median(alive) / 1024:.0f} KiB per stream before it blocked;"
                  f" {figure[case]['streams_reset']} streams reset", flush=True)
    return figure


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=100)
    parser.add_argument("--round-trips", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--streams", type=int, default=100, help="0: skip the memory figure")
    args = parser.parse_args()
    total = args.megabytes * 1_000_000
    work = Path(tempfile.mkdtemp(prefix="continuum-tunnel-bench-"))
    target, hole = free_port(), free_port()
    server = mp.Process(target=serve, args=(target, hole), daemon=True)
    server.start()
    try:
        with ExitStack() as stack:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    socket.create_connection(("127.0.0.1", target), timeout=0.5).close()
                    break
                except OSError:
                    time.sleep(0.05)
            paths = [Path_("direct", target, {}), ssh_path(stack, target)]
            relay = stack.enter_context(RelayProcess("--log-level", "warning"))
            paths.append(continuum_path(stack, "continuum", work / "one", target, relay,
                                        relay)[0])
            if args.redis and _redis_answers(args.redis):
                store = f"{args.redis}?prefix=tunnel-bench-{os.getpid()}:"
                first = stack.enter_context(RelayProcess("--log-level", "warning", store=store))
                second = stack.enter_context(RelayProcess("--log-level", "warning", store=store))
                paths.append(continuum_path(stack, "continuum, 2 replicas", work / "two", target,
                                            first, second)[0])
            print(f"{args.megabytes} MB and {args.round_trips} round trips per path, "
                  f"{args.rounds} rounds, interleaved", flush=True)
            assert server.pid is not None
            results = measure(paths, total, args.round_trips, args.rounds, server.pid)
        memory = memory_figure(work, hole, args.streams) if args.streams else {}
    finally:
        server.terminate()
        server.join(10)
        shutil.rmtree(work, ignore_errors=True)
    ssh, direct = results["ssh -L"], results["direct"]
    rows = []
    for name, entry in results.items():
        rows.append([name, entry["mb_s"], entry["mb_s"] / ssh["mb_s"], entry["p50"],
                     entry["p50"] - direct["p50"], entry["p99"], entry["cpu_s"]])
    print()
    print(table(["path", "MB/s", "x ssh -L", "p50 ms", "+p50 ms", "p99 ms",
                 f"CPU s / {args.megabytes} MB"], rows))
    print(f"\nCPU seconds per {args.megabytes} MB, by process (medians; 'others' is the rest"
          " of the machine: other sessions' work):")
    for name, entry in results.items():
        print(f"  {name:<22} " + "  ".join(f"{key[4:]} {value:.2f}" for key, value in
                                          entry.items() if key.startswith("cpu ")))
    ours = results["continuum"]
    print(f"\ntargets: continuum {ours['mb_s'] / ssh['mb_s']:.0%} of ssh -L throughput"
          f" (>= 50 %), +{ours['p50'] - direct['p50']:.3f} ms p50 round trip (< 2 ms)")
    path = write_results("tunnel", {"args": vars(args), "paths": results, "memory": memory})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
