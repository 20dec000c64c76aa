"""The whole path with real processes: the scheduler leader enqueues ``audit.forward``
every 10 s, a Celery worker runs it, and a TCP syslog receiver gets every audit entry in
order, including entries written while the stack runs."""

from __future__ import annotations

from typing import Any

from app import db as dbm
from app.audit.forward import SINKS
from devstack.embedded import free_port
from tests.helpers import wait_for
from tests.integration.test_audit_chain import mutate
from tests.integration.test_audit_forward import SyslogReceiver, in_order_and_complete


def test_scheduler_and_worker_forward_the_audit_log(migrated_db: Any, cap_env: dict[str, str],
                                                    procs: Any) -> None:
    db = migrated_db
    receiver = SyslogReceiver(free_port())
    receiver.start()
    try:
        env = dict(cap_env, CAP_AUDIT_SINKS=f"syslog+tcp://127.0.0.1:{receiver.port}"
                                            "?batch=25&name=siem")
        mutate(db, 40)
        scheduler = procs.scheduler(env)
        worker = procs.worker(env)
        wait_for(lambda: receiver.seqs()[-1:] == [40], timeout=120, interval=0.5,
                 message="the first 40 entries at the receiver\n" + scheduler.log()[-3000:]
                 + worker.log()[-3000:])
        mutate(db, 15, start=40)
        wait_for(lambda: receiver.seqs()[-1:] == [55], timeout=60, interval=0.5,
                 message="entries written while the stack runs")
        in_order_and_complete(receiver.seqs(), 55)  # at least once, in order
        # The sink's cursor moves after the receiver has the batch (at least once), so
        # the receiver can hold entry 55 a moment before the cursor says so.
        wait_for(lambda: (db[SINKS].find_one({"_id": "siem"}) or {}).get("cursor") == 55,
                 timeout=30, interval=0.2, message="the sink's cursor at 55")
        state = db[SINKS].find_one({"_id": "siem"})
        assert state["consecutive_failures"] == 0
        # Forwarded by the scheduler's timed jobs, run by the worker. One job may carry
        # both rounds: a run keeps sending while entries arrive, so no count beyond one,
        # and that job may still be finishing when the cursor moves.
        wait_for(lambda: db[dbm.JOBS].count_documents({"kind": "audit.forward",
                                                       "state": "succeeded"}) >= 1,
                 timeout=60, interval=0.5, message="a succeeded audit.forward job")
        assert scheduler.alive() and worker.alive()
    finally:
        procs.stop_all()
        receiver.stop()
