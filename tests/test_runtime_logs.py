"""The one log set-up: JSON lines at the chosen level, on the stream the process chose."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
import structlog

from runtime.logs import EventSampler, configure_logging


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Other tests log through the set-up conftest made; put it back afterwards."""
    config = structlog.get_config()
    yield
    structlog.configure(**config)
    structlog.contextvars.clear_contextvars()


def test_lines_are_json_at_the_level_and_above_on_the_given_stream() -> None:
    stream = io.StringIO()
    configure_logging("info", stream)
    log = structlog.get_logger("test")
    log.debug("hidden")
    structlog.contextvars.bind_contextvars(peer="cpk_x")
    log.info("shown", count=2)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == 1
    assert lines[0]["event"] == "shown" and lines[0]["level"] == "info"
    assert lines[0]["count"] == 2 and lines[0]["peer"] == "cpk_x" and "timestamp" in lines[0]


def test_without_a_stream_lines_go_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("warning")
    structlog.get_logger("test").warning("to_stdout")
    captured = capsys.readouterr()
    assert json.loads(captured.out)["event"] == "to_stdout" and captured.err == ""


def test_a_sampler_lets_through_a_few_lines_a_second_per_key_and_counts_the_rest() -> None:
    """Before: every refused handshake wrote its line, so a flood bought an unbounded log."""
    stream, now = io.StringIO(), [100.2]
    configure_logging("info", stream, sampler=EventSampler({"refused": ("reason",)}, per_s=3,
                                                           clock=lambda: now[0]))
    log = structlog.get_logger("test")
    for _ in range(10):
        log.info("refused", reason="garbage")
    log.info("refused", reason="timeout")  # another reason has its own budget
    log.info("unsampled")  # events not named pass untouched
    now[0] = 101.0
    log.info("refused", reason="garbage")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(line["event"], line.get("reason")) for line in lines] == [
        *[("refused", "garbage")] * 3, ("refused", "timeout"), ("unsampled", None),
        ("refused", "garbage")]
    assert [line.get("suppressed") for line in lines] == [None] * 5 + [7]


def test_processes_sharing_one_stdout_never_split_each_others_lines(tmp_path) -> None:
    """Before: print() wrote each line's newline apart, so with unbuffered output two
    processes (the workers of `continuum --workers`) interleaved into broken lines."""
    script = ("from runtime.logs import configure_logging; import structlog\n"
              "configure_logging('info'); log = structlog.get_logger('w')\n"
              "for i in range(3000): log.info('device_connected', device='x' * 60, i=i)\n")
    path = tmp_path / "shared.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(path, "ab") as shared:
        writers = [subprocess.Popen([sys.executable, "-c", script], stdout=shared, env=env)
                   for _ in range(2)]
        assert [writer.wait(60) for writer in writers] == [0, 0]
    lines = path.read_text().splitlines()
    assert len(lines) == 6000
    assert all(json.loads(line)["event"] == "device_connected" for line in lines)
