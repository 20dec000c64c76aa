"""GET /api/v1/status/ca-budgets: each shared bucket's level; subjects (accounts,
domains) for admins only; a bad query is a 422 in the error envelope."""

from __future__ import annotations

import pytest

from app import create_app
from app.config.ca_budgets import Limit
from app.domain import budget, tokens
from tests.helpers.api import API, make_admin, make_project, make_token

pytestmark = pytest.mark.integration

CA = "https://ca.example/dir"


def test_ca_budget_levels(migrated_db, settings) -> None:
    tokens.clear_cache()
    client = create_app(settings).test_client()
    orders = budget.Bucket(CA, budget.ORDERS_PER_ACCOUNT, "acct-1", Limit(5, 60.0))
    pace = budget.Bucket(CA, budget.PACE, "*", Limit(20, 1.0))
    for _ in range(2):
        assert isinstance(budget.take(migrated_db, [orders, pace]), budget.Grant)
    admin = make_admin(migrated_db)
    reader = make_token(migrated_db, make_project(migrated_db, "alpha"), ["read"])

    answer = client.get(f"{API}/status/ca-budgets", headers=admin.headers)
    assert answer.status_code == 200, answer.json
    rows = {(r["bucket"], r["subject"]): r for r in answer.json["buckets"]}
    assert rows[(budget.ORDERS_PER_ACCOUNT, "acct-1")]["tokens"] == 3
    assert rows[(budget.ORDERS_PER_ACCOUNT, "acct-1")]["capacity"] == 5
    assert rows[(budget.PACE, "*")]["ca"] == CA

    as_reader = client.get(f"{API}/status/ca-budgets", headers=reader.headers).json
    assert {r["subject"] for r in as_reader["buckets"]} == {None, "*"}

    other = client.get(f"{API}/status/ca-budgets?ca=https://other/dir", headers=admin.headers)
    assert other.status_code == 200 and other.json["buckets"] == []
    bad = client.get(f"{API}/status/ca-budgets?bucket=x", headers=admin.headers)
    assert bad.status_code == 422 and bad.json["code"] == "validation_failed"


def test_ca_budget_cli_and_metric(migrated_db, settings, cap_env, monkeypatch) -> None:
    from click.testing import CliRunner

    from app.cli.main import cli

    for key, value in cap_env.items():
        monkeypatch.setenv(key, value)
    orders = budget.Bucket(CA, budget.ORDERS_PER_ACCOUNT, "acct-9", Limit(4, 60.0))
    assert isinstance(budget.take(migrated_db, [orders]), budget.Grant)
    result = CliRunner().invoke(cli, ["ca", "budgets"])
    assert result.exit_code == 0, result.output
    assert "new_orders_per_account" in result.output and "3/4" in result.output

    tokens.clear_cache()
    client = create_app(settings).test_client()
    text = client.get("/metrics").get_data(as_text=True)
    assert (f'certautopilot_ca_budget_tokens{{bucket="new_orders_per_account",ca="{CA}"}} 3.0'
            in text)
