"""CAP_AUDIT_SINKS: where the audit log is forwarded, parsed and validated at start.

The value is a comma-separated list of URLs, or a JSON list whose items are URLs or
objects ``{"url": ..., "name": ..., <option>: ...}``:

- ``syslog+tcp://host[:514]``: RFC 5424 over TCP, octet-counting framing (RFC 6587).
- ``syslog+tls://host[:6514]?ca=/path[&cert=/path&key=/path&server_name=name]``: the same
  over TLS (RFC 5425); ``ca`` defaults to the system trust store.
- ``https://host/services/collector/event?token_env=VAR[&ca=/path&index=main]`` (or
  ``http://``): batches POSTed as JSON in the Splunk HEC shape; the token is read from
  the environment variable named by ``token_env`` (never put a token in the URL).
- ``file:///var/log/cap-audit.jsonl``: JSON lines appended to a file.

Syslog option ``ack``: ``close`` (default: each batch on its own connection, half-closed,
delivered once the receiver closes its side, i.e. it read everything) or ``none``.
Common options: ``name`` (the sink's identity: its cursor is kept under it; default from
the URL), ``batch`` (entries per send, default 500), ``timeout`` (seconds, default 10).
Errors name CAP_AUDIT_SINKS and show the URL without its query or credentials.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from app.errors import ConfigError

VARIABLE = "CAP_AUDIT_SINKS"
KINDS = {"syslog+tcp": "syslog+tcp", "syslog+tls": "syslog+tls", "http": "http",
         "https": "http", "file": "file"}
DEFAULT_PORTS = {"syslog+tcp": 514, "syslog+tls": 6514}
COMMON_OPTIONS = {"name", "batch", "timeout"}
KIND_OPTIONS = {
    "syslog+tcp": {"app_name", "facility", "ack"},
    "syslog+tls": {"app_name", "facility", "ack", "ca", "cert", "key", "server_name"},
    "http": {"token_env", "auth_scheme", "ca", "index", "source", "sourcetype"},
    "file": set(),
}
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SINK_NAME = re.compile(r"^[A-Za-z0-9_.:/@+-]{1,200}$")
EXAMPLE = ("a comma list or JSON list of sink URLs: syslog+tcp://host:514, "
           "syslog+tls://host:6514?ca=/path, https://siem/services/collector/event"
           "?token_env=VAR, file:///var/log/cap-audit.jsonl")


@dataclass(frozen=True)
class SinkSpec:
    """One validated audit sink. Holds no secret: an HTTP token is read at send time from
    the environment variable ``token_env``."""

    name: str
    kind: str  # "syslog+tcp", "syslog+tls", "http" or "file"
    display: str  # the URL without query or credentials, safe to log and show
    host: str | None = None
    port: int | None = None
    url: str | None = None  # http(s): the URL to POST to, without the query
    path: str | None = None  # file: the JSON-lines file
    batch: int = 500
    timeout: float = 10.0
    app_name: str = "certautopilot"
    facility: int = 13  # "log audit"
    # syslog: "close" = after a batch, half-close and wait until the receiver closes too
    # (it read everything); "none" = the data left this host (TCP offers no more).
    ack: str = "close"
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    server_name: str | None = None
    token_env: str | None = None
    auth_scheme: str = "Splunk"
    index: str | None = None
    source: str = "certautopilot"
    sourcetype: str = "certautopilot:audit"


def _display(raw: str) -> str:
    """The URL without query, fragment or user info (which could hold secrets)."""
    try:
        parts = urlsplit(raw.strip())
    except ValueError:
        return "<unparseable URL>"
    netloc = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{netloc}{parts.path}"


def _fail(raw: str, expected: str) -> ConfigError:
    return ConfigError(VARIABLE, _display(raw), expected)


def _items(value: str) -> list[tuple[str, dict[str, str]]]:
    """(url, options given outside the URL) for each configured sink."""
    text = value.strip()
    if not text:
        return []
    if text.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(VARIABLE, "<JSON list>", f"a valid JSON list ({exc.msg} at "
                              f"character {exc.pos})") from None
        if not isinstance(data, list):
            raise ConfigError(VARIABLE, "<JSON>", EXAMPLE)
        items: list[tuple[str, dict[str, str]]] = []
        for item in data:
            if isinstance(item, str):
                items.append((item, {}))
            elif isinstance(item, dict) and isinstance(item.get("url"), str):
                extra = {str(k): str(v) for k, v in item.items() if k != "url"}
                items.append((item["url"], extra))
            else:
                raise ConfigError(VARIABLE, "<JSON item>",
                                  'each item a URL string or an object with "url"')
        return items
    return [(part.strip(), {}) for part in text.split(",") if part.strip()]


def _number(raw: str, key: str, value: str, low: float, high: float, integer: bool) -> float:
    try:
        number = int(value) if integer else float(value)
    except ValueError:
        raise _fail(raw, f"{key}= a number between {low:g} and {high:g}") from None
    if not low <= number <= high:
        raise _fail(raw, f"{key}= a number between {low:g} and {high:g}")
    return number


def _file_option(raw: str, key: str, value: str) -> str:
    if not Path(value).is_file():
        raise _fail(raw, f"{key}= the path of a readable file ({value!r} is not a file)")
    return value


def parse_sink(raw: str, extra: Mapping[str, str], env: Mapping[str, str]) -> SinkSpec:
    try:
        parts = urlsplit(raw)
        port = parts.port
    except ValueError:
        raise _fail(raw, f"a URL with a valid host and port ({EXAMPLE})") from None
    kind = KINDS.get(parts.scheme.lower())
    if kind is None:
        raise _fail(raw, f"a scheme among syslog+tcp, syslog+tls, https, http, file ({EXAMPLE})")
    if "@" in parts.netloc:
        raise _fail(raw, "no credentials in the URL: put an HTTP token in an environment "
                         "variable and name it with token_env=")
    try:
        query = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        raise _fail(raw, "options as key=value pairs joined with &") from None
    options: dict[str, str] = {}
    for key, value in [*query, *extra.items()]:
        if key in options:
            raise _fail(raw, f"option {key} given once")
        options[key] = value
    if "token" in options:
        raise _fail(raw, "no token in the configuration: put it in an environment variable "
                         "and name that variable with token_env=")
    allowed = COMMON_OPTIONS | KIND_OPTIONS[kind]
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise _fail(raw, f"options among {', '.join(sorted(allowed))} (unknown: "
                         f"{', '.join(unknown)})")
    spec: dict[str, Any] = {"kind": kind, "display": _display(raw)}
    if "batch" in options:
        spec["batch"] = int(_number(raw, "batch", options["batch"], 1, 10000, True))
    if "timeout" in options:
        spec["timeout"] = _number(raw, "timeout", options["timeout"], 0.1, 300, False)

    if kind.startswith("syslog"):
        if not parts.hostname or parts.path not in ("", "/"):
            raise _fail(raw, f"{kind}://host[:port] with no path")
        spec["host"] = parts.hostname
        spec["port"] = port or DEFAULT_PORTS[kind]
        if "app_name" in options:
            if not re.fullmatch(r"[!-~]{1,48}", options["app_name"]):
                raise _fail(raw, "app_name= 1 to 48 printable ASCII characters")
            spec["app_name"] = options["app_name"]
        if "facility" in options:
            spec["facility"] = int(_number(raw, "facility", options["facility"], 0, 23, True))
        if "ack" in options:
            if options["ack"] not in ("close", "none"):
                raise _fail(raw, "ack=close (wait for the receiver to close) or ack=none")
            spec["ack"] = options["ack"]
        for key in ("ca", "cert", "key"):
            if key in options:
                spec[key] = _file_option(raw, key, options[key])
        if ("cert" in options) != ("key" in options):
            raise _fail(raw, "cert= and key= together (a client certificate and its key)")
        if "server_name" in options:
            spec["server_name"] = options["server_name"]
        default_name = f"{kind}:{spec['host']}:{spec['port']}"
    elif kind == "http":
        if not parts.hostname:
            raise _fail(raw, "an http(s) URL with a host")
        spec["url"] = f"{parts.scheme}://{parts.netloc}{parts.path or '/'}"
        token_env = options.get("token_env")
        if token_env is not None:
            if not _ENV_NAME.match(token_env):
                raise _fail(raw, "token_env= the name of an environment variable")
            if not env.get(token_env):
                raise _fail(raw, f"token_env={token_env}: that environment variable is not "
                                 "set (it must hold the HTTP token)")
            spec["token_env"] = token_env
        if "auth_scheme" in options:
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9-]{0,31}", options["auth_scheme"]):
                raise _fail(raw, "auth_scheme= a word such as Splunk or Bearer")
            spec["auth_scheme"] = options["auth_scheme"]
        if "ca" in options:
            spec["ca"] = _file_option(raw, "ca", options["ca"])
        for key in ("index", "source", "sourcetype"):
            if key in options:
                spec[key] = options[key]
        default_name = f"http:{parts.hostname}{':' + str(port) if port else ''}{parts.path}"
    else:
        path = parts.path
        if parts.netloc not in ("", "localhost") or not path.startswith("/") or path == "/":
            raise _fail(raw, "file:///absolute/path.jsonl")
        spec["path"] = path
        default_name = f"file:{path}"

    name = options.get("name") or default_name
    if not _SINK_NAME.match(name):
        raise _fail(raw, "name= 1 to 200 letters, digits or ._:/@+-")
    spec["name"] = name
    return SinkSpec(**spec)


def parse_sinks(env: Mapping[str, str] | None = None) -> tuple[SinkSpec, ...]:
    """Read CAP_AUDIT_SINKS from ``env``; raise ConfigError (naming it) on any bad sink."""
    env = os.environ if env is None else env
    sinks = tuple(parse_sink(raw, extra, env) for raw, extra in _items(env.get(VARIABLE, "")))
    names = [s.name for s in sinks]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(VARIABLE, ", ".join(s.display for s in sinks),
                          f"distinct sinks (set name= to tell apart: {', '.join(duplicates)})")
    return sinks
