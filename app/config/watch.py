"""Settings of drift scans and alerts (CAP_DRIFT_*, CAP_ALERT_*), read with the rest of
the configuration by ``app.config.load_settings`` (a bad value names its variable)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from app.errors import ConfigError

if TYPE_CHECKING:
    from app.config import Settings


@dataclass(frozen=True)
class WatchSettings:
    # CAP_DRIFT_SCAN_INTERVAL_SECONDS: each endpoint is scanned once per interval, at its
    # own offset inside it (a hash of the endpoint), so 10,000 endpoints spread over it.
    drift_scan_interval_seconds: float = 3600.0
    # CAP_DRIFT_VERIFY_DELAY_SECONDS: after a renewal, the endpoints are checked this long
    # later (time for deploy hooks and load balancers to reload) ...
    drift_verify_delay_seconds: float = 600.0
    # CAP_DRIFT_VERIFY_ATTEMPTS: ... and again, this many times in all, the same delay
    # apart, before the renewal is flagged `unverified`.
    drift_verify_attempts: int = 3
    # CAP_DRIFT_CONNECT_TIMEOUT_SECONDS: TCP connect + (STARTTLS) + TLS handshake budget.
    drift_connect_timeout_seconds: float = 5.0
    # CAP_ALERT_EXPIRY_DAYS: alert when a certificate is this many days from expiry
    # without being renewed (comma-separated, one alert per threshold crossed).
    alert_expiry_days: tuple[int, ...] = (30, 14, 7, 3, 1)
    # CAP_ALERT_RENEWAL_FAILURES: alert after this many failed renewals in a row.
    alert_renewal_failures: int = 3
    # CAP_ALERT_LEADER_MISSING_SECONDS: alert when no scheduler held the lease this long.
    alert_leader_missing_seconds: float = 60.0
    # CAP_ALERT_RETRY_BASE_SECONDS / CAP_ALERT_RETRY_MAX_SECONDS: a channel that fails is
    # retried after base * 2^(failures-1) seconds, at most max (5 s -> 5 min).
    alert_retry_base_seconds: float = 5.0
    alert_retry_max_seconds: float = 300.0
    # CAP_ALERT_SEND_TIMEOUT_SECONDS: one webhook POST or SMTP conversation.
    alert_send_timeout_seconds: float = 10.0


def _float(env: Mapping[str, str], name: str, default: float, low: float = 0.0) -> float:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not (value > low and value < 10 * 366 * 86400):
        raise ConfigError(name, raw, f"a number of seconds above {low:g}")
    return value


def _int(env: Mapping[str, str], name: str, default: int, high: int) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    if not raw.strip().isdigit() or not 1 <= int(raw) <= high:
        raise ConfigError(name, raw, f"an integer from 1 to {high}")
    return int(raw)


def _days(env: Mapping[str, str]) -> tuple[int, ...]:
    raw = env.get("CAP_ALERT_EXPIRY_DAYS")
    if raw is None or raw.strip() == "":
        return WatchSettings.alert_expiry_days
    parts = [p.strip() for p in raw.split(",")]
    if not parts or not all(p.isdigit() and 1 <= int(p) <= 365 for p in parts) \
            or len(set(parts)) != len(parts):
        raise ConfigError("CAP_ALERT_EXPIRY_DAYS", raw,
                          "distinct whole days from 1 to 365, comma-separated, e.g. 30,14,7,3,1")
    return tuple(sorted((int(p) for p in parts), reverse=True))


def parse_watch(env: Mapping[str, str]) -> WatchSettings:
    retry_base = _float(env, "CAP_ALERT_RETRY_BASE_SECONDS", 5.0)
    retry_max = _float(env, "CAP_ALERT_RETRY_MAX_SECONDS", 300.0)
    if retry_max < retry_base:
        raise ConfigError("CAP_ALERT_RETRY_MAX_SECONDS", env.get("CAP_ALERT_RETRY_MAX_SECONDS"),
                          f"at least CAP_ALERT_RETRY_BASE_SECONDS ({retry_base:g})")
    return WatchSettings(
        drift_scan_interval_seconds=_float(env, "CAP_DRIFT_SCAN_INTERVAL_SECONDS", 3600.0,
                                           low=9.999),
        drift_verify_delay_seconds=_float(env, "CAP_DRIFT_VERIFY_DELAY_SECONDS", 600.0),
        drift_verify_attempts=_int(env, "CAP_DRIFT_VERIFY_ATTEMPTS", 3, 20),
        drift_connect_timeout_seconds=_float(env, "CAP_DRIFT_CONNECT_TIMEOUT_SECONDS", 5.0),
        alert_expiry_days=_days(env),
        alert_renewal_failures=_int(env, "CAP_ALERT_RENEWAL_FAILURES", 3, 100),
        alert_leader_missing_seconds=_float(env, "CAP_ALERT_LEADER_MISSING_SECONDS", 60.0),
        alert_retry_base_seconds=retry_base,
        alert_retry_max_seconds=retry_max,
        alert_send_timeout_seconds=_float(env, "CAP_ALERT_SEND_TIMEOUT_SECONDS", 10.0),
    )


def watch_settings(settings: Settings) -> WatchSettings:
    """The process's watch settings (the defaults for a Settings built by hand)."""
    return settings.watch if settings.watch is not None else WatchSettings()
