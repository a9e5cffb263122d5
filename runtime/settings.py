"""Service settings: flags over environment variables over defaults, and their start-up rendering.

The relay and the oracle each declare one frozen dataclass; `load_settings`
turns its fields into `--field-name` options over `PREFIX_FIELD_NAME`
variables, so both services parse, spell and refuse values alike, and
`describe` renders them for the start-up log with secrets masked by one
function (`mask_url`), so a password in a DSN never reaches a log line.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Collection, Mapping, Sequence
from typing import Any, ClassVar, Protocol, TypeVar
from urllib.parse import unquote, urlsplit

MASK = "***"

# Query parameters that carry a secret (libpq's password/sslpassword, redis-py's password, tokens).
_SECRET_PARAMETERS = ("pass", "secret", "token")

# Field metadata of a `repeatable` field: its flag and what one value is.
_FLAG = "runtime.settings.flag"
_WHAT = "runtime.settings.what"


class SettingsClass(Protocol):
    """What `load_settings` needs: a dataclass whose defaults all construct, and a `validate`."""

    __dataclass_fields__: ClassVar[dict[str, Any]]

    def validate(self) -> None:
        """Raise ValueError naming every value that is out of range."""


S = TypeVar("S", bound=SettingsClass)


def repeatable(flag: str, what: str) -> Any:
    """A tuple[str, ...] field given as a repeatable `--flag` or one comma-separated variable."""
    return dataclasses.field(default_factory=tuple, metadata={_FLAG: flag, _WHAT: what})


def load_settings(cls: type[S], prefix: str, parser: argparse.ArgumentParser,
                  argv: Sequence[str] | None, environ: Mapping[str, str],
                  ) -> tuple[S, argparse.Namespace]:
    """`cls` from flags over `prefix` + FIELD variables over its defaults; exit 2 on a bad value.

    A field parses as the type of its default (booleans with `parse_bool`);
    a tuple field must be declared with `repeatable`, which names its flag.
    Bad values (a variable or flag that does not parse, or what `validate`
    refuses) end in one `parser.error` line.  Returns the settings and the
    namespace, which also holds any positional arguments the caller added.
    """
    defaults = cls()
    values: dict[str, Any] = {}
    for f in dataclasses.fields(defaults):
        default = getattr(defaults, f.name)
        env_name = prefix + f.name.upper()
        if isinstance(default, tuple):
            values[f.name] = tuple(v.strip() for v in environ.get(env_name, "").split(",")
                                   if v.strip())
            parser.add_argument("--" + f.metadata[_FLAG], action="append", dest=f.name,
                                default=argparse.SUPPRESS,
                                help=f"{f.metadata[_WHAT]}, repeatable"
                                     f" (env {env_name}, comma-separated)")
            continue
        parse = parse_bool if type(default) is bool else type(default)
        if env_name in environ:
            try:
                values[f.name] = parse(environ[env_name])
            except ValueError:
                parser.error(f"{env_name}={environ[env_name]!r} is not a valid {type(default).__name__}")
        parser.add_argument("--" + f.name.replace("_", "-"), type=parse, dest=f.name,
                            default=argparse.SUPPRESS, help=f"(env {env_name}; default {default!r})")
    args = parser.parse_args(argv)
    names = {f.name for f in dataclasses.fields(defaults)}
    values.update((name, tuple(value) if isinstance(value, list) else value)
                  for name, value in vars(args).items() if name in names)
    settings = dataclasses.replace(defaults, **values)
    try:
        settings.validate()
    except ValueError as exc:
        parser.error(str(exc))
    return settings, args


def describe(settings: SettingsClass, secrets: Collection[str] = ()) -> dict[str, object]:
    """Every field for the start-up log: `secrets` shown as *** when set, URL passwords masked.

    Every text value goes through `mask_url`, so a field that may hold a URL
    (a store, a database, a relay) cannot leak a password by being forgotten here.
    """
    shown: dict[str, object] = {}
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if f.name in secrets:
            shown[f.name] = MASK if value else value
        elif isinstance(value, str):
            shown[f.name] = mask_url(value)
        elif isinstance(value, tuple):
            shown[f.name] = [mask_url(v) if isinstance(v, str) else v for v in value]
        else:
            shown[f.name] = value
    return shown


def mask_url(text: str) -> str:
    """`text` with the password of a scheme://user:password@host URL and secret query values as ***.

    Text that is not a URL comes back unchanged, and so does the rest of a URL,
    character for character.  A URL that does not parse cleanly (a password
    with an unescaped '/', '?' or '#' leaves "user:pa" as host and port or an
    '@' after the host) comes back as scheme://***: better nothing than a secret.
    """
    scheme, separator, rest = text.partition("://")
    if not separator:
        return text
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError when what follows ':' is not a port
    except ValueError:
        return f"{scheme}://{MASK}"
    if not parts.scheme or not rest.startswith(parts.netloc) or "@" in rest[len(parts.netloc):]:
        return f"{scheme}://{MASK}"
    userinfo, at, host = parts.netloc.rpartition("@")  # the host starts after the last '@'
    user, colon, password = userinfo.partition(":")
    netloc = f"{user}:{MASK}@{host}" if at and colon and password else parts.netloc
    path, question, query_and_fragment = rest[len(parts.netloc):].partition("?")
    query, hash_sign, fragment = query_and_fragment.partition("#")
    query = "&".join(_mask_parameter(pair) for pair in query.split("&"))
    return f"{scheme}://{netloc}{path}{question}{query}{hash_sign}{fragment}"


def _mask_parameter(pair: str) -> str:
    name, equals, value = pair.partition("=")
    if equals and value and any(word in unquote(name).lower() for word in _SECRET_PARAMETERS):
        return f"{name}={MASK}"
    return pair


def parse_bool(text: str) -> bool:
    """bool("false") is True, so flags and variables spell booleans explicitly."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{text!r} is not a boolean")
