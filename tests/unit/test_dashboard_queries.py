"""How the dashboard's certificate search becomes index ranges (no database)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from app.dashboard import queries
from app.domain.tokens import ADMIN, Principal

pytestmark = pytest.mark.unit

ADMIN_CALLER = Principal("tok_a", None, frozenset({ADMIN}))
PROJECT_CALLER = Principal("tok_p", "prj_1", frozenset({"read"}))


def test_a_name_prefix_is_the_range_up_to_the_next_prefix() -> None:
    query, window = queries.certificate_query(ADMIN_CALLER, {"name": "Host0012*"})
    assert query["names"] == {"$gte": "host0012", "$lt": "host0013"}
    assert window is None  # one index range, not time windows
    assert list(query)[0] == "names"  # the clause the embedded server serves first
    exact, window = queries.certificate_query(ADMIN_CALLER, {"name": "www.example.com."})
    assert exact["names"] == "www.example.com" and window is None
    everything, window = queries.certificate_query(ADMIN_CALLER, {"name": "*"})
    assert "names" not in everything and window == queries.Window(
        first_span=queries.CREATED_FIRST_SPAN)


def test_expiring_before_reads_windows_on_the_expiry_above_a_floor() -> None:
    query, window = queries.certificate_query(ADMIN_CALLER, {"expiring_before": "2030-01-02",
                                                             "state": "issued"})
    assert window == queries.Window("not_after", datetime(2030, 1, 2, tzinfo=UTC),
                                    queries.EXPIRY_FLOOR, queries.EXPIRY_FIRST_SPAN)
    assert "not_after" not in query and query["status"] == "issued"
    with_name, window = queries.certificate_query(ADMIN_CALLER, {
        "expiring_before": "2030-01-02", "name": "a.example"})
    assert window is None and with_name["not_after"] == {"$lt": datetime(2030, 1, 2,
                                                                         tzinfo=UTC)}


def test_a_project_token_searches_its_own_project_only() -> None:
    query, _ = queries.certificate_query(PROJECT_CALLER, {"project": "prj_other"})
    assert query["project_id"] == "prj_1"
    query, _ = queries.certificate_query(ADMIN_CALLER, {"project": "prj_other"})
    assert query["project_id"] == "prj_other"
