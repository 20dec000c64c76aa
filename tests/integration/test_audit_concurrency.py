"""8 processes making 2,000 audited mutations at once: the seq has no gap, every
mutation has exactly its one entry, and the chain verifies."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

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
