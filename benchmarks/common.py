"""Shared plumbing for the benchmark scripts: the relay subprocess, /proc readings, results.

The relay runs as a real OS process started through its CLI, so what is
measured is what an operator runs; its CPU and memory are read from /proc
(Linux only) rather than through a dependency.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# The tests' helpers for processes and ports serve the benchmarks too (one home for each).
sys.path.append(str(Path(__file__).resolve().parent.parent / "tests"))
from relay_process import free_port, free_port_run  # noqa: E402,F401  (the scripts' imports)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
_CLK_TCK = os.sysconf("SC_CLK_TCK")

# Raised so the rate limiters (messages, frames), mailbox cap and handshake gate never shape a
# figure: every benchmark device connects from 127.0.0.1 with a fresh key.
UNTHROTTLED = ("--rate-per-s", "1e9", "--rate-burst", "1000000000",
               "--mailbox-max-messages", "1000000", "--mailbox-max-bytes", str(1 << 31),
               "--max-pending-handshakes-per-address", "4096",
               "--max-connections-per-address", "1000000",
               "--unknown-key-rate-per-s", "1e9", "--unknown-key-burst", "1000000000",
               "--frames-per-s", "1e9", "--frame-burst", "1000000000",
               "--log-level", "warning")


def relay_command() -> list[str]:
    """The installed `continuum` CLI of this interpreter's environment."""
    script = Path(sys.executable).parent / "continuum"
    return [str(script)] if script.exists() else [sys.executable, "-m", "continuum"]


def relay_flags(code_dir: str | None = None) -> str:
    """The relay's --help text (of another checkout's code, with `code_dir`): which flags it has,
    so one script can drive an older relay that lacks newer settings."""
    env = None if code_dir is None else {**os.environ, "PYTHONPATH": code_dir}
    return subprocess.run([*relay_command(), "--help"], capture_output=True, text=True, env=env,
                          check=True).stdout


def raise_nofile() -> int:
    """Lift the soft open-files limit to the hard one; children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def cpu_seconds(pid: int) -> float:
    """user+sys CPU seconds of one process, from /proc/PID/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def machine_busy_seconds() -> float:
    """CPU seconds all cores together spent busy since boot (/proc/stat), to spot other load."""
    jiffies = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = jiffies[3] + jiffies[4]  # idle + iowait
    return (sum(jiffies[:8]) - idle) / _CLK_TCK


def memory_kib(pid: int) -> dict[str, int]:
    """Current (VmRSS) and peak (VmHWM) resident set of one process, in KiB."""
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values


class RelayProcess:
    """One relay started with the CLI on a free loopback port; always stop it (context manager)."""

    def __init__(self, *args: str, store: str = "memory", wrapper: Sequence[str] = (),
                 stop_signal: signal.Signals = signal.SIGTERM, code_dir: str | None = None) -> None:
        """`code_dir`: run the relay code of another checkout (put first on PYTHONPATH), so
        an A/B comparison drives both with the same load generator in one run."""
        self.port = free_port()
        self.wrapped = bool(wrapper)
        self.stop_signal = stop_signal
        self._workdir = Path(tempfile.mkdtemp(prefix="continuum-bench-"))
        self.store = store.replace("{tmp}", str(self._workdir))
        self.command = [*wrapper, *relay_command(), "--host", "127.0.0.1", "--port",
                        str(self.port), "--store", self.store, *args]
        self.log_path = self._workdir / "relay.log"
        self.env = None if code_dir is None else {**os.environ, "PYTHONPATH": code_dir}
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/connect"

    @property
    def pid(self) -> int:
        """The relay's own pid, also when it runs under a wrapper (a profiler) as its child."""
        assert self.process is not None
        if not self.wrapped:
            return self.process.pid
        own = self.process.pid
        children = Path(f"/proc/{own}/task/{own}/children").read_text().split()
        return int(children[0]) if children else own

    def __enter__(self) -> RelayProcess:
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True, env=self.env)
        try:
            self._wait_healthy(timeout_s=20.0)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"relay exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=1):
                    return
            except (urllib.error.URLError, OSError):
                time.sleep(0.05)
        raise TimeoutError(f"relay not healthy within {timeout_s}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def metric(self, name: str) -> float:
        """One unlabelled value from the relay's /metrics (e.g. continuum_messages_acked_total)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as answer:
            for line in answer.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
        raise KeyError(name)

    def metric_sum(self, name: str) -> float:
        """The sum over every label set of one metric (e.g. all handshake failure reasons)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as answer:
            lines = answer.read().decode().splitlines()
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines
                   if line.startswith((name + " ", name + "{")))

    def stop(self) -> None:
        """Signal the relay's process group (a wrapper and its child alike), SIGKILL after 20 s."""
        process, self.process = self.process, None
        stop_process_group(process, self.stop_signal, grace_s=20)
        shutil.rmtree(self._workdir, ignore_errors=True)


def stop_process_group(process: subprocess.Popen[bytes] | None, first_signal: int,
                       grace_s: float) -> None:
    """Signal a child's process group (a wrapper and its child alike), SIGKILL after `grace_s`."""
    if process is not None and process.poll() is None:
        os.killpg(process.pid, first_signal)
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


@dataclass
class CpuSampler:
    """Samples a process's CPU seconds (and the whole machine's) every `interval_s` in a thread.

    The measured window (first send → last delivery) is only known after the
    run, so samples are kept and the window's CPU is read off them afterwards.
    The machine's busy time shows whether something else competed for the cores.
    """

    pid: int
    interval_s: float = 0.05
    samples: list[tuple[int, float, float]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> CpuSampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.monotonic_ns(), cpu_seconds(self.pid),
                                     machine_busy_seconds()))
            except OSError:
                return
            self._stop.wait(self.interval_s)

    def cpu_between(self, start_ns: int, end_ns: int) -> tuple[float, float, float]:
        """(process CPU s, machine busy CPU s, wall s) between the samples nearest the window's ends."""
        inside = [s for s in self.samples if start_ns <= s[0] <= end_ns] or self.samples[-2:]
        (t0, c0, m0), (t1, c1, m1) = inside[0], inside[-1]
        return c1 - c0, m1 - m0, max((t1 - t0) / 1e9, 1e-9)


def best_us(work: Callable[[], object], seconds: float = 0.4) -> float:
    """Best-of-5 µs per call of `work` (micro-benchmarks of pure code)."""
    results = []
    for _ in range(5):
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds / 5:
            work()
            count += 1
        results.append((time.perf_counter() - started) / count * 1e6)
    return min(results)


def percentiles(values: list[int], points: Sequence[float] = (50, 90, 99)) -> dict[str, float]:
    """Nearest-rank percentiles and max of nanosecond samples, in milliseconds."""
    if not values:
        return {**{f"p{p:g}": float("nan") for p in points}, "max": float("nan")}
    ordered = sorted(values)
    result = {f"p{p:g}": ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]
              / 1e6 for p in points}
    result["max"] = ordered[-1] / 1e6
    return result


def write_results(name: str, data: dict[str, object]) -> Path:
    """benchmarks/results/<name>-<timestamp>.json, so runs can be compared later."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    path = RESULTS_DIR / f"{name}-{stamp}.json"
    meta = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                        "platform": sys.platform},
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "timestamp": stamp}
    path.write_text(json.dumps({**meta, **data}, indent=2, default=str) + "\n")
    return path


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain fixed-width text table (no dependency), numbers formatted compactly."""
    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
        if isinstance(value, int):
            return f"{value:,}"
        return str(value)
    text = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in text)) if text else len(h)
              for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.ljust(w) if isinstance(raw, str) else v.rjust(w)
                      for v, w, raw in zip(r, widths, row)) for r, row in zip(text, rows)]
    return "\n".join(line.rstrip() for line in out)
