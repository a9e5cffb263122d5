"""`continuum --workers N`: N relay processes on one port, started, restarted and stopped as one.

Why processes: one Python process decodes, verifies and stores on one core (the GIL), and
the relay already runs as stateless replicas sharing a Redis store, so N workers are N
replicas on one port.  A thread pool for the signature check alone could not reach 2x: the
verify is under half of a message's relay CPU (issue #18), so by Amdahl two threads would give
at most ~1.3x.

Why one listening socket, made here and inherited by every worker, rather than a socket per
worker with SO_REUSEPORT: the kernel hashes each connection to one SO_REUSEPORT socket
whatever that worker's load, and a relay's connections live for hours: in one run of
benchmarks/replicas.py --workers 32 connections split 23 to 9, one worker carrying more than
twice the other's load for the whole run.  On one shared socket each worker's accept loop
takes a connection when its turn comes round (runtime/listener.py), so a busier worker takes
fewer: 17/15, 17/15 and 16/16 in three runs.  It also keeps the port exclusive (no second
relay can join it), lets port 0 work, and a worker's death drops no connection waiting in the
listen queue: the queue is the socket's.  Each new connection wakes every worker's loop once,
nothing at N = cores.

The supervisor runs no event loop and serves nothing: it binds the port, resolves what the
workers must share (the relay key, so every worker signs expiry notices alike), forks the
workers, restarts one that exits (after a back-off when it keeps failing), and on SIGTERM or
SIGINT stops them all and waits for them.  A worker that fails before all have started once
ends the supervisor with its exit code: a bad setting is reported, not retried forever.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing as mp
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

import structlog

from runtime.listener import bind_listening

from .server import load_relay_identity
from .settings import Settings

__all__ = ["RestartPolicy", "RunWorker", "supervise"]

# How a worker runs: (its settings, its index, the shared listening sockets, call once
# serving) -> returns when stopped.
RunWorker = Callable[[Settings, int, list[socket.socket], Callable[[], None]], None]

# What a worker may take to stop after SIGTERM (RelayServer.stop is bounded by a few 5 s
# steps) before it is killed; under a Kubernetes terminationGracePeriodSeconds of 30.
STOP_GRACE_S = 25.0
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
# A worker's exit may be seen before the stop signal that caused it reaches the supervisor
# (a Ctrl-C signals the whole process group; seen in about 1 run of 3 in tests): so long,
# at most, is the supervisor's own signal waited for before the exit counts as a crash.
_STOP_SIGNAL_GRACE_S = 0.25


class RestartPolicy:
    """How long to wait before restarting a worker that exited (pure: the caller keeps time).

    A worker that had run `healthy_after_s` or more is restarted at once; one that exits
    sooner waits `first_delay_s`, doubling per consecutive early exit up to `max_delay_s`,
    so a worker that cannot start (Redis down) does not spin a core.
    """

    def __init__(self, healthy_after_s: float = 10.0, first_delay_s: float = 0.5,
                 max_delay_s: float = 30.0) -> None:
        self._healthy_after_s = healthy_after_s
        self._first_delay_s = first_delay_s
        self._max_delay_s = max_delay_s
        self._early_exits: dict[int, int] = {}

    def delay_after_exit(self, worker: int, uptime_s: float) -> float:
        if uptime_s >= self._healthy_after_s:
            self._early_exits[worker] = 0
            return 0.0
        count = self._early_exits.get(worker, 0)
        self._early_exits[worker] = count + 1
        return min(self._max_delay_s, self._first_delay_s * 2 ** count)


@dataclass
class _Worker:
    index: int
    process: mp.process.BaseProcess
    ready: Connection | None  # open until the worker says it serves
    started_at: float


def _worker_main(run: RunWorker, settings: Settings, index: int, sockets: list[socket.socket],
                 ready: Connection) -> None:
    """The forked worker: default signal handling (its event loop installs its own), its index
    on every log line, then the relay."""
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    signal.set_wakeup_fd(-1)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    structlog.contextvars.bind_contextvars(worker=index)

    def serving() -> None:
        with contextlib.suppress(OSError):
            ready.send(True)
            ready.close()
    run(settings, index, sockets, serving)


class _Supervisor:
    def __init__(self, settings: Settings, sockets: list[socket.socket], run: RunWorker,
                 policy: RestartPolicy) -> None:
        self._settings, self._sockets, self._run, self._policy = settings, sockets, run, policy
        self._context = mp.get_context("fork")  # the supervisor has no loop nor threads
        self._workers: dict[int, _Worker] = {}
        self._restart_at: dict[int, float] = {}
        self._all_started = False
        self._log = structlog.get_logger("continuum.supervisor")

    def _start(self, index: int) -> None:
        ours, theirs = self._context.Pipe(duplex=False)
        process = self._context.Process(target=_worker_main, name=f"continuum-worker-{index}",
                                        args=(self._run, self._settings, index,
                                              self._sockets, theirs))
        # Blocked across the fork: until the worker has its own handlers, a signal to it must
        # not run the supervisor's (which would stop the whole relay).
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        theirs.close()
        self._workers[index] = _Worker(index, process, ours, time.monotonic())
        self._log.info("worker_started", worker=index, pid=process.pid)

    def run(self, woken: socket.socket) -> int:
        """Until a signal arrives on `woken` (0) or a worker fails at first start (its code)."""
        for index in range(self._settings.workers):
            self._start(index)
        while True:
            now = time.monotonic()
            for index, at in list(self._restart_at.items()):
                if at <= now:
                    del self._restart_at[index]
                    self._start(index)
            timeout = max(0.0, min(self._restart_at.values()) - now) if self._restart_at else None
            watched: dict[object, _Worker] = {}
            for worker in self._workers.values():
                watched[worker.process.sentinel] = worker
                if worker.ready is not None:
                    watched[worker.ready] = worker
            events = wait([woken, *watched], timeout)
            exits = any(event is watched[event].process.sentinel
                        for event in events if event is not woken)
            if woken in events or (exits and wait([woken], _STOP_SIGNAL_GRACE_S)):
                # First: on a Ctrl-C the workers got SIGINT too, and their exits are no crash.
                return 0
            for event in events:
                worker = watched[event]
                if event is worker.ready:
                    self._on_ready(worker)
                elif worker.index in self._workers:
                    failed = self._on_exit(worker)
                    if failed is not None:
                        return failed

    def _on_ready(self, worker: _Worker) -> None:
        assert worker.ready is not None
        try:
            worker.ready.recv()
        except EOFError:  # it died first: its sentinel says so
            return
        worker.ready.close()
        worker.ready = None
        if not self._all_started and all(w.ready is None for w in self._workers.values()):
            self._all_started = True
            self._log.info("workers_serving", workers=len(self._workers),
                           pids=[w.process.pid for w in self._workers.values()])

    def _on_exit(self, worker: _Worker) -> int | None:
        """Schedule the worker's restart; its exit code if the relay never got started."""
        worker.process.join()
        del self._workers[worker.index]
        if worker.ready is not None:
            worker.ready.close()
            worker.ready = None
        code = worker.process.exitcode
        if not self._all_started:
            self._log.error("worker_failed_to_start", worker=worker.index, exit_code=code)
            return code or 1
        delay = self._policy.delay_after_exit(worker.index, time.monotonic() - worker.started_at)
        self._log.warning("worker_exited", worker=worker.index, pid=worker.process.pid,
                          exit_code=code, restart_in_s=delay)
        self._restart_at[worker.index] = time.monotonic() + delay
        return None

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM to every worker, wait up to `grace_s` for all, SIGKILL the rest."""
        processes = [w.process for w in self._workers.values()]
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
        deadline = time.monotonic() + grace_s
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
        for process in processes:
            if process.is_alive():
                self._log.warning("worker_killed", pid=process.pid, after_s=grace_s)
                process.kill()
                process.join()
        self._workers.clear()
        self._log.info("workers_stopped")


def supervise(settings: Settings, run: RunWorker, policy: RestartPolicy | None = None) -> int:
    """Run `settings.workers` workers until SIGTERM/SIGINT; the exit code for the process."""
    sockets = bind_listening(settings.host, settings.port)  # OSError: the port is taken
    # One key for all: a fresh key per worker would sign expiry notices with N keys.
    shared = dataclasses.replace(settings, relay_key=load_relay_identity(settings).secret_text())
    woken, wakeup = socket.socketpair()
    woken.setblocking(False)
    wakeup.setblocking(False)
    previous = signal.set_wakeup_fd(wakeup.fileno(), warn_on_full_buffer=False)
    handlers = {sig: signal.signal(sig, lambda *_: None) for sig in _STOP_SIGNALS}
    supervisor = _Supervisor(shared, sockets, run, policy or RestartPolicy())
    try:
        return supervisor.run(woken)
    finally:
        supervisor.stop()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        signal.set_wakeup_fd(previous)
        for sock in (woken, wakeup, *sockets):
            sock.close()
