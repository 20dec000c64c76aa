"""8 processes making 2,000 audited mutations at once: the seq has no gap, every
mutation has exactly its one entry, and the chain verifies."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from app import db as dbm
from app.audit.verify import verify_chain

PROCESSES = 8
PER_PROCESS = 250

WRITER = """
import sys
from app import db as dbm
from app.audit import record, system_actor
from app.config import load_settings

worker, count = int(sys.argv[1]), int(sys.argv[2])
db = dbm.get_db(load_settings())
actor = system_actor(f"writer{worker}")
for i in range(count):
    thing = f"w{worker}-{i}"
    def fn(session, thing=thing):
        db["things"].update_one({"_id": thing}, {"$inc": {"version": 1}}, upsert=True,
                                session=session)
        record(db, session, actor=actor, action="thing.update", target=f"thing:{thing}",
               details={"worker": worker, "i": i})
    dbm.transaction(db, fn)
dbm.close_clients()
"""


def test_concurrent_writers_leave_a_gap_free_verifiable_chain(migrated_db: Any,
                                                              cap_env: dict[str, str]) -> None:
    db = migrated_db
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(n), str(PER_PROCESS)],
                                env=cap_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
               for n in range(PROCESSES)]
    outputs = []
    for proc in writers:
        out, _ = proc.communicate(timeout=280)
        outputs.append((proc.returncode, out.decode(errors="replace")[-2000:]))
    assert all(code == 0 for code, _ in outputs), outputs

    total = PROCESSES * PER_PROCESS
    seqs = sorted(d["seq"] for d in db[dbm.AUDIT].find({}, {"seq": 1}))
    assert seqs == list(range(1, total + 1))
    targets = [d["target"] for d in db[dbm.AUDIT].find({}, {"target": 1})]
    assert len(set(targets)) == total  # one entry per mutation, none twice
    assert db["things"].count_documents({"version": 1}) == total
    result = verify_chain(db)
    assert result.intact, result.problem
    assert result.checked == total


def _long_audited_transaction(db: Any, *, hold: bool, attempts: int) -> None:
    """An issuance-like transaction: several writes over about a second, one entry."""
    import time

    from app.audit import hold_chain, record, system_actor

    def fn(session: Any) -> None:
        if hold:
            hold_chain(db, session)
        for step in range(5):
            db["long"].update_one({"_id": "long"}, {"$set": {"step": step}}, upsert=True,
                                  session=session)
            time.sleep(0.2)
        record(db, session, actor=system_actor("long"), action="thing.long",
               target="thing:long")

    dbm.txn.run(db, fn, attempts=attempts, what="long audited transaction")


def test_a_long_audited_transaction_commits_under_a_stream_of_short_audited_writes(
        migrated_db: Any) -> None:
    """Short audited writes commit all the time (API traffic). A long transaction that
    writes the chain head only at its end loses every attempt to them; holding the head
    first (``hold_chain``) makes the short ones wait instead, and it commits."""
    import threading

    from app.audit import record, system_actor
    from app.errors import DatabaseUnavailable

    db = migrated_db
    stop = threading.Event()
    short: dict[str, int] = {"ok": 0, "gave_up": 0}

    def writer() -> None:
        actor = system_actor("short")
        while not stop.is_set():
            def fn(session: Any) -> None:
                record(db, session, actor=actor, action="thing.short", target="thing:s")
            try:
                dbm.transaction(db, fn)
                short["ok"] += 1
            except DatabaseUnavailable:
                short["gave_up"] += 1
            stop.wait(0.02)  # API traffic, a few dozen audited writes a second

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        with pytest.raises(DatabaseUnavailable):  # starved: every attempt lost at its end
            _long_audited_transaction(db, hold=False, attempts=3)
        # holding first: an attempt can only lose at its first write, to a short one
        # holding the head for a moment; it retries without having done any work
        _long_audited_transaction(db, hold=True, attempts=12)
    finally:
        stop.set()
        thread.join(30)
    assert short["ok"] > 10
    assert db[dbm.AUDIT].count_documents({"action": "thing.long"}) == 1
    result = verify_chain(db)
    assert result.intact, result.problem
