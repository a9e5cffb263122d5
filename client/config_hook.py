"""`listen --config-hook CMD`: hand each new configuration to a command of the user's.

The command runs through the shell with the merged document on stdin (JSON)
and `CONTINUUM_CONFIG_EPOCH`, `CONTINUUM_CONFIG_VERSION` and
`CONTINUUM_CONFIG_FILE` (the home's `config.json`, which holds the new
document once the hook succeeded) in its environment.  Exit 0 means applied;
its stdout, if not blank, is the state to report and must be a JSON object.
Anything else (another exit status, a bad report, no end within the time
allowed) means not applied: the device keeps the configuration it had and
reports that one, so the oracle shows it behind (SPEC §21).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

from proto.config import JsonObject, document_text, parse_document
from proto.errors import ProtocolError

from .config import ConfigUpdate

DEFAULT_HOOK_TIMEOUT_S = 60.0
# More than any report may be (proto.config.MAX_CONFIG_BYTES): the rest is not read.
_MAX_OUTPUT_BYTES = 64 * 1024


class HookFailed(Exception):
    """The hook did not apply the configuration; the message says why, for the log."""


class ConfigHook:
    """An `on_config` handler that runs `command` for each newer configuration."""

    def __init__(self, command: str, config_file: Path,
                 timeout_s: float = DEFAULT_HOOK_TIMEOUT_S) -> None:
        self._command = command
        self._config_file = config_file
        self._timeout_s = timeout_s

    async def __call__(self, update: ConfigUpdate) -> JsonObject:
        env = {**os.environ, "CONTINUUM_CONFIG_EPOCH": str(update.epoch),
               "CONTINUUM_CONFIG_VERSION": str(update.version),
               "CONTINUUM_CONFIG_FILE": str(self._config_file)}
        process = await asyncio.create_subprocess_shell(
            self._command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            env=env)
        try:
            async with asyncio.timeout(self._timeout_s):
                output = await _exchange(process, document_text(update.document).encode())
        except TimeoutError:
            raise HookFailed(f"the config hook did not finish within {self._timeout_s:g}s"
                             ) from None
        finally:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        if process.returncode != 0:
            raise HookFailed(f"the config hook exited with status {process.returncode}")
        return _report(output)


async def _exchange(process: asyncio.subprocess.Process, document: bytes) -> bytes:
    """Write the document, read at most `_MAX_OUTPUT_BYTES` of output, wait for the end."""
    assert process.stdin is not None and process.stdout is not None
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # it need not read it
        process.stdin.write(document)
        await process.stdin.drain()
        process.stdin.close()
    output = b""
    while chunk := await process.stdout.read(65536):
        output += chunk
        if len(output) > _MAX_OUTPUT_BYTES:
            raise HookFailed(f"the config hook wrote more than {_MAX_OUTPUT_BYTES} bytes")
    await process.wait()
    return output


def _report(output: bytes) -> JsonObject:
    text = output.decode("utf-8", "replace").strip()
    if not text:
        return {}
    try:
        return parse_document(text, "the config hook's output")
    except ProtocolError as exc:
        raise HookFailed(exc.message) from None

