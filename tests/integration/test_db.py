"""The client factory, retries and transactions against the embedded server."""

import time

import pytest
from pymongo.errors import AutoReconnect, OperationFailure

from app import db as dbm
from app.config import load_settings
from app.errors import DatabaseUnavailable


def test_writes_are_majority_even_when_the_uri_omits_it(db) -> None:
    assert db.write_concern.document == {"w": "majority"}
    assert dbm.primary(db).read_preference.mongos_mode == "primary"


def test_transaction_commits_atomically_and_aborts_on_error(db) -> None:
    def both(session):
        db.a.insert_one({"_id": 1}, session=session)
        db.b.insert_one({"_id": 1}, session=session)

    dbm.transaction(db, both)
    assert db.a.count_documents({}) == 1 and db.b.count_documents({}) == 1

    def failing(session):
        db.a.insert_one({"_id": 2}, session=session)
        raise ValueError("boom")

    with pytest.raises(ValueError):
        dbm.transaction(db, failing)
    assert db.a.count_documents({"_id": 2}) == 0


def test_retry_retries_transient_errors_then_succeeds() -> None:
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise AutoReconnect("connection reset")
        return "ok"

    assert dbm.retry(flaky, base=0.001) == "ok"
    assert len(calls) == 3


def test_retry_does_not_retry_a_real_error() -> None:
    calls = []

    def bad():
        calls.append(1)
        raise OperationFailure("bad query", code=2)

    with pytest.raises(OperationFailure):
        dbm.retry(bad)
    assert len(calls) == 1


def test_failpoint_not_writable_primary_is_retried(db) -> None:
    db.client.admin.command({"configureFailPoint": "failCommand", "mode": {"times": 2},
                             "data": {"failCommands": ["insert"], "errorCode": 10107}})
    try:
        dbm.retry(lambda: db.c.insert_one({"x": 1}), base=0.001)
    finally:
        db.client.admin.command({"configureFailPoint": "failCommand", "mode": "off"})
    assert db.c.count_documents({}) == 1


def test_unreachable_database_fails_fast_and_clearly() -> None:
    settings = load_settings({"CAP_MONGO_URI": "mongodb://127.0.0.1:1/x?replicaSet=rs0",
                              "CAP_MONGO_TIMEOUT_MS": "500"})
    started = time.monotonic()
    with pytest.raises(DatabaseUnavailable) as info:
        dbm.ping(dbm.get_db(settings))
    assert time.monotonic() - started < 10
    assert "unreachable" in str(info.value)


def test_server_now_is_the_servers_clock(db) -> None:
    now = dbm.server_now(db)
    assert now.tzinfo is not None
    assert abs(now.timestamp() - time.time()) < 5
