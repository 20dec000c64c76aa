"""CAP_CA_BUDGETS: the rate-limit budget each ACME directory is held to, across workers.

Unset, every directory gets Let's Encrypt's published limits (``LE_DEFAULTS``). The
value is a JSON object whose keys are directory URLs, or ``"*"`` for every directory
not named; each value sets some of::

    {"new_orders_per_account": "300/3h",          # newOrder per ACME account
     "new_certificates_per_domain": "50/7d",      # per registered domain (public suffix)
     "failed_validations_per_identifier": "5/1h", # failed authorizations per name
     "orders_pace": "20/1s",                      # newOrder per CA, every account
     "ari_renewals_exempt": true}                  # renewals with ``replaces`` skip the
                                                   # per-account and per-domain buckets

A limit is ``<count>/<duration>``: a positive whole count and a positive duration with a
unit s, m, h or d; or ``"off"`` for no such bucket (a private CA without that limit, a
benchmark against Pebble). A limit means: never more than ``count`` in any ``duration`` window
(a token comes back ``duration`` after it was taken). Missing keys fall back to ``"*"``,
then to the defaults. Errors name CAP_CA_BUDGETS and the offending key.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from app.errors import ConfigError

VARIABLE = "CAP_CA_BUDGETS"
ANY_DIRECTORY = "*"
UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_LIMIT_RE = re.compile(r"^\s*(-?\d+)\s*/\s*(-?\d+(?:\.\d+)?)\s*([smhd])\s*$")
# Stored as a list of timestamps per bucket: keep documents small.
MAX_COUNT = 10000


@dataclass(frozen=True)
class Limit:
    """At most ``count`` tokens taken in any window of ``window_seconds``."""

    count: int
    window_seconds: float

    def __str__(self) -> str:
        return f"{self.count}/{self.window_seconds:g}s"


@dataclass(frozen=True)
class BudgetPolicy:
    # None: "off", no such bucket.
    new_orders_per_account: Limit | None
    new_certificates_per_domain: Limit | None
    failed_validations_per_identifier: Limit | None
    orders_pace: Limit | None
    ari_renewals_exempt: bool = True


# https://letsencrypt.org/docs/rate-limits/ (new orders per account, new certificates per
# registered domain, authorization failures per identifier per account); the pace stays
# well under the 20 requests/s per IP that the newOrder endpoint allows.
LE_DEFAULTS = BudgetPolicy(
    new_orders_per_account=Limit(300, 3 * 3600.0),
    new_certificates_per_domain=Limit(50, 7 * 86400.0),
    failed_validations_per_identifier=Limit(5, 3600.0),
    orders_pace=Limit(20, 1.0),
    ari_renewals_exempt=True,
)
LIMIT_KEYS = ("new_orders_per_account", "new_certificates_per_domain",
              "failed_validations_per_identifier", "orders_pace")
KEYS = (*LIMIT_KEYS, "ari_renewals_exempt")


@dataclass(frozen=True)
class CaBudgets:
    """The parsed setting: a policy per directory URL and one for every other."""

    default: BudgetPolicy = LE_DEFAULTS
    by_directory: tuple[tuple[str, BudgetPolicy], ...] = ()

    def for_directory(self, directory_url: str) -> BudgetPolicy:
        for url, policy in self.by_directory:
            if url == directory_url:
                return policy
        return self.default


def parse_limit(raw: object, where: str) -> Limit | None:
    expected = (f"{where}: <count>/<duration> with a positive count and a positive "
                "duration in s, m, h or d, e.g. 300/3h, or off")
    if raw == "off":
        return None
    match = _LIMIT_RE.match(raw) if isinstance(raw, str) else None
    if match is None:
        raise ConfigError(VARIABLE, _shown(raw), expected)
    count, amount, unit = int(match[1]), float(match[2]), match[3]
    if count <= 0 or amount <= 0:
        raise ConfigError(VARIABLE, _shown(raw),
                          f"{where}: zero or negative budgets are refused; {expected}")
    if count > MAX_COUNT:
        raise ConfigError(VARIABLE, _shown(raw), f"{where}: a count of at most {MAX_COUNT}")
    return Limit(count, amount * UNITS[unit])


def _shown(raw: object) -> str:
    return raw if isinstance(raw, str) else json.dumps(raw, default=str)[:200]


def _policy(base: BudgetPolicy, spec: object, where: str) -> BudgetPolicy:
    if not isinstance(spec, dict):
        raise ConfigError(VARIABLE, _shown(spec),
                          f"{where}: an object with some of {', '.join(KEYS)}")
    unknown = sorted(set(spec) - set(KEYS))
    if unknown:
        raise ConfigError(VARIABLE, _shown(spec),
                          f"{where}: unknown key {unknown[0]!r}; expected some of "
                          f"{', '.join(KEYS)}")
    changes: dict[str, Any] = {}
    for key in LIMIT_KEYS:
        if key in spec:
            changes[key] = parse_limit(spec[key], f"{where}.{key}")
    if "ari_renewals_exempt" in spec:
        if not isinstance(spec["ari_renewals_exempt"], bool):
            raise ConfigError(VARIABLE, _shown(spec["ari_renewals_exempt"]),
                              f"{where}.ari_renewals_exempt: true or false")
        changes["ari_renewals_exempt"] = spec["ari_renewals_exempt"]
    return replace(base, **changes)


def parse_ca_budgets(env: Mapping[str, str]) -> CaBudgets:
    raw = (env.get(VARIABLE) or "").strip()
    if not raw:
        return CaBudgets()
    expected = ('a JSON object {"<directory URL>" or "*": {"new_orders_per_account": '
                '"300/3h", ...}}')
    try:
        spec = json.loads(raw)
    except ValueError:
        raise ConfigError(VARIABLE, raw[:200], expected) from None
    if not isinstance(spec, dict):
        raise ConfigError(VARIABLE, raw[:200], expected)
    default = _policy(LE_DEFAULTS, spec.get(ANY_DIRECTORY, {}), ANY_DIRECTORY)
    by_directory: list[tuple[str, BudgetPolicy]] = []
    for url, item in spec.items():
        if url == ANY_DIRECTORY:
            continue
        if not url.startswith("https://") or any(c.isspace() for c in url):
            raise ConfigError(VARIABLE, url[:200],
                              'keys: the https:// URL of an ACME directory, or "*"')
        by_directory.append((url, _policy(default, item, url)))
    return CaBudgets(default=default, by_directory=tuple(by_directory))
