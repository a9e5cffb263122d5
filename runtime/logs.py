"""structlog set-up shared by every process: one JSON object per line, machine-readable in production.

The services log to stdout (where a container runtime collects it); the
device CLI passes stderr, so its stdout stays clean for results a script reads.
Code that is also a library (the device library) logs through
`library_logger`, which writes nothing until the application configures
structlog (or stdlib logging): an unconfigured structlog would print to stdout.
"""

from __future__ import annotations

import logging
from typing import Any, TextIO

import structlog


def configure_logging(level: str, stream: TextIO | None = None) -> None:
    """Log `level` and above as JSON lines to `stream` (None: sys.stdout as a logger is made).

    Values bound with structlog.contextvars are merged into every line, so a
    task can bind its context once instead of passing it to each call.
    """
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(stream),
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
