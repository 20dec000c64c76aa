"""The scheduler lease, one test per step, on the embedded MongoDB-wire server.

Expiry is decided on the server's clock with plain query operators: the tests below that
take over an expired lease, and refuse an unexpired one, fail if the comparison is wrong
(e.g. ``$$NOW`` in an expression, which the embedded server evaluates as "equal").
"""

from __future__ import annotations

import time
from datetime import timedelta

import pymongo
import pytest

from app import db as dbm
from app.db.names import SCHEDULER_LEASE_ID
from app.db.schedule import lease_status
from app.errors import DatabaseUnavailable
from devstack import embedded
from scheduler.lease import Deposed, Lease, LeaseConfig, process_identity

CFG = LeaseConfig(lease_seconds=15, renew_seconds=5, retry_seconds=2)


def lease_doc(db):
    return dbm.primary(db)[dbm.LEASES].find_one({"_id": SCHEDULER_LEASE_ID})


def expire_now(db) -> None:
    """Move the stored expiry into the past on the server's clock (time passing)."""
    past = dbm.server_now(db) - timedelta(seconds=1)
    db[dbm.LEASES].update_one({"_id": SCHEDULER_LEASE_ID}, {"$set": {"expires_at": past}})


def test_acquire_takes_a_free_lease_with_expiry_on_the_server_clock(db) -> None:
    lease = Lease(db, CFG, "a")
    before = dbm.server_now(db, fresh=True)  # as the scheduler's lease reads it
    assert lease.acquire()
    after = dbm.server_now(db, fresh=True)
    doc = lease_doc(db)
    assert doc["holder"] == "a" and doc["term"] == 1 and lease.term == 1
    assert before + timedelta(seconds=15) <= doc["expires_at"] <= after + timedelta(seconds=15)
    assert before <= doc["renewed_at"] <= after
    assert lease.held()
    assert 13.5 < lease.seconds_left() <= 15
    assert lease_status(db)["state"] == "held"


def test_contended_acquire_fails_while_the_holder_is_unexpired(db) -> None:
    a, b = Lease(db, CFG, "a"), Lease(db, CFG, "b")
    assert a.acquire()
    # Only a short time left, but not expired on the server's clock: still a's.
    soon = dbm.server_now(db) + timedelta(seconds=3)
    db[dbm.LEASES].update_one({"_id": SCHEDULER_LEASE_ID}, {"$set": {"expires_at": soon}})
    assert not b.acquire()
    assert b.term is None and not b.held()
    doc = lease_doc(db)
    assert (doc["holder"], doc["term"], doc["expires_at"]) == ("a", 1, soon)


def test_expired_lease_is_taken_over_with_a_higher_term(db) -> None:
    a, b = Lease(db, CFG, "a"), Lease(db, CFG, "b")
    assert a.acquire()
    expire_now(db)
    assert b.acquire()
    assert b.term == 2 and lease_doc(db)["holder"] == "b"
    # The former holder cannot renew what it lost, and knows it.
    assert not a.renew()
    assert a.term is None and not a.held()
    assert lease_doc(db)["holder"] == "b"


def test_term_rises_at_every_change_of_holder(db) -> None:
    a, b = Lease(db, CFG, "a"), Lease(db, CFG, "b")
    terms = []
    assert a.acquire()
    terms.append(a.term)
    assert a.release()
    assert b.acquire()
    terms.append(b.term)
    expire_now(db)
    assert a.acquire()
    terms.append(a.term)
    assert terms == [1, 2, 3]


def test_renew_extends_the_lease_and_keeps_the_term(db) -> None:
    lease = Lease(db, CFG, "a")
    assert lease.acquire()
    first = lease_doc(db)
    shorter = dbm.server_now(db) + timedelta(seconds=2)
    db[dbm.LEASES].update_one({"_id": SCHEDULER_LEASE_ID}, {"$set": {"expires_at": shorter}})
    assert lease.renew()
    doc = lease_doc(db)
    assert doc["term"] == first["term"] == lease.term
    assert doc["expires_at"] > shorter + timedelta(seconds=10)
    assert doc["renewed_at"] >= first["renewed_at"]


def test_renew_of_an_expired_lease_fails_even_if_nobody_took_it(db) -> None:
    lease = Lease(db, CFG, "a")
    assert lease.acquire()
    expire_now(db)
    assert not lease.renew()
    assert lease.term is None
    # ...but it may take the lease again, as a new term.
    assert lease.acquire() and lease.term == 2


def test_release_frees_the_lease_for_the_standby_at_once(db) -> None:
    a, b = Lease(db, CFG, "a"), Lease(db, CFG, "b")
    assert a.acquire()
    assert not b.acquire()
    assert a.release()
    doc = lease_doc(db)
    assert doc["holder"] is None and doc["released_by"] == "a"
    assert lease_status(db)["state"] == "released"
    assert b.acquire() and b.term == 2


def test_release_by_a_deposed_holder_does_not_touch_the_new_lease(db) -> None:
    a, b = Lease(db, CFG, "a"), Lease(db, CFG, "b")
    assert a.acquire()
    expire_now(db)
    assert b.acquire()
    assert not a.release()
    assert lease_doc(db)["holder"] == "b"


def test_an_acquisition_a_signal_cut_short_is_still_released_by_holder(db) -> None:
    """SIGTERM between the server granting the lease and the process recording its term:
    the exit still frees the document that names this process, and no one else's."""
    a, b = Lease(db, CFG, "a"), Lease(db, CFG, "b")
    assert a.acquire()
    a.forget()  # the answer never reached the process
    assert not b.release_unrecorded()  # b's identity is not on the document
    assert lease_doc(db)["holder"] == "a"
    assert a.release_unrecorded()
    doc = lease_doc(db)
    assert doc["holder"] is None and doc["released_by"] == "a"
    assert b.acquire() and b.term == 2
    assert not a.release_unrecorded()  # b holds it now


def test_fence_refuses_a_deposed_leader_inside_the_transaction(db) -> None:
    a, b = Lease(db, CFG, "a"), Lease(db, CFG, "b")
    assert a.acquire()

    def write(session):
        a.fence(session, dbm.server_now(db))
        db["fenced_writes"].insert_one({"by": "a"}, session=session)

    dbm.transaction(db, write)
    assert db["fenced_writes"].count_documents({}) == 1
    expire_now(db)
    assert b.acquire()
    # a still believes it holds the lease (its local proof has not run out): a paused
    # leader waking up. The server refuses its write all the same.
    assert a.held()
    with pytest.raises(Deposed):
        dbm.transaction(db, write)
    assert db["fenced_writes"].count_documents({}) == 1


def test_fence_conflicts_with_a_concurrent_takeover(db) -> None:
    """A takeover committed after the fenced transaction read its snapshot aborts it."""
    a, b = Lease(db, CFG, "a"), Lease(db, CFG, "b")
    assert a.acquire()
    attempts = []

    def write(session):
        attempts.append(1)
        if len(attempts) == 1:
            # b takes over between the transaction's start and its fence.
            db[dbm.LEASES].find_one({"_id": SCHEDULER_LEASE_ID}, session=session)
            expire_now(db)
            assert b.acquire()
        a.fence(session, dbm.server_now(db))
        db["fenced_writes"].insert_one({"by": "a"}, session=session)

    with pytest.raises(Deposed):
        dbm.transaction(db, write)
    # The first attempt hit a write conflict and was retried; the retry saw b's term.
    assert len(attempts) == 2
    assert db["fenced_writes"].count_documents({}) == 0


def test_store_unreachable_raises_database_unavailable_quickly(tmp_path) -> None:
    port = embedded.free_port()  # nothing listens there
    client = pymongo.MongoClient(f"mongodb://127.0.0.1:{port}/?replicaSet=rs0",
                                 serverSelectionTimeoutMS=300, connectTimeoutMS=300,
                                 tz_aware=True)
    try:
        lease = Lease(client.get_database("x"), CFG, "a")
        with pytest.raises(DatabaseUnavailable):
            lease.acquire()
        assert lease.term is None and not lease.held()
    finally:
        client.close()


def test_process_identity_is_stable_within_a_process() -> None:
    assert process_identity() == process_identity()
    assert process_identity().split(":")[1].isdigit()


def test_takeover_ends_a_lapsed_holder_paused_inside_a_fenced_transaction(db) -> None:
    """A holder paused (SIGSTOP, GC, VM freeze) after its fence wrote the lease document
    holds a write lock on it. Once the lease has expired, the standby ends the holder's
    recorded session: the takeover is not blocked, and the paused commit fails."""
    short = LeaseConfig(lease_seconds=1.0, renew_seconds=0.3, retry_seconds=0.2)
    a, b = Lease(db, short, "a"), Lease(db, short, "b")
    with db.client.start_session() as session:
        assert a.acquire(session.session_id)
        session.start_transaction()
        a.fence(session, dbm.server_now(db))
        db["fenced_writes"].insert_one({"by": "a"}, session=session)
        # ...a is paused here, its transaction open, and its lease runs out.
        time.sleep(1.2)
        started = time.monotonic()
        assert b.acquire()
        assert time.monotonic() - started < 10
        assert lease_doc(db)["holder"] == "b" and b.term == 2
        # a wakes up and commits: refused, nothing it wrote survives.
        with pytest.raises(pymongo.errors.OperationFailure):
            session.commit_transaction()
    assert db["fenced_writes"].count_documents({}) == 0


def test_a_locked_lease_of_a_live_holder_is_not_taken(db) -> None:
    """The holder in the middle of a fenced transaction (normal operation): the standby's
    attempt gives up after a bounded wait and leaves the holder alone."""
    a, b = Lease(db, CFG, "a"), Lease(db, CFG, "b")
    with db.client.start_session() as session:
        assert a.acquire(session.session_id)
        session.start_transaction()
        a.fence(session, dbm.server_now(db))
        started = time.monotonic()
        assert not b.acquire()
        assert time.monotonic() - started < 10
        session.commit_transaction()
    assert lease_doc(db)["holder"] == "a" and lease_doc(db)["term"] == 1
