#!/usr/bin/env python
"""Audit benchmark: what auditing costs a mutation, and how fast `audit verify` walks.

- ``audited_ratio``: ``--writers`` processes (default 8) each make ``--mutations``
  transactions (default 150): read a document, update it, insert an event. The same runs
  once without audit and once with ``app.audit.record()`` in each transaction (its entry
  is chained by the seal after each commit; concurrent sealers conflict on the chain
  head and retry their short transaction). Audited mutations/s divided by unaudited
  mutations/s, plus the retries per audited mutation (of the mutation's transaction, and the
  seal's conflicts) and the 1-writer ratio (no contention) for comparison.
- ``verify_entries_per_s``: a chain of ``--verify-entries`` entries (default 50,000, built
  with ``app.audit.log.build_entry`` exactly as ``record()`` builds them and bulk-inserted)
  walked by ``app.audit.verify.verify_chain`` (what `certautopilot audit verify` runs).
  Target: at least 20,000 entries/s.

Runs on the embedded MongoDB-wire server (started here on a free port, stopped at the
end) unless ``CAP_MONGO_URI`` is set. The last line printed is one JSON object.

    .venv/bin/python scripts/bench/audit.py [--writers 8] [--mutations 150]
        [--verify-entries 50000] [--hmac]
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

HMAC_KEY = "bench-hmac-key-0123456789abcdefghijklmnop"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def writer(uri: str, name: str, worker: int, count: int, audited: bool, hmac: bool,
           start: Any, results: Any) -> None:
    if hmac:
        os.environ["CAP_AUDIT_HMAC_KEY"] = HMAC_KEY
    from app import db as dbm
    from app.audit import record, system_actor
    from app.config import load_settings

    seal_retries = 0

    class CountSealRetries(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            nonlocal seal_retries
            if getattr(record, "event", None) == "audit.seal_conflict":
                seal_retries += 1

    audit_log = logging.getLogger("app.audit")
    audit_log.setLevel(logging.DEBUG)
    audit_log.addHandler(CountSealRetries())
    audit_log.propagate = False
    db = dbm.get_db(load_settings({"CAP_MONGO_URI": uri, "CAP_MONGO_DB": name}))
    actor = system_actor(f"bench{worker}")
    attempts = 0
    start.wait()
    began = time.perf_counter()
    for i in range(count):
        thing = f"w{worker}-{i % 10}"

        def fn(session: Any, thing: str = thing, i: int = i) -> None:
            nonlocal attempts
            attempts += 1
            db["things"].find_one({"_id": thing}, session=session)
            db["things"].update_one({"_id": thing}, {"$inc": {"version": 1}}, upsert=True,
                                    session=session)
            db["events"].insert_one({"thing": thing, "i": i}, session=session)
            if audited:
                record(db, session, actor=actor, action="thing.update",
                       target=f"thing:{thing}", project_id="bench",
                       details={"worker": worker, "i": i})

        dbm.transaction(db, fn)
    results.put((time.perf_counter() - began, attempts, seal_retries))
    dbm.close_clients()


def run_writers(uri: str, name: str, writers: int, count: int, audited: bool,
                hmac: bool) -> tuple[float, float, float]:
    """Mutations per second over all writers, and retries per mutation (its transaction's,
    its seal's)."""
    context = multiprocessing.get_context("spawn")
    start, results = context.Event(), context.Queue()
    procs = [context.Process(target=writer, args=(uri, name, w, count, audited, hmac, start,
                                                  results)) for w in range(writers)]
    for proc in procs:
        proc.start()
    time.sleep(2.0)  # let every process import and connect before the clock starts
    began = time.perf_counter()
    start.set()
    outcomes = [results.get(timeout=1800) for _ in procs]
    elapsed = time.perf_counter() - began
    for proc in procs:
        proc.join(60)
    total = writers * count
    attempts = sum(a for _, a, _ in outcomes)
    seal_retries = sum(r for _, _, r in outcomes)
    return total / elapsed, (attempts - total) / total, seal_retries / total


def build_chain(db: Any, entries: int, hmac: bool) -> None:
    from app import db as dbm
    from app.audit.log import CHAIN_ID, GENESIS_HASH, Actor, build_entry

    key = HMAC_KEY.encode() if hmac else None
    actor = Actor("token", "tok_bench")
    prev, when = GENESIS_HASH, datetime.now(UTC) - timedelta(days=1)
    batch: list[dict[str, Any]] = []
    for seq in range(1, entries + 1):
        entry = build_entry(seq=seq, prev_hash=prev, time=when + timedelta(milliseconds=seq),
                            actor=actor, action="certificate.update",
                            target=f"certificate:crt_{seq % 997:06d}", project_id="prj_bench",
                            details={"names": ["a.example.com", "b.example.com"],
                                     "version": seq, "fields": ["key_type", "names"]},
                            request_id=f"req-{seq}", key=key)
        prev = entry["hash"]
        batch.append(entry)
        if len(batch) == 5000:
            db[dbm.AUDIT].insert_many(batch, ordered=False)
            batch = []
    if batch:
        db[dbm.AUDIT].insert_many(batch, ordered=False)
    db[dbm.COUNTERS].update_one({"_id": CHAIN_ID}, {"$set": {"seq": entries, "hash": prev}},
                                upsert=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--mutations", type=int, default=150, help="per writer")
    parser.add_argument("--verify-entries", type=int, default=50_000)
    parser.add_argument("--hmac", action="store_true", help="chain with CAP_AUDIT_HMAC_KEY")
    args = parser.parse_args()

    from app import db as dbm
    from app.config import load_settings
    from app.migrations import migrate
    from devstack import embedded

    workdir = Path(tempfile.mkdtemp(prefix="cap-bench-audit-"))
    proc = None
    base = os.environ.get("CAP_MONGO_URI")
    if not base:
        proc, base = embedded.start(workdir / "db", embedded.free_port(),
                                    log_path=workdir / "server.log")
    names: list[str] = []

    def fresh() -> tuple[str, Any]:
        name = f"cap_bench_audit_{uuid.uuid4().hex[:8]}"
        names.append(name)
        db = dbm.get_db(load_settings({"CAP_MONGO_URI": base, "CAP_MONGO_DB": name}))
        migrate(db)
        return name, db

    try:
        figures: dict[str, Any] = {"writers": args.writers,
                                   "mutations_per_writer": args.mutations, "hmac": args.hmac}
        for writers, suffix in ((1, "_1_writer"), (args.writers, "")):
            count = args.mutations if writers > 1 else args.mutations * 2
            name, _ = fresh()
            plain, _, _ = run_writers(base, name, writers, count, False, args.hmac)
            name, db = fresh()
            audited, retries, seal_retries = run_writers(base, name, writers, count, True,
                                                         args.hmac)
            seqs = [d["seq"] for d in db[dbm.AUDIT].find({}, {"seq": 1}).sort("seq", 1)]
            assert seqs == list(range(1, writers * count + 1)), "seq has a gap"
            log(f"{writers} writer(s): {plain:.1f} mutations/s unaudited, {audited:.1f} "
                f"audited ({audited / plain:.2f}), {retries:.2f} retries per audited mutation, "
                f"{seal_retries:.2f} seal retries")
            figures[f"unaudited_mutations_per_s{suffix}"] = round(plain, 1)
            figures[f"audited_mutations_per_s{suffix}"] = round(audited, 1)
            figures[f"audited_ratio{suffix}"] = round(audited / plain, 3)
            figures[f"retries_per_audited_mutation{suffix}"] = round(retries, 3)
            figures[f"seal_retries_per_audited_mutation{suffix}"] = round(seal_retries, 3)

        from app.audit.verify import verify_chain

        name, db = fresh()
        log(f"building a chain of {args.verify_entries} entries")
        build_chain(db, args.verify_entries, args.hmac)
        key = HMAC_KEY.encode() if args.hmac else None
        result = verify_chain(db, key=key, use_configured_key=False)  # warm-up run
        assert result.intact and result.checked == args.verify_entries, result.as_dict()
        rates = []
        for _ in range(3):
            result = verify_chain(db, key=key, use_configured_key=False)
            rates.append(result.entries_per_second)
        log(f"verify: {max(rates):,.0f} entries/s (best of 3; runs: "
            f"{', '.join(f'{r:,.0f}' for r in rates)})")
        figures["verify_entries"] = args.verify_entries
        figures["verify_entries_per_s"] = round(max(rates), 1)
        figures["verify_entries_per_s_median"] = round(sorted(rates)[1], 1)
        print(json.dumps(figures))
    finally:
        try:
            client = dbm.get_client(load_settings({"CAP_MONGO_URI": base}))
            for name in names:
                client.drop_database(name)
        finally:
            dbm.close_clients()
            if proc is not None:
                proc.terminate()
                proc.wait(30)
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
