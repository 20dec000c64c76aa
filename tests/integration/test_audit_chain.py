"""The audit hash chain: record() in the mutation's transaction, and `audit verify`
naming each kind of tampering (edit, delete, insert, swap)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from click.testing import CliRunner

from app import db as dbm
from app.audit import record, system_actor
from app.audit.log import CHAIN_ID, GENESIS_HASH, seal
from app.audit.status import audit_metrics
from app.audit.verify import verify_chain

ACTOR = system_actor("test")
KEY = "k" * 40


def mutate(db: Any, n: int, *, start: int = 0) -> list[int]:
    """n audited mutations: each inserts a thing and records it, in one transaction; the
    seq each entry got (chained when its transaction committed)."""
    seqs = []
    for i in range(start, start + n):
        def fn(session: Any, i: int = i) -> Any:
            db["things"].insert_one({"_id": f"t{i}"}, session=session)
            return record(db, session, actor=ACTOR, action="thing.create",
                          target=f"thing:t{i}", project_id="p1",
                          details={"i": i, "names": ["a.example", "b.example"]})
        entry_id = dbm.transaction(db, fn)
        seqs.append(db[dbm.AUDIT].find_one({"_id": entry_id})["seq"])
    assert db[dbm.AUDIT_PENDING].count_documents({"refused": {"$exists": False}}) == 0
    return seqs


def record_unsealed(db: Any, target: str) -> Any:
    """An audited mutation whose process dies between its commit and its seal: the
    transaction commits by hand, so no after-commit seal runs."""
    with db.client.start_session() as session:
        session.start_transaction()
        db["things"].insert_one({"_id": target}, session=session)
        entry_id = record(db, session, actor=ACTOR, action="thing.create",
                          target=f"thing:{target}")
        session.commit_transaction()
    return entry_id


def shift(db: Any, from_seq: int, by: int) -> None:
    """Renumber entries with seq >= from_seq (highest first, around the unique index)."""
    docs = list(db[dbm.AUDIT].find({"seq": {"$gte": from_seq}}, {"seq": 1}))
    docs.sort(key=lambda d: d["seq"], reverse=by > 0)
    for doc in docs:
        db[dbm.AUDIT].update_one({"_id": doc["_id"]}, {"$set": {"seq": doc["seq"] + by}})


def swap(db: Any, a: int, b: int) -> None:
    audit = db[dbm.AUDIT]
    audit.update_one({"seq": a}, {"$set": {"seq": -1}})
    audit.update_one({"seq": b}, {"$set": {"seq": a}})
    audit.update_one({"seq": -1}, {"$set": {"seq": b}})


def problem(db: Any, **kwargs: Any) -> tuple[str, int]:
    result = verify_chain(db, **kwargs)
    assert not result.intact and result.problem is not None
    return result.problem.kind, result.problem.seq


def test_each_mutation_gets_the_next_seq_and_the_chain_verifies(migrated_db: Any) -> None:
    db = migrated_db
    assert mutate(db, 12) == list(range(1, 13))
    entries = list(db[dbm.AUDIT].find().sort("seq", 1))
    assert [e["seq"] for e in entries] == list(range(1, 13))
    assert entries[0]["prev_hash"] == GENESIS_HASH
    assert all(b["prev_hash"] == a["hash"] for a, b in zip(entries, entries[1:], strict=False))
    first = entries[0]
    assert first["actor"]["kind"] == "system" and first["actor"]["id"].startswith("test@")
    assert (first["action"], first["target"], first["project_id"]) == \
        ("thing.create", "thing:t0", "p1")
    assert first["details"] == {"i": 0, "names": ["a.example", "b.example"]}
    assert first["hash_alg"] == "sha256"
    head = db[dbm.COUNTERS].find_one({"_id": CHAIN_ID})
    assert head["seq"] == 12 and head["hash"] == entries[-1]["hash"]
    result = verify_chain(db)
    assert result.intact and result.checked == 12 and result.last_seq == 12


def test_an_aborted_mutation_leaves_no_entry_and_no_gap(migrated_db: Any) -> None:
    db = migrated_db
    mutate(db, 2)

    def failing(session: Any) -> None:
        record(db, session, actor=ACTOR, action="thing.create", target="thing:x")
        raise RuntimeError("the mutation fails after auditing")

    with pytest.raises(RuntimeError):
        dbm.transaction(db, failing)
    assert mutate(db, 1, start=10) == [3]
    assert db[dbm.AUDIT].count_documents({}) == 3
    assert verify_chain(db).intact


def test_an_entry_left_pending_is_chained_by_the_next_seal(migrated_db: Any) -> None:
    db = migrated_db
    mutate(db, 2)
    left = [record_unsealed(db, "dead1"), record_unsealed(db, "dead2")]
    assert db[dbm.AUDIT_PENDING].count_documents({}) == 2
    assert db[dbm.AUDIT].count_documents({}) == 2
    result = verify_chain(db)
    assert result.intact and result.pending == 2 and result.checked == 2
    metrics = {s.name: s.value for m in audit_metrics(db) for s in m.samples}
    assert metrics["certautopilot_audit_pending_entries"] == 2
    assert metrics["certautopilot_audit_oldest_pending_seconds"] >= 0
    assert "waiting to be chained" in result.notes[-1]
    # The next audited mutation's seal chains them first (oldest _id first), then its own.
    assert mutate(db, 1, start=5) == [5]
    assert [db[dbm.AUDIT].find_one({"_id": i})["seq"] for i in left] == [3, 4]
    assert seal(db) == 0
    result = verify_chain(db)
    assert result.intact and result.checked == 5 and result.pending == 0


def test_the_audit_forward_job_seals_what_a_dead_writer_left(migrated_db: Any) -> None:
    from types import SimpleNamespace

    from app.audit.jobs import forward

    db = migrated_db
    record_unsealed(db, "dead")
    ctx = SimpleNamespace(db=db, settings=SimpleNamespace(audit_sinks=[]), lease_seconds=60,
                          job_id="j1", check_lease=lambda: None)
    assert forward(ctx) == {"sealed": 1, "sinks": {}}
    assert db[dbm.AUDIT].find_one({"target": "thing:dead"})["seq"] == 1


def test_a_pending_entry_forged_without_the_key_is_refused_and_named(
        migrated_db: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Someone who can write to the database but does not hold CAP_AUDIT_HMAC_KEY cannot
    get an entry chained by putting it in audit_pending."""
    from bson import ObjectId

    db = migrated_db
    monkeypatch.setenv("CAP_AUDIT_HMAC_KEY", KEY)
    mutate(db, 2)
    forged = dict(db[dbm.AUDIT].find_one({"seq": 2}), _id=ObjectId(), target="thing:forged",
                  mac="0" * 64)
    for name in ("seq", "prev_hash", "hash"):
        forged.pop(name)
    db[dbm.AUDIT_PENDING].insert_one(forged)
    assert seal(db) == 0
    assert db[dbm.AUDIT].count_documents({"target": "thing:forged"}) == 0
    assert "HMAC does not match" in db[dbm.AUDIT_PENDING].find_one()["refused"]
    assert problem(db) == ("refused", 3)
    assert mutate(db, 1, start=7) == [3]  # the chain goes on past it


def test_overlapping_audited_transactions_do_not_conflict(migrated_db: Any) -> None:
    """Two mutations whose transactions overlap both commit at their first attempt: only
    the sealer's short transactions touch the chain head."""
    from pymongo import ReadPreference
    from pymongo.read_concern import ReadConcern

    db = migrated_db
    db["things"].insert_many([{"_id": "a"}, {"_id": "b"}])
    with db.client.start_session() as one, db.client.start_session() as two:
        for session, name in ((one, "a"), (two, "b")):
            session.start_transaction(read_concern=ReadConcern("snapshot"),
                                      read_preference=ReadPreference.PRIMARY)
            db["things"].update_one({"_id": name}, {"$set": {"v": 1}}, session=session)
            record(db, session, actor=ACTOR, action="thing.update", target=f"thing:{name}")
        one.commit_transaction()
        two.commit_transaction()
    assert seal(db) == 2
    assert sorted(e["target"] for e in db[dbm.AUDIT].find()) == ["thing:a", "thing:b"]
    assert verify_chain(db).intact


def test_record_refuses_to_run_outside_a_transaction(migrated_db: Any) -> None:
    db = migrated_db
    with db.client.start_session() as session, pytest.raises(RuntimeError):
        record(db, session, actor=ACTOR, action="thing.create", target="thing:1")
    assert db[dbm.AUDIT].count_documents({}) == 0
    assert db[dbm.AUDIT_PENDING].count_documents({}) == 0


def test_empty_chain_is_intact(migrated_db: Any) -> None:
    result = verify_chain(migrated_db)
    assert result.intact and result.checked == 0


def test_edit_a_field_is_named(migrated_db: Any) -> None:
    db = migrated_db
    mutate(db, 10)
    db[dbm.AUDIT].update_one({"seq": 6}, {"$set": {"details.i": 99}})
    assert problem(db) == ("edited", 6)


def test_edit_with_a_recomputed_hash_is_named(migrated_db: Any) -> None:
    from app.audit.verify import compute_hash

    db = migrated_db
    mutate(db, 10)
    doc = db[dbm.AUDIT].find_one({"seq": 4})
    doc["target"] = "thing:forged"
    db[dbm.AUDIT].update_one({"seq": 4}, {"$set": {"target": "thing:forged",
                                                    "hash": compute_hash(doc, None)}})
    assert problem(db) == ("edited", 4)


def test_delete_an_entry_is_named(migrated_db: Any) -> None:
    db = migrated_db
    mutate(db, 10)
    db[dbm.AUDIT].delete_one({"seq": 5})
    kind, seq = problem(db)
    assert (kind, seq) == ("deleted", 5)


def test_delete_the_last_entry_is_named(migrated_db: Any) -> None:
    db = migrated_db
    mutate(db, 10)
    db[dbm.AUDIT].delete_one({"seq": 10})
    assert problem(db) == ("deleted", 10)


def test_delete_and_renumber_is_named(migrated_db: Any) -> None:
    db = migrated_db
    mutate(db, 10)
    db[dbm.AUDIT].delete_one({"seq": 5})
    shift(db, 6, -1)
    kind, seq = problem(db)
    assert (kind, seq) == ("deleted", 5)


def test_insert_an_entry_is_named(migrated_db: Any) -> None:
    """A forged entry slipped in at seq 5, the rest renumbered to make room."""
    from app.audit.log import build_entry

    db = migrated_db
    mutate(db, 10)
    shift(db, 5, +1)
    before = db[dbm.AUDIT].find_one({"seq": 4})
    forged = build_entry(seq=5, prev_hash=before["hash"], time=before["time"], actor=ACTOR,
                         action="thing.delete", target="thing:t1", project_id="p1",
                         details={}, request_id=None, key=None)
    db[dbm.AUDIT].insert_one(forged)
    assert problem(db) == ("inserted", 5)


def test_insert_an_entry_with_a_bad_hash_is_named(migrated_db: Any) -> None:
    db = migrated_db
    mutate(db, 10)
    shift(db, 5, +1)
    db[dbm.AUDIT].insert_one({"seq": 5, "action": "thing.delete", "hash": "f" * 64,
                              "prev_hash": "e" * 64, "time": None})
    assert problem(db) == ("inserted", 5)


def test_append_beyond_the_head_is_named(migrated_db: Any) -> None:
    from app.audit.log import build_entry

    db = migrated_db
    mutate(db, 10)
    last = db[dbm.AUDIT].find_one({"seq": 10})
    db[dbm.AUDIT].insert_one(build_entry(
        seq=11, prev_hash=last["hash"], time=last["time"], actor=ACTOR, action="thing.delete",
        target="thing:t1", project_id=None, details={}, request_id=None, key=None))
    assert problem(db) == ("inserted", 11)


@pytest.mark.parametrize(("a", "b"), [(3, 8), (6, 7)])
def test_swap_two_entries_is_named(migrated_db: Any, a: int, b: int) -> None:
    db = migrated_db
    mutate(db, 10)
    swap(db, a, b)
    assert problem(db) == ("reordered", a)


def test_hmac_chain_needs_the_key(migrated_db: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    db = migrated_db
    monkeypatch.setenv("CAP_AUDIT_HMAC_KEY", KEY)
    mutate(db, 5)
    assert {e["hash_alg"] for e in db[dbm.AUDIT].find()} == {"hmac-sha256"}
    assert verify_chain(db).intact
    assert problem(db, key=b"another key that is long enough!!") == ("edited", 1)
    monkeypatch.delenv("CAP_AUDIT_HMAC_KEY")
    assert problem(db) == ("key-missing", 1)


def test_hmac_stops_a_writer_without_the_key(migrated_db: Any,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Rewriting an entry and recomputing a plain SHA-256 chain does not pass."""
    from app.audit.verify import compute_hash

    db = migrated_db
    monkeypatch.setenv("CAP_AUDIT_HMAC_KEY", KEY)
    mutate(db, 5)
    prev = GENESIS_HASH
    for doc in db[dbm.AUDIT].find().sort("seq", 1):
        doc["hash_alg"] = "sha256"
        doc["prev_hash"] = prev
        prev = compute_hash(doc, None)
        db[dbm.AUDIT].update_one({"_id": doc["_id"]}, {"$set": {
            "hash_alg": "sha256", "prev_hash": doc["prev_hash"], "hash": prev}})
    db[dbm.COUNTERS].update_one({"_id": CHAIN_ID}, {"$set": {"hash": prev}})
    assert problem(db) == ("unkeyed", 1)


def test_a_chain_older_than_the_key(migrated_db: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    db = migrated_db
    mutate(db, 3)
    monkeypatch.setenv("CAP_AUDIT_HMAC_KEY", KEY)
    mutate(db, 3, start=3)
    assert problem(db) == ("unkeyed", 1)
    result = verify_chain(db, allow_unkeyed_prefix=True)
    assert result.intact and result.unkeyed == 3 and result.checked == 6


def test_verify_from_a_seq(migrated_db: Any) -> None:
    db = migrated_db
    mutate(db, 10)
    db[dbm.AUDIT].update_one({"seq": 2}, {"$set": {"details.i": 99}})
    assert problem(db) == ("edited", 2)
    result = verify_chain(db, from_seq=3)
    assert result.intact and result.checked == 8


def test_cli_verify_exit_codes_and_json(migrated_db: Any, cap_env: dict[str, str]) -> None:
    from app.cli import cli

    db = migrated_db
    mutate(db, 6)
    runner = CliRunner()
    ok = runner.invoke(cli, ["audit", "verify"])
    assert ok.exit_code == 0, ok.output
    assert "intact: 6 entries" in ok.output
    as_json = runner.invoke(cli, ["audit", "verify", "--json"])
    assert as_json.exit_code == 0
    body = json.loads(as_json.stdout)
    assert body["intact"] is True and body["checked"] == 6

    swap(db, 2, 5)
    broken = runner.invoke(cli, ["audit", "verify"])
    assert broken.exit_code == 1
    assert "BROKEN at seq 2: reordered" in broken.output
    body = json.loads(runner.invoke(cli, ["audit", "verify", "--json"]).stdout)
    assert body["intact"] is False
    assert body["problem"]["seq"] == 2 and body["problem"]["kind"] == "reordered"
    later = runner.invoke(cli, ["audit", "verify", "--from", "6"])
    assert later.exit_code == 0, later.output


@pytest.mark.parametrize("max_pending", [50_000, 1])
def test_entries_stored_out_of_order_still_verify(migrated_db: Any, max_pending: int,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """verify reads in storage order for speed: an entry rewritten verbatim (it moves to
    the end of the collection) is put back in its place, or the walk falls back to the
    index order when too many stragglers pile up."""
    from app.audit import verify

    db = migrated_db
    mutate(db, 10)
    for seq in (3, 1):
        doc = db[dbm.AUDIT].find_one({"seq": seq})
        db[dbm.AUDIT].delete_one({"_id": doc["_id"]})
        db[dbm.AUDIT].insert_one(doc)
    monkeypatch.setattr(verify._Walk, "MAX_PENDING", max_pending)
    result = verify_chain(db)
    assert result.intact and result.checked == 10
    swap(db, 4, 9)
    assert problem(db) == ("reordered", 4)


def test_the_audit_collection_never_expires_entries(migrated_db: Any) -> None:
    """Retention: after every migration, no TTL index and no capped collection."""
    db = migrated_db
    for name, info in db[dbm.AUDIT].index_information().items():
        assert "expireAfterSeconds" not in info, name
    assert not db[dbm.AUDIT].options().get("capped")
    assert info is not None and "seq_unique" in db[dbm.AUDIT].index_information()
