"""CAP_CA_BUDGETS: Let's Encrypt's limits by default, per-directory overrides, and a clear
error naming the variable for anything else (zero or negative budgets included)."""

from __future__ import annotations

import json

import pytest

from app.config import ConfigError, load_settings
from app.config.ca_budgets import LE_DEFAULTS, Limit, parse_ca_budgets

pytestmark = pytest.mark.unit

PEBBLE = "https://127.0.0.1:14000/dir"


def test_defaults_are_lets_encrypts_published_limits():
    budgets = parse_ca_budgets({})
    policy = budgets.for_directory("https://acme-v02.api.letsencrypt.org/directory")
    assert policy == LE_DEFAULTS
    assert policy.new_orders_per_account == Limit(300, 10800.0)
    assert policy.new_certificates_per_domain == Limit(50, 604800.0)
    assert policy.failed_validations_per_identifier == Limit(5, 3600.0)


def test_per_directory_overrides_fall_back_to_star_then_defaults():
    budgets = parse_ca_budgets({"CAP_CA_BUDGETS": json.dumps({
        "*": {"orders_pace": "5/1s"},
        PEBBLE: {"new_orders_per_account": "5/10s", "ari_renewals_exempt": False}})})
    pebble = budgets.for_directory(PEBBLE)
    assert pebble.new_orders_per_account == Limit(5, 10.0)
    assert pebble.orders_pace == Limit(5, 1.0)
    assert pebble.ari_renewals_exempt is False
    other = budgets.for_directory("https://other.example/dir")
    assert other.orders_pace == Limit(5, 1.0)
    assert other.new_orders_per_account == LE_DEFAULTS.new_orders_per_account


@pytest.mark.parametrize("value, fragment", [
    ({PEBBLE: {"new_orders_per_account": "0/10s"}}, "zero or negative"),
    ({PEBBLE: {"new_orders_per_account": "-5/10s"}}, "zero or negative"),
    ({"*": {"orders_pace": "5/0s"}}, "zero or negative"),
    ({"*": {"orders_pace": "5/-1h"}}, "zero or negative"),
    ({"*": {"orders_pace": "five per second"}}, "<count>/<duration>"),
    ({"*": {"orders_pace": 5}}, "<count>/<duration>"),
    ({"*": {"new_orders": "5/1s"}}, "unknown key 'new_orders'"),
    ({"*": {"ari_renewals_exempt": "yes"}}, "true or false"),
    ({"ftp://x/dir": {}}, "https:// URL"),
    ([1, 2], "JSON object"),
])
def test_bad_budgets_are_refused_naming_the_variable(value, fragment):
    with pytest.raises(ConfigError) as err:
        load_settings({"CAP_CA_BUDGETS": json.dumps(value)})
    assert "CAP_CA_BUDGETS" in str(err.value)
    assert fragment in str(err.value)


def test_a_limit_can_be_off():
    budgets = parse_ca_budgets({"CAP_CA_BUDGETS": json.dumps(
        {PEBBLE: {"new_certificates_per_domain": "off"}})})
    assert budgets.for_directory(PEBBLE).new_certificates_per_domain is None
    assert budgets.for_directory(PEBBLE).new_orders_per_account == Limit(300, 10800.0)


def test_not_json_is_refused():
    with pytest.raises(ConfigError, match="CAP_CA_BUDGETS"):
        load_settings({"CAP_CA_BUDGETS": "{300/3h"})
