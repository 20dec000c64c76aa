"""Emergency and bulk renewal batches, without a CA: selection by issuer, project, expiry
and serials; one job per certificate (through the shared budget when it runs), audited
once for the batch and once per certificate; progress and cancel; bad input (a serial
file with garbage lines, unknown selections, nothing matching) stores and enqueues
nothing. The renewals themselves against Pebble: tests/e2e/test_renewal_batches_e2e.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from click.testing import CliRunner

from app import create_app
from app import db as dbm
from app.audit import system_actor
from app.domain import accounts, certificates, renewal_batches, tokens
from app.errors import Conflict, NotFound, ValidationFailed
from tests.helpers.api import API, make_admin, make_project, make_token

pytestmark = pytest.mark.integration

ACTOR = system_actor("cli")
NOW = datetime(2026, 12, 1, tzinfo=UTC)


def issued(db, project_id, name, *, issuer, serial, days_left):
    cert = certificates.create_certificate(db, project_id, {"names": [name]}, ACTOR)
    db[dbm.CERTIFICATES].update_one({"_id": cert["_id"]}, {"$set": {
        "status": "issued", "certificate_pem": "-----BEGIN CERTIFICATE-----", "serial": serial,
        "issuer": issuer, "not_after": NOW + timedelta(days=days_left)}})
    return cert["_id"]


@pytest.fixture
def fleet(migrated_db):
    a, b = make_project(migrated_db, "alpha"), make_project(migrated_db, "beta")
    for project in (a, b):
        accounts.create_account(migrated_db, project, {
            "directory_url": "https://127.0.0.1:1/dir", "terms_agreed": True}, ACTOR,
            register=False)
    ids = {
        "r11": [issued(migrated_db, a, f"r{i}.example.com", issuer="CN=R11,O=Let's Encrypt",
                       serial=f"{0xA0 + i:x}", days_left=10 + i) for i in range(4)],
        "e5": [issued(migrated_db, b, "e.example.org", issuer="CN=E5,O=Let's Encrypt",
                      serial="fff", days_left=80)],
    }
    return migrated_db, a, b, ids


def audits(db, action):
    return list(db[dbm.AUDIT].find({"action": action}))


def test_a_batch_by_issuer_enqueues_one_job_per_certificate_audited(fleet):
    db, _, _, ids = fleet
    batch = renewal_batches.start_batch(db, {"issuer": "r11"}, ACTOR)
    assert sorted(batch["certificates"]) == sorted(ids["r11"])
    assert batch["counts"] == {"total": 4, "queued": 4, "running": 0, "done": 0,
                               "failed": 0, "cancelled": 0}
    jobs = list(db[dbm.JOBS].find({"payload.batch_id": batch["_id"]}))
    assert sorted(j["payload"]["certificate_id"] for j in jobs) == sorted(ids["r11"])
    assert {j["payload"]["reason"] for j in jobs} == {"emergency"}
    assert len(audits(db, "renewal_batch.create")) == 1
    assert sorted(e["target"] for e in audits(db, "certificate.renew_requested")) == \
        sorted(f"certificate:{c}" for c in ids["r11"])

    # The same certificates again: their renewals are already queued, none is doubled.
    again = renewal_batches.start_batch(db, {"issuer": "R11"}, ACTOR)
    assert db[dbm.JOBS].count_documents({"kind": "certificates.issue"}) == 4
    assert again["counts"]["queued"] == 4

    # Progress comes from the jobs; cancel cancels the queued ones, audited once.
    first = jobs[0]["_id"]
    db[dbm.JOBS].update_one({"_id": first}, {"$set": {"state": "succeeded"}})
    assert renewal_batches.get_batch(db, batch["_id"])["counts"]["done"] == 1
    cancelled = renewal_batches.cancel_batch(db, batch["_id"], ACTOR)
    assert cancelled["state"] == "cancelled"
    assert cancelled["counts"] == {"total": 4, "queued": 0, "running": 0, "done": 1,
                                   "failed": 0, "cancelled": 3}
    assert cancelled["finished"] is True
    assert len(audits(db, "renewal_batch.cancel")) == 1


def test_selection_by_expiry_project_and_serials(fleet):
    db, a, b, ids = fleet
    soon = renewal_batches.start_batch(db, {"expiring_before": NOW + timedelta(days=12)},
                                       ACTOR)
    assert sorted(soon["certificates"]) == sorted(ids["r11"][:2])
    by_serial = renewal_batches.start_batch(db, {"serials": ["0F:FF", "dead"]}, ACTOR)
    assert by_serial["certificates"] == ids["e5"]
    assert by_serial["unmatched_serials"] == ["dead"]
    with pytest.raises(NotFound):  # a project token cannot reach another project
        renewal_batches.start_batch(db, {"project_id": b}, ACTOR, project_id=a)
    with pytest.raises(NotFound):
        renewal_batches.get_batch(db, by_serial["_id"], project_id=a)


@pytest.mark.parametrize("selector, fragment", [
    ({}, "say which certificates"),
    ({"owner": "x"}, "unknown selection 'owner'"),
    ({"all": True, "issuer": "R11"}, "'all' cannot be combined"),
    ({"serials": ["0a", "zz-top"]}, "item 1"),
    ({"issuer": "Nobody CA"}, "no live issued certificate matches"),
])
def test_bad_selections_store_and_enqueue_nothing(fleet, selector, fragment):
    db = fleet[0]
    before = db[dbm.AUDIT].count_documents({})
    # Nothing matching is the fleet's state (409), the others bad input (422).
    with pytest.raises((ValidationFailed, Conflict)) as err:
        renewal_batches.start_batch(db, selector, ACTOR)
    assert fragment in str(err.value.message) or fragment in str(err.value.errors)
    assert db[dbm.JOBS].count_documents({}) == 0
    assert db[dbm.RENEWAL_BATCHES].count_documents({}) == 0
    assert db[dbm.AUDIT].count_documents({}) == before


def test_cli_serial_file_with_garbage_lines_is_refused_by_line(fleet, cap_env, monkeypatch,
                                                              tmp_path):
    from app.cli.main import cli

    db = fleet[0]
    for key, value in cap_env.items():
        monkeypatch.setenv(key, value)
    notice = tmp_path / "notice.txt"
    notice.write_text("# serials from the CA's notice\na0\n\nnot a serial\nA1\n12:zz\n")
    result = CliRunner().invoke(cli, ["renewals", "renew", "--serial-file", str(notice)])
    assert result.exit_code == 1
    assert "line 4" in result.output and "2 bad line(s)" in result.output
    assert db[dbm.JOBS].count_documents({}) == 0
    assert db[dbm.RENEWAL_BATCHES].count_documents({}) == 0

    notice.write_text("# serials from the CA's notice\na0\n\nA1\n")
    result = CliRunner().invoke(cli, ["renewals", "renew", "--serial-file", str(notice)])
    assert result.exit_code == 0, result.output
    assert "2 certificates" in result.output
    batch_id = result.output.split()[1]
    shown = CliRunner().invoke(cli, ["renewals", "show", batch_id])
    assert shown.exit_code == 0 and "queued 2" in shown.output


def test_api_start_read_cancel(fleet, settings):
    db, a, b, ids = fleet
    tokens.clear_cache()
    client = create_app(settings).test_client()
    writer = make_token(db, a, ["read", "write"])
    started = client.post(f"{API}/renewals", json={"issuer": "R11"}, headers=writer.headers)
    assert started.status_code == 201, started.json
    assert started.json["counts"]["queued"] == 4 and started.json["project_id"] == a
    batch_id = started.json["id"]
    read = client.get(f"{API}/renewals/{batch_id}", headers=writer.headers)
    assert read.status_code == 200 and read.json["counts"]["total"] == 4
    other = make_token(db, b, ["read", "write"])
    assert client.get(f"{API}/renewals/{batch_id}", headers=other.headers).status_code == 404
    # A project token sees only its project's certificates, whatever the issuer.
    none = client.post(f"{API}/renewals", json={"issuer": "R11"}, headers=other.headers)
    assert none.status_code == 409 and "nothing was enqueued" in none.json["message"]
    bad = client.post(f"{API}/renewals", json={"serials": ["xyz"]}, headers=writer.headers)
    assert bad.status_code == 422
    cancel = client.post(f"{API}/renewals/{batch_id}/cancel", headers=writer.headers)
    assert cancel.status_code == 200 and cancel.json["counts"]["cancelled"] == 4
    admin = make_admin(db)
    every = client.post(f"{API}/renewals", json={"all": True}, headers=admin.headers)
    assert every.status_code == 201 and every.json["counts"]["total"] == 5
