"""`continuum-client call` and `listen --handle`: calls between peers from a shell (SPEC §18).

    continuum-client call KEY METHOD [JSON|@FILE|-] [--timeout S]
        print the response body; the exit code says the status (`cli.EXIT_CODES`)
    continuum-client listen --handle METHOD=COMMAND [--handle-timeout S] …
        answer calls of METHOD by running COMMAND

A handler command is split like a shell would split it (`shlex`) but run
without a shell (write `sh -c '…'` for one): the call's body on its stdin,
CONTINUUM_CALLER and CONTINUUM_METHOD in its environment, its stderr on
listen's.  Its stdout is the response body; exit status 0 answers OK, any
other ERROR.  It is killed (with its process group) at the call's deadline
or after `--handle-timeout` (TIMEOUT), or once its stdout passes
`MAX_HANDLER_OUTPUT` bytes (ERROR): nothing it does can hold listen up or
make it buffer without bound.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shlex
import signal
import sys

from proto import PublicKey
from proto.calls import CallStatus, check_method
from proto.errors import CallTimeoutError, ProtocolError

from .calls import CallHandler, CallResult, IncomingCall
from .cli import (EXIT_NO_RELAY, EXIT_REFUSED, CliError, _message, _read_message, _Session,
                  _say)
from .settings import ClientSettings

EXIT_CALL_TIMEOUT = 5
# A response with status S (not OK) exits 10 + S (listed in cli.EXIT_CODES).
EXIT_STATUS_BASE = 10
# Fits a response in the default 64 KiB envelope, with room for the envelope around it.
MAX_HANDLER_OUTPUT = 60 * 1024
DEFAULT_HANDLE_TIMEOUT_S = 30.0
_READ_CHUNK = 16 * 1024


def add_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    call = commands.add_parser("call", help="call a method on a peer and print its answer")
    call.add_argument("peer", metavar="KEY", help="the peer to call")
    call.add_argument("method", metavar="METHOD", help="1..64 of A-Z a-z 0-9 . _ / -")
    call.add_argument("body", metavar="JSON|@FILE|-", nargs="?", default="",
                      help="the body: text (JSON, say), @path of a file, or - for stdin;"
                      " empty if left out")
    call.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                      help="the call's deadline: it waits in an offline peer's mailbox this"
                      " long, then exit 5")


def add_listen_options(listen: argparse.ArgumentParser) -> None:
    listen.add_argument("--handle", action="append", default=[], metavar="METHOD=COMMAND",
                        help="answer calls of METHOD by running COMMAND (no shell): the body"
                        " on its stdin, its stdout the answer, exit 0 OK, else ERROR; repeat"
                        " for more methods")
    listen.add_argument("--handle-timeout", type=float, default=DEFAULT_HANDLE_TIMEOUT_S,
                        metavar="SECONDS", help="kill a handler command after this long"
                        " (answered TIMEOUT; the call's deadline bounds it too)")


def parse_handles(specs: list[str], limit_s: float) -> dict[str, CallHandler]:
    """`METHOD=COMMAND` specs → handlers; CliError (usage) for a bad one."""
    if limit_s <= 0:
        raise CliError("--handle-timeout must be positive")
    handlers: dict[str, CallHandler] = {}
    for spec in specs:
        method, separator, command = spec.partition("=")
        try:
            check_method(method)
            argv = shlex.split(command)
        except (ProtocolError, ValueError) as exc:
            raise CliError(f"--handle {spec!r}: {getattr(exc, 'message', exc)}") from None
        if not separator or not argv:
            raise CliError(f"--handle {spec!r}: expected METHOD=COMMAND")
        handlers[method] = command_handler(argv, limit_s)
    return handlers


def command_handler(argv: list[str], limit_s: float,
                    max_output: int = MAX_HANDLER_OUTPUT) -> CallHandler:
    """A handler that runs `argv` for each call; see the module docstring."""
    async def run(call: IncomingCall) -> CallResult:
        env = {**os.environ, "CONTINUUM_CALLER": call.caller.text,
               "CONTINUUM_METHOD": call.method}
        try:
            process = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                env=env, start_new_session=True)
        except OSError as exc:
            _say(f"cannot run the handler of {call.method}: {exc.strerror or exc}")
            return CallResult(CallStatus.ERROR, b"the handler could not be started")
        try:
            async with asyncio.timeout(limit_s):
                output = await _bounded_output(process, call.body, max_output)
                if output is not None:
                    await process.wait()
        except TimeoutError:
            return CallResult(CallStatus.TIMEOUT, b"the handler did not finish in time")
        finally:
            await _reap(process)
        if output is None:
            return CallResult(CallStatus.ERROR, f"the handler's output passed {max_output}"
                              " bytes".encode())
        return CallResult(CallStatus.OK if process.returncode == 0 else CallStatus.ERROR, output)
    return run


async def _bounded_output(process: asyncio.subprocess.Process, body: bytes,
                          max_output: int) -> bytes | None:
    """Feed `body` to stdin while reading stdout; None once stdout passes `max_output`."""
    assert process.stdin is not None and process.stdout is not None
    writer = asyncio.create_task(_feed(process.stdin, body))
    chunks: list[bytes] = []
    size = 0
    try:
        while chunk := await process.stdout.read(_READ_CHUNK):
            size += len(chunk)
            if size > max_output:
                return None
            chunks.append(chunk)
    finally:
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer
    return b"".join(chunks)


async def _feed(stdin: asyncio.StreamWriter, body: bytes) -> None:
    with contextlib.suppress(ConnectionError):  # a command that does not read its stdin
        stdin.write(body)
        await stdin.drain()
        stdin.close()


async def _reap(process: asyncio.subprocess.Process) -> None:
    """Kill the command's process group unless it ended, and wait for it: no zombie, no
    grandchild left running (`sh -c 'sleep 100'`)."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()


async def run_call(args: argparse.Namespace, settings: ClientSettings) -> int:
    peer = PublicKey.from_text(args.peer)
    check_method(args.method)
    body = _read_message(args.body) if args.body else b""
    if args.timeout <= 0:
        raise CliError("--timeout must be positive")
    session = _Session(settings)
    async with session.device as device:
        try:
            result = await session.until_fatal(
                device.call(peer, args.method, body, timeout=args.timeout))
        except CallTimeoutError:
            if device.stats.connects == 0:
                raise CliError(f"no relay connected within {args.timeout:g}s (last error:"
                               f" {device.last_error or 'none'})", EXIT_NO_RELAY) from None
            raise CliError(f"no response from {peer.text} within {args.timeout:g}s",
                           EXIT_CALL_TIMEOUT) from None
        except ProtocolError as exc:
            raise CliError(f"refused: {_message(exc)}", EXIT_REFUSED) from None
    if not result.ok:
        detail = result.body.decode("utf-8", errors="replace")
        _say(f"{result.status.name}: {detail}")
        return EXIT_STATUS_BASE + int(result.status)
    sys.stdout.buffer.write(result.body)
    if result.body and not result.body.endswith(b"\n"):
        sys.stdout.buffer.write(b"\n")
    sys.stdout.flush()
    return 0
