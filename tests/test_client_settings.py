"""CLI settings: flags win over CONTINUUM_* variables, which win over defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.settings import ClientSettings
from proto import Identity
from proto.errors import InvalidFieldError

ORACLE = Identity.generate().public


def resolve(environ: dict[str, str], **flags: object) -> ClientSettings:
    options: dict[str, object] = {"home": None, "relays": None, "oracle_key": None, **flags}
    return ClientSettings.resolve(log_level="warning", environ=environ, **options)  # type: ignore[arg-type]


def test_environment_fills_what_flags_leave_out() -> None:
    settings = resolve({"CONTINUUM_HOME": "/srv/dev", "CONTINUUM_ORACLE_KEY": ORACLE.text,
                        "CONTINUUM_RELAYS": " ws://a:1/v1/connect, wss://b/v1/connect ,"})
    assert settings.home == Path("/srv/dev")
    assert settings.identity_path == Path("/srv/dev/identity.key")
    assert settings.relays == ("ws://a:1/v1/connect", "wss://b/v1/connect")
    assert settings.oracle_key == ORACLE


def test_flags_win_and_defaults_apply() -> None:
    settings = resolve({"CONTINUUM_HOME": "/srv/dev", "CONTINUUM_RELAYS": "ws://env/v1/connect"},
                       home="/tmp/x", relays=["ws://flag/v1/connect"])
    assert settings.home == Path("/tmp/x") and settings.relays == ("ws://flag/v1/connect",)
    default = resolve({})
    assert default.home == Path("~/.continuum").expanduser()
    assert default.relays == () and default.oracle_key is None


def test_bad_relay_url_and_bad_oracle_key_are_refused() -> None:
    with pytest.raises(ValueError, match="ws://"):
        resolve({}, relays=["http://relay:8470/v1/connect"])
    with pytest.raises(InvalidFieldError):
        resolve({"CONTINUUM_ORACLE_KEY": ORACLE.text[:-1]})
