"""structlog set-up shared by every process: one JSON object per line, machine-readable in production.

The services log to stdout (where a container runtime collects it); the
device CLI passes stderr, so its stdout stays clean for results a script reads.
"""

from __future__ import annotations

import logging
from typing import TextIO

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
