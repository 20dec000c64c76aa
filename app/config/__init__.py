"""Every CAP_* setting, read and validated in one place.

Each setting is declared once below with its environment variable, its default and the
form it expects. ``load_settings()`` reads them all; a wrong value raises ``ConfigError``
naming the variable and the expected form, and every entry point turns that into one line
on stderr and a non-zero exit before doing anything else.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pymongo.errors import ConfigurationError, InvalidURI
from pymongo.uri_parser import parse_uri

from app.config.audit_sinks import SinkSpec, parse_sinks
from app.config.ca_budgets import CaBudgets, parse_ca_budgets
from app.config.watch import WatchSettings, parse_watch

# Defined with the other errors so that the parsers of single settings (audit_sinks, watch) need
# not import this package; every caller keeps importing it from here.
from app.errors import ConfigError as ConfigError

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("json", "text")
METRICS_CERTIFICATE_SERIES = ("per-certificate", "aggregate")


@dataclass(frozen=True)
class Settings:
    """The validated configuration of one process."""

    # CAP_MONGO_URI: the replica set, e.g. mongodb://m0,m1,m2/certautopilot?replicaSet=rs0.
    # Unset only for `certautopilot dev`, which starts the embedded server and sets it.
    mongo_uri: str | None = None
    # CAP_MONGO_DB: database name; defaults to the URI's path, else "certautopilot".
    mongo_db: str = "certautopilot"
    # CAP_BROKER_DB: database of kombu's MongoDB transport (same cluster as CAP_MONGO_URI).
    broker_db: str = "certautopilot_broker"
    # CAP_MONGO_TIMEOUT_MS: server selection / connect timeout; an unreachable database
    # fails within this bound instead of hanging.
    mongo_timeout_ms: int = 5000
    # CAP_KEK_FILE / CAP_KEK_DIR / CAP_KEK_COMMAND: where the key-encryption key comes from
    # (at most one of them). It never enters MongoDB.
    kek_file: Path | None = None
    kek_dir: Path | None = None
    kek_command: str | None = None
    # CAP_JOB_LEASE_SECONDS: how long a claimed job is held without a heartbeat.
    job_lease_seconds: float = 60.0
    # CAP_JOB_MAX_ATTEMPTS: attempts before a failing job is marked dead.
    job_max_attempts: int = 5
    # CAP_JOB_GRACE_SECONDS: on SIGTERM, how long running jobs may take to finish.
    job_grace_seconds: float = 30.0
    # CAP_REAPER_REPUBLISH_SECONDS: a queued job older than this with no claim is re-published.
    reaper_republish_seconds: float = 30.0
    # CAP_EXTRA_HANDLER_MODULES: comma-separated Python modules the worker imports at start
    # besides the job kinds listed in app.handlers (a test/ops hook for extra job kinds,
    # e.g. tests.helpers.job_kinds); empty in production.
    extra_handler_modules: tuple[str, ...] = ()
    # CAP_SCHEDULER_LEASE_SECONDS / _RENEW_SECONDS / _RETRY_SECONDS: leader lease length,
    # the leader's renewal interval, and the standby's acquire interval.
    scheduler_lease_seconds: float = 15.0
    scheduler_renew_seconds: float = 5.0
    scheduler_retry_seconds: float = 2.0
    # CAP_SCHEDULER_EXTRA_ENTRIES: more timed work beside scheduler/timed.py, as a JSON list
    # of {"name", "every_seconds", "kind", "payload"} objects (tests, benchmarks, one-off
    # operator schedules). Parsed into plain dicts here; the scheduler builds its entries.
    scheduler_extra_entries: tuple[dict[str, Any], ...] = ()
    # CAP_LOG_LEVEL and CAP_LOG_FORMAT (json lines, the default off a terminal, or text).
    log_level: str = "INFO"
    log_format: str = "json"
    # CAP_API_BIND: host:port the API listens on.
    api_bind: str = "127.0.0.1:8000"
    # CAP_DATA_DIR: where `certautopilot dev` keeps the embedded database and dev KEK.
    data_dir: Path = Path(".certautopilot")
    # CAP_DEV_MONGO_PORT: port of the embedded database started by `certautopilot dev`.
    dev_mongo_port: int = 27117
    # CAP_WORKER_METRICS_PORT: port on which a Celery worker serves its own Prometheus
    # metrics (ACME requests, job attempts); 0 (the default) serves none.
    worker_metrics_port: int = 0
    # CAP_TLS_ALPN_PORT: port on which each api process answers TLS-ALPN-01 validations
    # (RFC 8737; the host is CAP_API_BIND's); 0 (the default) serves none.
    tls_alpn_port: int = 0
    # CAP_PROBE_DIR: where a worker or scheduler records what its loop last did, for
    # `certautopilot probe worker|scheduler` (Kubernetes exec probes; app/probes.py).
    probe_dir: Path = Path("/tmp/certautopilot-probe")
    # CAP_ACME_DIRECTORY_URL: the ACME directory of accounts that do not name their own
    # (an https:// URL; Let's Encrypt production by default).
    acme_directory_url: str = "https://acme-v02.api.letsencrypt.org/directory"
    # CAP_ACME_CA_BUNDLE: PEM file of CA certificates that verify the ACME server's TLS
    # certificate (a private CA; Pebble in tests). Unset: the system's trust store.
    acme_ca_bundle: Path | None = None
    # CAP_ACME_ORDER_TIMEOUT_SECONDS: how long one wait on the CA (validation, issuance)
    # may take before the attempt fails and the job retries.
    acme_order_timeout_seconds: float = 120.0
    # CAP_RENEWAL_BACKOFF_SECONDS / CAP_RENEWAL_BACKOFF_MAX_SECONDS: after a failed
    # validation the next attempt waits base * 2^(failures-1), at most max (1 h → 32 h).
    renewal_backoff_seconds: float = 3600.0
    renewal_backoff_max_seconds: float = 115200.0
    # CAP_AUDIT_HMAC_KEY: when set (at least 32 characters), the audit hash chain is an
    # HMAC-SHA256 under this key, so a database writer cannot forge it. Keep it outside
    # MongoDB (a Kubernetes Secret); it is never logged or shown.
    audit_hmac_key: bytes | None = field(default=None, repr=False)
    # CAP_AUDIT_SINKS: where the audit log is forwarded (SIEM): syslog over TCP or TLS,
    # HTTP JSON (Splunk HEC shape), a JSON-lines file; see app/config/audit_sinks.py.
    audit_sinks: tuple[SinkSpec, ...] = ()
    # CAP_API_RATE_LIMIT: requests one API token may make per window, shared by every api
    # replica through MongoDB: "<count>/<second|minute|hour>" (e.g. 6000/minute), or "off".
    # api_rate_limit 0 means no limit.
    api_rate_limit: int = 6000
    api_rate_window_seconds: int = 60
    # CAP_METRICS_CERTIFICATE_SERIES: what /metrics says about certificates, read from the
    # fleet snapshot one worker refreshes every 60 s. "per-certificate" (default): the
    # cert-manager-like expiry, renewal and ready gauges of each certificate plus the
    # aggregates; "aggregate": only counts by status and by days left and the soonest
    # expiry per project (one series per project, not per certificate: large fleets).
    metrics_certificate_series: str = "per-certificate"
    # CAP_CA_BUDGETS: the ACME rate-limit budget shared by every worker, per directory
    # (JSON; Let's Encrypt's published limits by default): see app/config/ca_budgets.py.
    ca_budgets: CaBudgets = field(default_factory=CaBudgets)
    # CAP_CA_FALLBACK_AFTER_FAILURES: consecutive failed attempts at one CA after which a
    # certificate with a ca_fallback list moves to its next account.
    ca_fallback_after_failures: int = 3
    # CAP_DRIFT_* and CAP_ALERT_*: drift scans and alerts (app/config/watch.py).
    watch: WatchSettings | None = None

    def require_mongo_uri(self) -> str:
        if not self.mongo_uri:
            raise ConfigError("CAP_MONGO_URI", None, "a mongodb:// URI (it is not set)")
        return self.mongo_uri

    def with_overrides(self, **changes: Any) -> Settings:
        return replace(self, **changes)


def _positive_float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(name, raw, "a positive number of seconds") from None
    if not value > 0 or value != value or value == float("inf"):
        raise ConfigError(name, raw, "a positive number of seconds")
    return value


def _positive_int(env: Mapping[str, str], name: str, default: int, expected: str) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(name, raw, expected) from None
    if value <= 0:
        raise ConfigError(name, raw, expected)
    return value


def _port(env: Mapping[str, str], name: str, default: int) -> int:
    value = _positive_int(env, name, default, "a TCP port between 1 and 65535")
    if value > 65535:
        raise ConfigError(name, env.get(name), "a TCP port between 1 and 65535")
    return value


def _optional_port(env: Mapping[str, str], name: str) -> int:
    """A TCP port, or 0 (also when unset) for "none"."""
    raw = (env.get(name) or "").strip()
    if not raw:
        return 0
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise ConfigError(name, env.get(name), "a TCP port between 1 and 65535, or 0 for none")
    return value


def validate_mongo_uri(name: str, raw: str) -> str | None:
    """Check a MongoDB URI; return the database named in its path, if any."""
    expected = "a mongodb:// or mongodb+srv:// URI, e.g. mongodb://m0,m1,m2/certautopilot?replicaSet=rs0"
    if not raw.startswith(("mongodb://", "mongodb+srv://")):
        raise ConfigError(name, raw, expected)
    try:
        parsed = parse_uri(raw, connect_timeout=1.0) if raw.startswith("mongodb+srv://") \
            else parse_uri(raw)
    except (InvalidURI, ConfigurationError, ValueError) as exc:
        raise ConfigError(name, raw, f"{expected} ({exc})") from None
    if not parsed.get("nodelist") and not raw.startswith("mongodb+srv://"):
        raise ConfigError(name, raw, expected)
    database = parsed.get("database")
    return str(database) if database else None


def _scheduler_extra_entries(env: Mapping[str, str]) -> tuple[dict[str, Any], ...]:
    raw = env.get("CAP_SCHEDULER_EXTRA_ENTRIES") or ""
    if not raw.strip():
        return ()
    expected = ('a JSON list of {"name": str, "every_seconds": number >= 0.1, '
                '"kind": str, "payload": object (optional)} with distinct names')
    try:
        items = json.loads(raw)
    except ValueError:
        raise ConfigError("CAP_SCHEDULER_EXTRA_ENTRIES", raw, expected) from None
    if not isinstance(items, list):
        raise ConfigError("CAP_SCHEDULER_EXTRA_ENTRIES", raw, expected)
    entries: list[dict[str, Any]] = []
    for item in items:
        if not isinstance(item, dict) or set(item) - {"name", "every_seconds", "kind",
                                                      "payload"}:
            raise ConfigError("CAP_SCHEDULER_EXTRA_ENTRIES", raw, expected)
        name, kind, every = item.get("name"), item.get("kind"), item.get("every_seconds")
        payload = item.get("payload", {})
        if (not isinstance(name, str) or not name.strip() or len(name) > 200
                or not isinstance(kind, str) or not kind.strip()
                or isinstance(every, bool) or not isinstance(every, (int, float))
                or not 0.1 <= every <= 366 * 86400 or not isinstance(payload, dict)
                or name in {e["name"] for e in entries}):
            raise ConfigError("CAP_SCHEDULER_EXTRA_ENTRIES", raw, expected)
        entries.append({"name": name, "every_seconds": float(every), "kind": kind,
                        "payload": payload})
    return tuple(entries)


def _module_list(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    raw = env.get(name) or ""
    modules = tuple(part.strip() for part in raw.split(",") if part.strip())
    for module in modules:
        if not all(piece.isidentifier() for piece in module.split(".")):
            raise ConfigError(name, raw, "comma-separated Python module names, "
                              "e.g. tests.helpers.job_kinds")
    return modules


def _api_bind(env: Mapping[str, str]) -> str:
    raw = env.get("CAP_API_BIND", "127.0.0.1:8000")
    host, sep, port = raw.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError("CAP_API_BIND", raw, "host:port, e.g. 0.0.0.0:8000")
    return raw


def _kek_sources(env: Mapping[str, str]) -> tuple[Path | None, Path | None, str | None]:
    kek_file = env.get("CAP_KEK_FILE") or None
    kek_dir = env.get("CAP_KEK_DIR") or None
    kek_command = env.get("CAP_KEK_COMMAND") or None
    given = [n for n, v in (("CAP_KEK_FILE", kek_file), ("CAP_KEK_DIR", kek_dir),
                            ("CAP_KEK_COMMAND", kek_command)) if v]
    if len(given) > 1:
        raise ConfigError(given[1], env.get(given[1]),
                          f"only one KEK source, but {' and '.join(given)} are both set")
    if kek_file and not Path(kek_file).is_file():
        raise ConfigError("CAP_KEK_FILE", kek_file,
                          "the path of a readable file holding base64 of 32 random bytes")
    if kek_dir and not Path(kek_dir).is_dir():
        raise ConfigError("CAP_KEK_DIR", kek_dir,
                          "a directory of versioned KEK files (e.g. v1.key, v2.key)")
    return (Path(kek_file) if kek_file else None, Path(kek_dir) if kek_dir else None,
            kek_command)


RATE_WINDOWS = {"second": 1, "minute": 60, "hour": 3600}


def _api_rate_limit(env: Mapping[str, str]) -> tuple[int, int]:
    raw = (env.get("CAP_API_RATE_LIMIT") or "6000/minute").strip().lower()
    if raw in ("off", "0"):
        return 0, 60
    count, sep, window = raw.partition("/")
    if not sep or window not in RATE_WINDOWS or not count.isdigit() or int(count) <= 0:
        raise ConfigError("CAP_API_RATE_LIMIT", env.get("CAP_API_RATE_LIMIT"),
                          "<count>/<second|minute|hour> with a positive count, e.g. "
                          "6000/minute, or off")
    return int(count), RATE_WINDOWS[window]


def audit_hmac_key(env: Mapping[str, str]) -> bytes | None:
    """CAP_AUDIT_HMAC_KEY as bytes (None when unset); the value never appears in errors."""
    raw = env.get("CAP_AUDIT_HMAC_KEY") or None
    if raw is None:
        return None
    if len(raw) < 32 or raw != raw.strip():
        raise ConfigError("CAP_AUDIT_HMAC_KEY", "<hidden>",
                          "at least 32 characters without surrounding spaces, e.g. the output "
                          "of `openssl rand -base64 48`")
    return raw.encode()


def _acme_settings(env: Mapping[str, str]) -> dict[str, Any]:
    directory = env.get("CAP_ACME_DIRECTORY_URL") or Settings.acme_directory_url
    if not directory.startswith("https://") or len(directory) < 12 or " " in directory:
        raise ConfigError("CAP_ACME_DIRECTORY_URL", directory,
                          "the https:// URL of an ACME directory")
    bundle = env.get("CAP_ACME_CA_BUNDLE") or None
    if bundle and not Path(bundle).is_file():
        raise ConfigError("CAP_ACME_CA_BUNDLE", bundle, "the path of a readable PEM file")
    backoff = _positive_float(env, "CAP_RENEWAL_BACKOFF_SECONDS", 3600.0)
    backoff_max = _positive_float(env, "CAP_RENEWAL_BACKOFF_MAX_SECONDS", 115200.0)
    if backoff_max < backoff:
        raise ConfigError("CAP_RENEWAL_BACKOFF_MAX_SECONDS",
                          env.get("CAP_RENEWAL_BACKOFF_MAX_SECONDS"),
                          f"at least CAP_RENEWAL_BACKOFF_SECONDS ({backoff:g})")
    return {
        "acme_directory_url": directory,
        "acme_ca_bundle": Path(bundle) if bundle else None,
        "acme_order_timeout_seconds": _positive_float(env, "CAP_ACME_ORDER_TIMEOUT_SECONDS",
                                                      120.0),
        "renewal_backoff_seconds": backoff,
        "renewal_backoff_max_seconds": backoff_max,
    }


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read and validate every CAP_* variable; raise ConfigError on the first bad one."""
    env = os.environ if environ is None else environ

    mongo_uri = env.get("CAP_MONGO_URI") or None
    uri_db = validate_mongo_uri("CAP_MONGO_URI", mongo_uri) if mongo_uri else None
    mongo_db = env.get("CAP_MONGO_DB") or uri_db or "certautopilot"
    broker_db = env.get("CAP_BROKER_DB") or "certautopilot_broker"
    for name, value in (("CAP_MONGO_DB", mongo_db), ("CAP_BROKER_DB", broker_db)):
        if any(ch in value for ch in '/\\. "$') or len(value) > 63:
            raise ConfigError(name, value, "a MongoDB database name without / \\ . \" $ or spaces")

    level = (env.get("CAP_LOG_LEVEL") or "INFO").upper()
    if level not in LOG_LEVELS:
        raise ConfigError("CAP_LOG_LEVEL", env.get("CAP_LOG_LEVEL"),
                          "one of " + ", ".join(LOG_LEVELS))
    default_format = "text" if sys.stderr.isatty() else "json"
    log_format = (env.get("CAP_LOG_FORMAT") or default_format).lower()
    if log_format not in LOG_FORMATS:
        raise ConfigError("CAP_LOG_FORMAT", env.get("CAP_LOG_FORMAT"), "json or text")

    kek_file, kek_dir, kek_command = _kek_sources(env)

    scheduler_lease = _positive_float(env, "CAP_SCHEDULER_LEASE_SECONDS", 15.0)
    scheduler_renew = _positive_float(env, "CAP_SCHEDULER_RENEW_SECONDS", 5.0)
    if scheduler_renew >= scheduler_lease:
        raise ConfigError("CAP_SCHEDULER_RENEW_SECONDS", env.get("CAP_SCHEDULER_RENEW_SECONDS"),
                          f"fewer seconds than CAP_SCHEDULER_LEASE_SECONDS ({scheduler_lease:g})")

    api_rate_limit, api_rate_window = _api_rate_limit(env)

    certificate_series = (env.get("CAP_METRICS_CERTIFICATE_SERIES")
                          or "per-certificate").strip().lower()
    if certificate_series not in METRICS_CERTIFICATE_SERIES:
        raise ConfigError("CAP_METRICS_CERTIFICATE_SERIES",
                          env.get("CAP_METRICS_CERTIFICATE_SERIES"),
                          " or ".join(METRICS_CERTIFICATE_SERIES))

    return Settings(
        mongo_uri=mongo_uri,
        mongo_db=mongo_db,
        broker_db=broker_db,
        mongo_timeout_ms=_positive_int(env, "CAP_MONGO_TIMEOUT_MS", 5000,
                                       "a positive number of milliseconds"),
        kek_file=kek_file,
        kek_dir=kek_dir,
        kek_command=kek_command,
        job_lease_seconds=_positive_float(env, "CAP_JOB_LEASE_SECONDS", 60.0),
        job_max_attempts=_positive_int(env, "CAP_JOB_MAX_ATTEMPTS", 5, "a positive integer"),
        job_grace_seconds=_positive_float(env, "CAP_JOB_GRACE_SECONDS", 30.0),
        reaper_republish_seconds=_positive_float(env, "CAP_REAPER_REPUBLISH_SECONDS", 30.0),
        extra_handler_modules=_module_list(env, "CAP_EXTRA_HANDLER_MODULES"),
        scheduler_lease_seconds=scheduler_lease,
        scheduler_renew_seconds=scheduler_renew,
        scheduler_retry_seconds=_positive_float(env, "CAP_SCHEDULER_RETRY_SECONDS", 2.0),
        scheduler_extra_entries=_scheduler_extra_entries(env),
        log_level=level,
        log_format=log_format,
        api_bind=_api_bind(env),
        data_dir=Path(env.get("CAP_DATA_DIR") or ".certautopilot"),
        dev_mongo_port=_port(env, "CAP_DEV_MONGO_PORT", 27117),
        worker_metrics_port=_optional_port(env, "CAP_WORKER_METRICS_PORT"),
        tls_alpn_port=_optional_port(env, "CAP_TLS_ALPN_PORT"),
        probe_dir=Path(env.get("CAP_PROBE_DIR") or "/tmp/certautopilot-probe"),
        **_acme_settings(env),
        audit_hmac_key=audit_hmac_key(env),
        audit_sinks=parse_sinks(env),
        api_rate_limit=api_rate_limit,
        api_rate_window_seconds=api_rate_window,
        metrics_certificate_series=certificate_series,
        ca_budgets=parse_ca_budgets(env),
        ca_fallback_after_failures=_positive_int(env, "CAP_CA_FALLBACK_AFTER_FAILURES", 3,
                                                 "a positive number of attempts"),
        watch=parse_watch(env),
    )


def load_or_exit(environ: Mapping[str, str] | None = None) -> Settings:
    """load_settings() for entry points: a bad value prints one line and exits 2."""
    try:
        return load_settings(environ)
    except ConfigError as exc:
        print(f"certautopilot: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def configure_logging(settings: Settings) -> None:
    from app.logs import setup_logging

    setup_logging(settings.log_level, settings.log_format)
    logging.getLogger(__name__).debug("settings loaded")
