"""The shared settings loader and the one masking function both services print their settings with."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest

from runtime.settings import describe, load_settings, mask_url, parse_bool, repeatable


@dataclass(frozen=True)
class Example:
    name: str = "x"
    count: int = 3
    ratio: float = 0.5
    enabled: bool = False
    urls: tuple[str, ...] = repeatable("url", "an upstream URL")
    token: str = ""

    def validate(self) -> None:
        if self.count < 0:
            raise ValueError("count must be >= 0")


def load(argv: list[str], environ: dict[str, str],
         parser: argparse.ArgumentParser | None = None) -> tuple[Example, argparse.Namespace]:
    return load_settings(Example, "EX_", parser or argparse.ArgumentParser(prog="example"),
                         argv, environ)


def test_flags_win_over_environment_which_wins_over_defaults() -> None:
    settings, _ = load(["--count", "9"], {"EX_COUNT": "7", "EX_RATIO": "2.5", "EX_ENABLED": "yes"})
    assert settings == Example(count=9, ratio=2.5, enabled=True)
    assert load([], {})[0] == Example()


def test_a_repeatable_field_takes_flags_or_one_comma_separated_variable() -> None:
    environ = {"EX_URLS": " ws://a , ,ws://b,"}
    assert load([], environ)[0].urls == ("ws://a", "ws://b")
    flagged, _ = load(["--url", "ws://c", "--url", "ws://d"], environ)
    assert flagged.urls == ("ws://c", "ws://d")


def test_positional_arguments_of_the_callers_parser_come_back_in_the_namespace() -> None:
    parser = argparse.ArgumentParser(prog="example")
    parser.add_argument("username")
    settings, args = load(["ops", "--name", "y"], {}, parser)
    assert settings.name == "y" and args.username == "ops"


@pytest.mark.parametrize(("argv", "environ", "says"), [
    ([], {"EX_COUNT": "many"}, "EX_COUNT='many' is not a valid int"),
    ([], {"EX_ENABLED": "maybe"}, "EX_ENABLED='maybe' is not a valid bool"),
    (["--ratio", "half"], {}, "invalid float value: 'half'"),
    (["--enabled", "perhaps"], {}, "--enabled"),
    (["--count", "-1"], {}, "count must be >= 0"),
    ([], {"EX_COUNT": "-1"}, "count must be >= 0"),
])
def test_a_bad_value_is_one_error_line_and_exit_2(argv: list[str], environ: dict[str, str], says: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        load(argv, environ)
    assert exited.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("example: error: ") and says in errors[0]


def test_help_names_each_variable_and_default(capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # no line wrapped inside a help text
    with pytest.raises(SystemExit):
        load(["--help"], {})
    text = " ".join(capsys.readouterr().out.split())
    assert "--count COUNT (env EX_COUNT; default 3)" in text
    assert "--enabled ENABLED (env EX_ENABLED; default False)" in text
    assert "--url URLS an upstream URL, repeatable (env EX_URLS, comma-separated)" in text


@pytest.mark.parametrize(("text", "expected"), [
    ("1", True), ("true", True), (" YES ", True), ("on", True),
    ("0", False), ("false", False), ("No", False), ("off", False), ("", False)])
def test_booleans_are_spelled_out(text: str, expected: bool) -> None:
    assert parse_bool(text) is expected


def test_anything_else_is_not_a_boolean() -> None:
    with pytest.raises(ValueError):
        parse_bool("maybe")


@pytest.mark.parametrize(("url", "shown"), [
    # user:password@host, with and without a port, scheme spelled as given
    ("postgresql://oracle:hunter2@db.example/oracle", "postgresql://oracle:***@db.example/oracle"),
    ("postgresql://u:hunter2@db:5432/o?sslmode=require", "postgresql://u:***@db:5432/o?sslmode=require"),
    ("PostgreSQL://u:hunter2@db/o", "PostgreSQL://u:***@db/o"),
    # an empty user name (Redis' AUTH with a password only)
    ("redis://:secret@host:6379/0", "redis://:***@host:6379/0"),
    ("redis://:secret@[::1]:6379/0", "redis://:***@[::1]:6379/0"),
    # passwords with '@' and ':', escaped or not: the host starts after the last '@'
    ("rediss://user:p%40ss@h/0", "rediss://user:***@h/0"),
    ("postgresql://u:p@ss@host/db", "postgresql://u:***@host/db"),
    ("postgresql://u:p@s:s@@host/db", "postgresql://u:***@host/db"),
    ("postgresql://u:pa:ss@h:5432/db#x", "postgresql://u:***@h:5432/db#x"),
    # secret query parameters (libpq, redis-py), alone or with a password in the URL too
    ("rediss://user:p%40ss@h/0?password=x", "rediss://user:***@h/0?password=***"),
    ("postgresql:///db?host=/tmp&password=s3&port=5432", "postgresql:///db?host=/tmp&password=***&port=5432"),
    ("postgresql://u@h/db?sslpassword=k&sslmode=require", "postgresql://u@h/db?sslpassword=***&sslmode=require"),
    ("redis://h/0?PASSWORD=x", "redis://h/0?PASSWORD=***"),
    ("http://h/v1?access_token=abc&x=1", "http://h/v1?access_token=***&x=1"),
    ("redis://h/0?pass%77ord=x", "redis://h/0?pass%77ord=***"),
    # an unescaped '/', '?' or '#' in a password: the URL does not parse as meant, so all is masked
    ("postgresql://u:pa/ss@host/db", "postgresql://***"),
    ("postgresql://u:12/34@host/db", "postgresql://***"),
    ("postgresql://u:pa?ss@host/db", "postgresql://***"),
    ("postgresql://u:pa#ss@host/db", "postgresql://***"),
    ("postgresql://u:p@s/s@host/db", "postgresql://***"),
    ("redis://[::1/0", "redis://***"),
])
def test_passwords_in_urls_are_masked(url: str, shown: str) -> None:
    assert mask_url(url) == shown


@pytest.mark.parametrize("text", [
    "memory", "", "127.0.0.1", "csk_abc", "sqlite:///oracle.db", "sqlite:////var/lib/o.db",
    "redis://localhost:6379/0", "redis://user@host/0", "postgresql://oracle@db/oracle",
    "ws://127.0.0.1:8470/v1/connect", "http://h/v1?password=", "https://h:8480/a?b=c&d#e"])
def test_text_without_a_password_is_shown_unchanged(text: str) -> None:
    assert mask_url(text) == text


def test_describe_masks_secret_fields_and_every_url() -> None:
    settings = Example(name="redis://:secret@h/0", urls=("wss://u:pw@relay/v1/connect", "ws://r"),
                       token="tok_abc")
    shown = describe(settings, secrets={"token"})
    assert shown == {"name": "redis://:***@h/0", "count": 3, "ratio": 0.5, "enabled": False,
                     "urls": ["wss://u:***@relay/v1/connect", "ws://r"], "token": "***"}
    assert "secret" not in repr(shown) and "pw" not in repr(shown) and "tok_abc" not in repr(shown)


def test_describe_shows_an_unset_secret_as_unset() -> None:
    assert describe(Example(), secrets={"token"})["token"] == ""
