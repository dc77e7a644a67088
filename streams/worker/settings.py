"""The configuration file: one TOML file, checked against ``schemas/config.schema.json``.

What it holds: the store, worker settings, the webhook route, per-detector parameter overrides
and the model inventory (the contracts in schemas/). Every key is optional and running with no file
works: the defaults are the shipped ones.

Where values come from, strongest first: a command-line flag, an ``INFERWATCH_*`` environment
variable, the file (``--config`` or ``INFERWATCH_CONFIG``), the shipped default. The variables:
``INFERWATCH_STORE`` (store.dsn), ``INFERWATCH_WEBHOOK_URL`` and ``INFERWATCH_WEBHOOK_CA_FILE``
(routes.webhook), ``INFERWATCH_WORKER_<KEY>`` for each key of ``[worker]``
(``INFERWATCH_WORKER_BATCH_SIZE=5000``). A variable is checked like the file's value, and an
error names it.

Secrets (``streams/store/credentials.py``): the store's password (``INFERWATCH_STORE_PASSWORD``),
the
webhook URL, which carries its token (``INFERWATCH_WEBHOOK_URL``) and the HMAC key
(``INFERWATCH_HMAC_KEY``) may each come from the variable or from the file its ``_FILE`` variant
names, not both; in the file, ``store.password_file`` and ``routes.webhook.url_file`` name such
files. Secrets are never printed: every value shown is redacted.

Why a JSON Schema for a TOML file: one machine-readable statement of what is allowed, which
editors and ``inferwatch config check`` use alike, and errors that name the exact key. What a
schema cannot say (a detector's parameter names and types, which depend on the registry) is
checked by building the detectors.

>>> cfg = load(None, {"INFERWATCH_WORKER_BATCH_SIZE": "500"})
>>> cfg.worker_settings().batch_max, cfg.store_dsn
(500, 'chdb:./inferwatch-data')
"""

from __future__ import annotations

import difflib
import inspect
import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from streams.store.credentials import SecretError, mask, read_secret_file, redact, secret_from_env

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "schemas" / "config.schema.json"
CONFIG_ENV = "INFERWATCH_CONFIG"
DEFAULT_STORE = "chdb:./inferwatch-data"
# [worker] keys that are named differently in WorkerSettings
_SETTING_NAMES = {"batch_size": "batch_max"}
_ENV = {
    "INFERWATCH_STORE": ("store", "dsn"),
    "INFERWATCH_WEBHOOK_CA_FILE": ("routes", "webhook", "ca_file"),
}
# secrets: the variable, or the file its _FILE variant names
_SECRET_ENV = {"INFERWATCH_WEBHOOK_URL": ("routes", "webhook", "url")}
STORE_PASSWORD_ENV = "INFERWATCH_STORE_PASSWORD"
HMAC_KEY_ENV = "INFERWATCH_HMAC_KEY"


class ConfigError(ValueError):
    """The configuration is wrong; the message names the file or variable and the key."""


@cache
def schema() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(SCHEMA_PATH.read_text())
    return data


@dataclass(frozen=True)
class Config:
    """A checked configuration; ``overrides`` names the variables that set keys."""

    data: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    overrides: dict[str, str] = field(default_factory=dict)  # key path -> variable
    store_password: str | None = field(default=None, repr=False)

    @property
    def store_dsn(self) -> str:
        dsn: str = self.data.get("store", {}).get("dsn", DEFAULT_STORE)
        return dsn

    @property
    def webhook(self) -> dict[str, Any] | None:
        hook: dict[str, Any] | None = self.data.get("routes", {}).get("webhook")
        return hook

    @property
    def detectors(self) -> dict[str, dict[str, Any]]:
        params: dict[str, dict[str, Any]] = self.data.get("detectors", {})
        return params

    @property
    def models(self) -> dict[str, dict[str, Any]]:
        inventory: dict[str, dict[str, Any]] = self.data.get("models", {})
        return inventory

    def worker_settings(self, **flags: Any) -> Any:
        """WorkerSettings from the file and environment, then ``flags`` (None: not given)."""
        from streams.worker.loop import WorkerSettings

        values = {_SETTING_NAMES.get(k, k): v for k, v in self.data.get("worker", {}).items()}
        values.update({k: v for k, v in flags.items() if v is not None})
        score_types = {m: e["score_type"] for m, e in self.models.items() if "score_type" in e}
        criticality = {m: e["criticality"] for m, e in self.models.items() if "criticality" in e}
        return WorkerSettings(
            **values,
            score_types=score_types,
            criticality=criticality,
            grouping=self.grouping,
            silences=self.silences,
        )

    @property
    def grouping(self) -> Any:
        from streams.alerting.lifecycle import Grouping

        given = self.data.get("lifecycle", {})
        default = Grouping()
        return Grouping(
            tuple(given.get("group_by", default.group_by)),
            int(given.get("group_wait_s", default.group_wait_ms / 1000) * 1000),
            int(given.get("group_interval_s", default.group_interval_ms / 1000) * 1000),
            int(given.get("repeat_interval_s", default.repeat_interval_ms / 1000) * 1000),
        )

    @property
    def silences(self) -> tuple[Any, ...]:
        """The file's silences (checked by :func:`load`)."""
        from streams.alerting.lifecycle import Matcher, Silence

        out = []
        for i, s in enumerate(self.data.get("silences", [])):
            start = _time_ms(s["starts"]) if "starts" in s else 0
            out.append(
                Silence(
                    f"config-{i}",
                    tuple(Matcher.parse(m) for m in s["matchers"]),
                    start,
                    _time_ms(s["ends"]),
                    s.get("author", "config"),
                    s.get("comment", ""),
                )
            )
        return tuple(out)


def _time_ms(text: str) -> int:
    """Epoch ms of an RFC 3339 time; a ValueError names it."""
    import datetime as dt

    try:
        moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{text!r} is not an RFC 3339 time (2026-12-05T09:00:00Z)") from None
    if moment.tzinfo is None:
        raise ValueError(f"{text!r} has no time zone; add Z or +HH:MM")
    return int(moment.timestamp() * 1000)


def load(path: Path | str | None, env: Mapping[str, str]) -> Config:
    """The configuration of ``path`` (else ``INFERWATCH_CONFIG``, else none) with the
    environment's overrides, checked; raises :class:`ConfigError`."""
    if path is None and env.get(CONFIG_ENV):
        path = env[CONFIG_ENV]
    data: dict[str, Any] = {}
    where = "defaults"
    if path is not None:
        path = Path(path)
        where = f"config {path}"
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{where}: no such file") from None
        except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{where}: cannot read it ({exc})") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{where}: not valid TOML: {exc}") from None
        _check(data, where)
    overrides = {}
    for var, (keys, value) in _from_env(env).items():
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
        if keys[-1] == "url":
            node.pop("url_file", None)  # the variable beats the file's url_file
        overrides[".".join(keys)] = var
        _check(data, var)
    password = _secrets(data, env, where, overrides)
    cfg = Config(data, Path(path) if path is not None else None, overrides, password)
    check_detectors(cfg.detectors, where)
    try:
        cfg.silences  # noqa: B018 - times and matchers the schema cannot check
    except ValueError as exc:
        raise ConfigError(f"{where}: silences: {exc}") from None
    return cfg


def _secrets(
    data: dict[str, Any], env: Mapping[str, str], where: str, overrides: dict[str, str]
) -> str | None:
    """Read the secret files the file names, check the HMAC key's variables, and return the
    store's password (variable, else the file's store.password_file)."""
    try:
        hook = data.get("routes", {}).get("webhook")
        if hook is not None:
            if "url" in hook and "url_file" in hook:
                raise ConfigError(f"{where}: routes.webhook: url and url_file are both set")
            if "url_file" in hook:
                at = f"{where}: routes.webhook.url_file"
                hook["url"] = validate_url(read_secret_file(hook["url_file"], at), at)
            elif "url" not in hook:
                raise ConfigError(f"{where}: routes.webhook: needs url or url_file")
            else:
                mask(hook["url"])
        if secret_from_env(env, HMAC_KEY_ENV) is not None:
            given = HMAC_KEY_ENV if env.get(HMAC_KEY_ENV) else f"{HMAC_KEY_ENV}_FILE"
            overrides["hmac_key"] = given
        from_env = secret_from_env(env, STORE_PASSWORD_ENV)
        if from_env is not None:
            overrides["store.password"] = from_env[1]
            return from_env[0]
        if "password_file" in data.get("store", {}):
            return read_secret_file(data["store"]["password_file"], f"{where}: store.password_file")
    except SecretError as exc:
        raise ConfigError(str(exc)) from None
    return None


def validate_url(url: str, where: str) -> str:
    """A webhook URL read from a file is checked like the file's ``url``."""
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"{where}: expected an http(s):// URL, found {redact(url)[:60]!r}")
    return url


def _from_env(env: Mapping[str, str]) -> dict[str, tuple[tuple[str, ...], Any]]:
    props = schema()["properties"]["worker"]["properties"]
    out: dict[str, tuple[tuple[str, ...], Any]] = {}
    for var, keys in _ENV.items():
        if env.get(var):
            out[var] = (keys, env[var])
    for var, keys in _SECRET_ENV.items():
        try:
            given = secret_from_env(env, var)
        except SecretError as exc:
            raise ConfigError(str(exc)) from None
        if given is not None:
            out[given[1]] = (keys, given[0])
    for var, text in env.items():
        if not var.startswith("INFERWATCH_WORKER_"):
            continue
        key = var.removeprefix("INFERWATCH_WORKER_").lower()
        if key not in props:
            raise ConfigError(
                f"{var}: no such worker setting{_suggest(key, props)}; known: "
                + ", ".join(f"INFERWATCH_WORKER_{k.upper()}" for k in props)
            )
        out[var] = (("worker", key), _coerce(var, text, props[key]))
    return out


def _coerce(var: str, text: str, prop: Mapping[str, Any]) -> Any:
    kind = prop.get("type")
    try:
        if kind == "integer":
            return int(text)
        if kind == "number":
            return float(text)
    except ValueError:
        raise ConfigError(
            f"{var}={text!r}: expected {'an integer' if kind == 'integer' else 'a number'}"
        ) from None
    return text


def _check(data: dict[str, Any], where: str) -> None:
    from jsonschema import Draft202012Validator

    errors = sorted(
        Draft202012Validator(schema()).iter_errors(data), key=lambda e: list(e.absolute_path)
    )
    if errors:
        raise ConfigError(f"{where}: " + "; ".join(_explain(e) for e in errors))


def _explain(err: Any) -> str:
    at = ".".join(str(p) for p in err.absolute_path) or "(top level)"
    if err.validator == "additionalProperties":
        allowed = list(err.schema.get("properties", {}))
        extra = sorted(set(err.instance) - set(allowed))
        hint = "".join(_suggest(k, allowed) for k in extra[:1])
        return (
            f"{at}: unknown key {', '.join(map(repr, extra))}{hint}; allowed: {', '.join(allowed)}"
        )
    if err.validator == "enum":
        return f"{at}: {err.instance!r} is not one of {', '.join(map(repr, err.validator_value))}"
    return f"{at}: {err.message}"


def _suggest(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_detectors(params: Mapping[str, Mapping[str, Any]], where: str) -> None:
    """Every named detector exists, every parameter exists with the type of its default, and
    the detector accepts the values (its constructor checks ranges)."""
    from detectors.registry import create, names

    known = names()
    for name, given in params.items():
        if name not in known:
            raise ConfigError(
                f"{where}: detectors.{name}: no such detector{_suggest(name, known)}; "
                f"registered: {', '.join(known)}"
            )
        defaults = {
            p.name: p.default
            for p in inspect.signature(type(create(name)).__init__).parameters.values()
            if p.name != "self"
        }
        defaults["enabled"] = True  # any detector can be switched off
        for key, value in given.items():
            at = f"{where}: detectors.{name}.{key}"
            if key not in defaults:
                raise ConfigError(
                    f"{at}: no such parameter{_suggest(key, defaults)}; "
                    f"parameters: {', '.join(defaults)}"
                )
            expected = _type_name(defaults[key], value)
            if expected:
                raise ConfigError(f"{at}: expected {expected}, got {value!r}")
        try:
            create(name, **{k: v for k, v in given.items() if k != "enabled"})
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{where}: detectors.{name}: {exc}") from None


def _type_name(default: Any, value: Any) -> str:
    """What ``value`` should have been, judged by the default's type; '' when it fits."""
    if isinstance(default, bool):
        return "" if isinstance(value, bool) else "true or false"
    if isinstance(default, int):
        return "" if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if isinstance(default, float):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return "" if ok else "a number"
    if isinstance(default, str):
        return "" if isinstance(value, str) else "a string"
    return ""
