"""The relay's settings: flags over CONTINUUM_* variables over defaults, secrets masked."""

from __future__ import annotations

import subprocess
import sys

import pytest

from continuum.settings import Settings
from proto import Identity

ORACLE_KEY = Identity.generate().public.text


def test_flags_override_environment_which_overrides_defaults() -> None:
    env = {"CONTINUUM_PORT": "9000", "CONTINUUM_RATE_PER_S": "7.5", "CONTINUUM_STORE": "memory"}
    settings = Settings.from_sources(["--port", "9100"], env)
    assert settings.port == 9100
    assert settings.rate_per_s == 7.5
    assert settings.max_skew_s == Settings().max_skew_s


@pytest.mark.parametrize(("text", "expected"), [("true", True), ("false", False), ("0", False),
                                                 ("yes", True)])
def test_booleans_are_spelled_out(text: str, expected: bool) -> None:
    oracle = {"CONTINUUM_ORACLE_URL": "http://127.0.0.1:8480",
              "CONTINUUM_ORACLE_KEY": Identity.generate().public.text}
    flagged = Settings.from_sources(["--require-enrollment", text], oracle)
    assert flagged.require_enrollment is expected
    env = {**oracle, "CONTINUUM_REQUIRE_ENROLLMENT": text}
    assert Settings.from_sources([], env).require_enrollment is expected


def test_a_relay_fails_closed_without_a_valid_access_list_unless_told_to_alarm() -> None:
    assert Settings.from_sources([], {}).access_list_expired == "fail-closed"
    assert Settings.from_sources([], {"CONTINUUM_ACCESS_LIST_EXPIRED": "alarm"}
                                 ).access_list_expired == "alarm"


def test_enrollment_without_an_oracle_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        Settings.from_sources(["--require-enrollment", "true"], {})
    assert "oracle" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--port", "70000"], ["--rate-per-s", "0"],
                                  ["--frames-per-s", "0"], ["--frame-burst", "0"],
                                  ["--require-enrollment", "maybe"], ["--port", "abc"],
                                  ["--access-list-expired", "ignore"],
                                  ["--forwarded-header", "via"],
                                  ["--oracle-url", "ftp://o", "--oracle-key", ORACLE_KEY]])
def test_bad_values_exit_with_a_usage_error(argv: list[str],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        Settings.from_sources(argv, {})
    assert exited.value.code == 2
    assert "error" in capsys.readouterr().err


def test_relay_key_is_masked_when_described() -> None:
    secret = Identity.generate().secret_text()
    described = Settings.from_sources([], {"CONTINUUM_RELAY_KEY": secret}).describe()
    assert described["relay_key"] == "***"
    assert secret not in repr(described)


@pytest.mark.parametrize(("store", "shown"), [
    ("redis://:secret@host:6379/0", "redis://:***@host:6379/0"),
    ("rediss://user:p%40ss@h/0?password=x", "rediss://user:***@h/0?password=***"),
    ("sqlite:///var/lib/continuum/relay.db", "sqlite:///var/lib/continuum/relay.db"),
])
def test_a_store_password_is_masked_when_described(store: str, shown: str) -> None:
    described = Settings.from_sources(["--store", store], {}).describe()
    assert described["store"] == shown
    assert "secret" not in repr(described) and "p%40ss" not in repr(described)


@pytest.mark.parametrize("args,says", [
    (["--store", "ftp://somewhere"], "unknown store"),
    (["--store", "redis://127.0.0.1:1/0?no_such_option=1"], "store URL option not understood"),
    (["--relay-key", "csk_not-a-key"], "relay_key must be a csk_"),
    (["--oracle-url", "http://o", "--oracle-key", "cpk_typo"], "oracle_key must be a cpk_"),
    (["--oracle-url", "https://o", "--oracle-key", ORACLE_KEY, "--oracle-ca-file",
      "/nonexistent/ca.pem"], "CA file /nonexistent/ca.pem"),
    (["--region", "EU"], "region must be a region name"),
    (["--region-store", "us=redis://h:1/0"], "region_stores need region"),
    (["--region", "eu", "--store", "memory"], "store must be redis://"),
    (["--region", "eu", "--store", "redis://h:1/0", "--region-store", "us"],
     "region_stores must be REGION=URL"),
    (["--region", "eu", "--store", "redis://h:1/0", "--region-store", "us=sqlite:///x"],
     "region_stores must be REGION=URL"),
    (["--region", "eu", "--store", "redis://h:1/0", "--region-store", "eu=redis://h:2/0"],
     "not this relay's own"),
    (["--region", "eu", "--store", "redis://h:1/0", "--region-store", "us=redis://h:2/0",
      "--region-store", "us=redis://h:3/0"], "name each region once"),
    (["--region", "eu", "--store", "redis://h:1/0", "--region-store",
      "us=redis://h:2/0?no_such_option=1"], "store of region us: store URL option not understood"),
])
def test_bad_start_up_values_are_one_line_and_exit_2(args: list[str], says: str) -> None:
    result = subprocess.run([sys.executable, "-m", "continuum", "--port", "0", *args],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert says in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("continuum: error:")


def test_region_stores_come_from_flags_or_one_variable_with_passwords_masked() -> None:
    env = {"CONTINUUM_REGION": "eu", "CONTINUUM_STORE": "rediss://:local-pw@eu:6380/0",
           "CONTINUUM_REGION_STORES": "us=rediss://:us-pw@us:6380/0,ap=rediss://u:ap-pw@ap:1/0"}
    settings = Settings.from_sources([], env)
    assert settings.region_store_urls() == {"eu": "rediss://:local-pw@eu:6380/0",
                                            "us": "rediss://:us-pw@us:6380/0",
                                            "ap": "rediss://u:ap-pw@ap:1/0"}
    shown = str(settings.describe())
    assert not any(word in shown for word in ("local-pw", "us-pw", "ap-pw"))
    assert "us=rediss://:***@us:6380/0" in shown and "ap=rediss://u:***@ap:1/0" in shown
    flagged = Settings.from_sources(["--region-store", "ap=redis://other:1/0"], env)
    assert flagged.region_store_urls()["ap"] == "redis://other:1/0"
    assert "us" not in flagged.region_store_urls()  # a flag replaces the variable's list
    assert Settings.from_sources([], {}).region_store_urls() == {}
