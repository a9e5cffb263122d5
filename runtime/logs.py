"""structlog set-up shared by every process: one JSON object per line, machine-readable in production.

The services log to stdout (where a container runtime collects it); the
device CLI passes stderr, so its stdout stays clean for results a script reads.
Code that is also a library (the device library) logs through
`library_logger`, which writes nothing until the application configures
structlog (or stdlib logging): an unconfigured structlog would print to stdout.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, WrappedLogger

# Distinct keys one sampler tracks at most: the sampled fields name reasons (a closed
# set), so this is never reached in practice; it bounds the memory if a caller errs.
_MAX_SAMPLED_KEYS = 1024


class EventSampler:
    """A structlog processor: at most `per_s` lines a second of each sampled event and key.

    Some lines are written once per thing an attacker can do cheaply and without
    end: a relay logs every refused handshake, and a flood of fresh keys buys
    hundreds of refusals a second, i.e. an unbounded stream of log bytes (about
    140 KB/s) that the operator pays to ship and store.  The counts stay exact in
    the metrics; the log keeps a sample.  `sampled` maps an event name to the
    fields whose values make its key (a refusal's reason, say), so a rare reason
    is never drowned by a common one.  The first line let through after some
    were dropped says how many with `suppressed`.
    """

    def __init__(self, sampled: Mapping[str, tuple[str, ...]], per_s: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._sampled = dict(sampled)
        self._per_s = per_s
        self._clock = clock
        # key -> [second the count is for, lines let through in it, lines dropped since last]
        self._windows: dict[tuple[object, ...], list[int]] = {}

    def __call__(self, logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
        event = event_dict.get("event")
        fields = self._sampled.get(event) if isinstance(event, str) else None
        if fields is None:
            return event_dict
        key = (event, *(str(event_dict.get(field)) for field in fields))
        second = int(self._clock())
        window = self._windows.get(key)
        if window is None:
            if len(self._windows) >= _MAX_SAMPLED_KEYS:
                self._windows.clear()
            window = self._windows[key] = [second, 0, 0]
        if window[0] != second:
            window[0], window[1] = second, 0
        if window[1] >= self._per_s:
            window[2] += 1
            raise structlog.DropEvent
        window[1] += 1
        if window[2]:
            event_dict["suppressed"], window[2] = window[2], 0
        return event_dict


def configure_logging(level: str, stream: TextIO | None = None,
                      sampler: EventSampler | None = None) -> None:
    """Log `level` and above as JSON lines to `stream` (None: sys.stdout as a logger is made).

    Values bound with structlog.contextvars are merged into every line, so a
    task can bind its context once instead of passing it to each call.  A
    `sampler` thins the events a cheap, endless attack can produce.
    """
    structlog.configure(
        processors=[
            *([sampler] if sampler is not None else []),
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]),
        # One write() per line, newline included: print() writes the newline apart, and
        # with unbuffered output (PYTHONUNBUFFERED, as in containers) the lines of processes
        # sharing one stdout (`continuum --workers`) then interleave into broken JSON.
        logger_factory=structlog.WriteLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )


class _LibraryLogger:
    """structlog's logger once structlog is configured, else stdlib `logging` (NullHandler)."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._stdlib = logging.getLogger(name)
        self._stdlib.addHandler(logging.NullHandler())

    def __getattr__(self, level: str) -> Any:
        if structlog.is_configured():
            return getattr(structlog.get_logger(self._name), level)
        levelno = logging.getLevelNamesMapping().get(level.upper(), logging.ERROR)

        def emit(event: str, **fields: object) -> None:
            self._stdlib.log(levelno, "%s %s", event, fields, exc_info=level == "exception")
        return emit


def library_logger(name: str) -> Any:
    """A logger for library code: silent unless the application set up logging."""
    return _LibraryLogger(name)
