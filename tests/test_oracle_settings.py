"""The oracle's settings and CLI: flags over environment, secrets masked, admin creation."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from dataclasses import replace

import pytest

from oracle import OracleSettings
from proto import Identity


def test_flags_win_over_environment_and_relays_repeat() -> None:
    environ = {"CONTINUUM_ORACLE_PORT": "9000", "CONTINUUM_ORACLE_SECURE_COOKIES": "yes",
               "CONTINUUM_ORACLE_RELAYS": "ws://a/v1/connect, ws://b/v1/connect"}
    settings, _ = OracleSettings.from_sources([], environ)
    assert settings.port == 9000 and settings.secure_cookies is True
    assert settings.relays == ("ws://a/v1/connect", "ws://b/v1/connect")
    settings, _ = OracleSettings.from_sources(
        ["--port", "9001", "--relay", "ws://c/v1/connect", "--relay", "wss://d/v1/connect"], environ)
    assert settings.port == 9001 and settings.relays == ("ws://c/v1/connect", "wss://d/v1/connect")
    with pytest.raises(SystemExit):
        OracleSettings.from_sources(["--relay", "http://not-a-websocket"], {})


def test_database_password_is_masked() -> None:
    settings = OracleSettings(database="postgresql://oracle:hunter2@db.example/oracle")
    assert settings.describe()["database"] == "postgresql://oracle:***@db.example/oracle"
    assert "hunter2" not in repr(settings.describe())
    in_query = OracleSettings(database="postgresql://oracle@db.example/oracle?password=hunter2")
    assert in_query.describe()["database"] == "postgresql://oracle@db.example/oracle?password=***"


def test_cli_creates_admin_once_and_a_0600_key(tmp_path) -> None:
    env = {**os.environ, "CONTINUUM_ORACLE_DATABASE": f"sqlite:///{tmp_path / 'o.db'}",
           "CONTINUUM_ORACLE_IDENTITY_FILE": str(tmp_path / "oracle.key")}
    run = [sys.executable, "-m", "oracle"]
    created = subprocess.run([*run, "create-admin", "ops"], env=env, capture_output=True,
                             text=True, timeout=30)
    assert created.returncode == 0 and "password for 'ops'" in created.stdout
    again = subprocess.run([*run, "create-admin", "ops"], env=env, capture_output=True,
                           text=True, timeout=30)
    assert again.returncode != 0 and "already exists" in again.stderr
    key = subprocess.run([*run, "show-key"], env=env, capture_output=True, text=True, timeout=30)
    assert key.stdout.startswith("cpk_")
    assert stat.S_IMODE((tmp_path / "oracle.key").stat().st_mode) == 0o600


def test_cli_refuses_an_admin_named_like_another_kind_of_actor(tmp_path) -> None:
    """`cli:USER` is how the audit log names the CLI's own changes (test_oracle_fleet_api:
    the API refuses such names too)."""
    env = {**os.environ, "CONTINUUM_ORACLE_DATABASE": f"sqlite:///{tmp_path / 'o.db'}",
           "CONTINUUM_ORACLE_IDENTITY_FILE": str(tmp_path / "oracle.key")}
    for username in ("cli:root", "oracle"):
        made = subprocess.run([sys.executable, "-m", "oracle", "create-admin", username],
                              env=env, capture_output=True, text=True, timeout=30)
        assert made.returncode != 0 and "password" not in made.stdout, made.stdout
        assert "username must" in made.stderr and "cli:" in made.stderr, made.stderr


def test_relay_keys_repeat_and_a_bad_key_is_one_clear_error(capsys) -> None:
    first, second = (Identity.generate().public.text for _ in range(2))
    settings, _ = OracleSettings.from_sources(["--relay-key", first, "--relay-key", second], {})
    assert settings.relay_keys == (first, second)
    settings, _ = OracleSettings.from_sources([], {"CONTINUUM_ORACLE_RELAY_KEYS": f"{first},{second}"})
    assert settings.relay_keys == (first, second)
    with pytest.raises(SystemExit) as exited:
        OracleSettings.from_sources(["--relay-key", first[:-1] + "x"], {})
    assert exited.value.code == 2
    assert "relay_keys must be public keys" in capsys.readouterr().err


@pytest.mark.parametrize("field, value", [("request_timeout_s", 0.0), ("max_connections", 0),
                                          ("max_connections_per_address", 0)])
def test_connection_bounds_must_be_positive(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        replace(OracleSettings(), **{field: value}).validate()
    settings, _ = OracleSettings.from_sources(
        ["--request-timeout-s", "2.5", "--max-connections", "64"], {})
    assert settings.request_timeout_s == 2.5 and settings.max_connections == 64


def test_the_share_of_sockets_per_address_is_a_flag_a_variable_and_printed(capsys) -> None:
    assert OracleSettings().max_connections_per_address == 512 // 8
    settings, _ = OracleSettings.from_sources(["--max-connections-per-address", "16"], {})
    assert settings.max_connections_per_address == 16
    assert settings.describe()["max_connections_per_address"] == 16
    settings, _ = OracleSettings.from_sources(
        [], {"CONTINUUM_ORACLE_MAX_CONNECTIONS_PER_ADDRESS": "32"})
    assert settings.max_connections_per_address == 32
    with pytest.raises(SystemExit) as exited:
        OracleSettings.from_sources(["--max-connections-per-address", "0"], {})
    assert exited.value.code == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert "max_connections_per_address must be >= 1" in errors[-1]


@pytest.mark.parametrize("overrides", [{"access_list_validity_s": 0.5},
                                       {"access_list_validity_s": 8 * 24 * 3600.0},
                                       {"tls_cert": "oracle.crt"}])
def test_list_validity_is_bounded_and_tls_files_go_together(overrides: dict) -> None:
    with pytest.raises(ValueError, match="access_list_validity_s|tls_cert"):
        replace(OracleSettings(), **overrides).validate()
    assert OracleSettings().access_list_validity_s == 600.0


def test_the_forwarded_header_is_one_a_proxy_writes() -> None:
    with pytest.raises(ValueError, match="forwarded_header"):
        replace(OracleSettings(), forwarded_header="via").validate()
    settings, _ = OracleSettings.from_sources(
        ["--trusted-proxy", "10.0.0.0/8", "--forwarded-header", "forwarded"], {})
    assert settings.proxy_trust.header == "forwarded"
    assert OracleSettings().proxy_trust.header == "x-forwarded-for"
