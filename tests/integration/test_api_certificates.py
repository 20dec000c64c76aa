"""Certificates through the API: CRUD with filters, ETags, PEM downloads, private-key
export (scope, audit, no caching), and isolation between projects.

The issued state (PEMs, sealed key) is written the way the worker stores it, with a
self-signed certificate and a key sealed by app.keys; the real issuance against Pebble
is covered by the ACME and end-to-end tests."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from app import create_app
from app import db as dbm
from app.domain import tokens
from tests.helpers.api import API, make_admin, make_project, make_token

ENVELOPE = {"code", "status", "message", "errors"}


@pytest.fixture
def client(migrated_db, settings):
    tokens.clear_cache()
    return create_app(settings).test_client()


@pytest.fixture
def world(client, migrated_db):
    """Two projects, each with an ACME account and tokens of every kind."""
    admin = make_admin(migrated_db)
    out = {"admin": admin}
    for name in ("alpha", "beta"):
        pid = make_project(migrated_db, name)
        rw = make_token(migrated_db, pid, ["read", "write"])
        account = client.post(f"{API}/acme-accounts", headers=rw.headers, json={
            "directory_url": "https://127.0.0.1:1/dir", "contact": ["ops@example.com"],
            "terms_agreed": True, "register": False})
        assert account.status_code == 201, account.json
        out[name] = {
            "project": pid, "rw": rw, "account": account.json["id"],
            "ro": make_token(migrated_db, pid, ["read"]),
            "keys": make_token(migrated_db, pid, ["read", "keys:export"]),
        }
    return out


def create_cert(client, tok, names, **extra):
    response = client.post(f"{API}/certificates", headers=tok.headers,
                           json={"names": names, "issue": False, **extra})
    assert response.status_code == 201, response.json
    return response.json


def issue_in_db(db, cert_id: str, project_id: str, days: int = 90) -> str:
    """Store an issued certificate and its sealed key, as the worker does."""
    from app.keys import seal_private_key

    key = ec.generate_private_key(ec.SECP256R1())
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test")])
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=days))
            .sign(key, hashes.SHA256()))
    leaf = cert.public_bytes(serialization.Encoding.PEM).decode()
    key_id = seal_private_key(db, key_pem, project_id=project_id, purpose="certificate")
    db[dbm.CERTIFICATES].update_one({"_id": cert_id}, {
        "$set": {"status": "issued", "certificate_pem": leaf, "chain_pem": leaf,
                 "fullchain_pem": leaf + leaf, "key_id": key_id, "not_before": now,
                 "not_after": now + dt.timedelta(days=days), "serial": "abc"},
        "$inc": {"version": 1}})
    return key_pem.decode()


def test_create_read_list_with_filters(client, world, migrated_db) -> None:
    a = world["alpha"]
    one = create_cert(client, a["rw"], ["www.example.com", "example.com"], key_type="ec384")
    two = create_cert(client, a["rw"], ["api.example.com"])
    assert one["status"] == "pending" and one["project_id"] == a["project"]
    issue_in_db(migrated_db, one["id"], a["project"], days=10)
    issue_in_db(migrated_db, two["id"], a["project"], days=80)
    create_cert(client, world["beta"]["rw"], ["beta.example.com"])

    got = client.get(f"{API}/certificates/{one['id']}", headers=a["ro"].headers)
    assert got.status_code == 200 and got.json["names"] == ["www.example.com", "example.com"]
    assert "certificate_pem" not in got.json and "key_id" not in got.json

    def ids(query: str) -> set[str]:
        response = client.get(f"{API}/certificates{query}", headers=a["ro"].headers)
        assert response.status_code == 200, response.json
        return {c["id"] for c in response.json["items"]}

    assert ids("") == {one["id"], two["id"]}
    assert ids("?name=example.com") == {one["id"]}
    assert ids("?status=issued") == {one["id"], two["id"]}
    assert ids("?status=pending") == set()
    soon = (dt.datetime.now(dt.UTC) + dt.timedelta(days=30)).isoformat()
    assert ids(f"?expiring_before={soon.replace('+', '%2B')}") == {one["id"]}
    assert client.get(f"{API}/certificates?status=bogus",
                      headers=a["ro"].headers).status_code == 422


def test_etag_if_none_match_and_if_match(client, world) -> None:
    a = world["alpha"]
    cert = create_cert(client, a["rw"], ["etag.example.com"])
    first = client.get(f"{API}/certificates/{cert['id']}", headers=a["ro"].headers)
    etag = first.headers["ETag"]
    cached = client.get(f"{API}/certificates/{cert['id']}",
                        headers={**a["ro"].headers, "If-None-Match": etag})
    assert cached.status_code == 304 and cached.headers["ETag"] == etag and not cached.data

    stale = client.patch(f"{API}/certificates/{cert['id']}", json={"name": "renamed"},
                         headers={**a["rw"].headers, "If-Match": '"not-the-etag"'})
    assert stale.status_code == 412 and set(stale.json) == ENVELOPE
    changed = client.patch(f"{API}/certificates/{cert['id']}", json={"name": "renamed"},
                           headers={**a["rw"].headers, "If-Match": etag})
    assert changed.status_code == 200 and changed.json["name"] == "renamed"
    assert changed.headers["ETag"] != etag
    # The old ETag no longer matches: a full answer again, and a change with it is 412.
    again = client.get(f"{API}/certificates/{cert['id']}",
                       headers={**a["ro"].headers, "If-None-Match": etag})
    assert again.status_code == 200 and again.headers["ETag"] == changed.headers["ETag"]
    assert client.delete(f"{API}/certificates/{cert['id']}",
                         headers={**a["rw"].headers, "If-Match": etag}).status_code == 412
    assert client.delete(f"{API}/certificates/{cert['id']}",
                         headers=a["rw"].headers).status_code == 204
    assert client.get(f"{API}/certificates/{cert['id']}",
                      headers=a["ro"].headers).status_code == 404


def test_pem_downloads(client, world, migrated_db) -> None:
    a = world["alpha"]
    cert = create_cert(client, a["rw"], ["pem.example.com"])
    assert client.get(f"{API}/certificates/{cert['id']}/fullchain.pem",
                      headers=a["ro"].headers).status_code == 409
    issue_in_db(migrated_db, cert["id"], a["project"])
    doc = migrated_db[dbm.CERTIFICATES].find_one({"_id": cert["id"]})
    for part, field in (("leaf", "certificate_pem"), ("chain", "chain_pem"),
                        ("fullchain", "fullchain_pem")):
        response = client.get(f"{API}/certificates/{cert['id']}/{part}.pem",
                              headers=a["ro"].headers)
        assert response.status_code == 200
        assert response.mimetype == "application/pem-certificate-chain"
        assert response.data.decode() == doc[field]
        cached = client.get(f"{API}/certificates/{cert['id']}/{part}.pem",
                            headers={**a["ro"].headers,
                                     "If-None-Match": response.headers["ETag"]})
        assert cached.status_code == 304


def test_private_key_export_needs_the_scope_is_audited_and_never_cached(
        client, world, migrated_db) -> None:
    a, b = world["alpha"], world["beta"]
    cert = create_cert(client, a["rw"], ["key.example.com"])
    key_pem = issue_in_db(migrated_db, cert["id"], a["project"])
    url = f"{API}/certificates/{cert['id']}/private-key"

    def exports() -> int:
        return migrated_db[dbm.AUDIT].count_documents(
            {"action": "certificate.private_key_export"})

    for tok in (a["rw"], a["ro"]):
        denied = client.get(url, headers=tok.headers)
        assert denied.status_code == 403 and denied.json["errors"] == {
            "required_scope": "keys:export"}
        assert key_pem.encode() not in denied.data
    assert client.get(url, headers=b["keys"].headers).status_code == 404
    assert client.get(url).status_code == 401
    assert exports() == 0

    response = client.get(url, headers={**a["keys"].headers, "X-Request-ID": "export-1"})
    assert response.status_code == 200
    assert response.data.decode() == key_pem
    assert "no-store" in response.headers["Cache-Control"]
    assert response.headers["Pragma"] == "no-cache"
    assert "ETag" not in response.headers
    entry = migrated_db[dbm.AUDIT].find_one({"action": "certificate.private_key_export"})
    assert entry["actor"] == {"kind": "token", "id": a["keys"].id}
    assert entry["target"] == f"certificate:{cert['id']}"
    assert entry["request_id"] == "export-1"
    assert "PRIVATE KEY" not in repr(entry)
    # An admin can export too (and is audited as well).
    assert client.get(url, headers=world["admin"].headers).status_code == 200
    assert exports() == 2


def test_other_projects_certificates_are_404(client, world) -> None:
    a, b = world["alpha"], world["beta"]
    cert = create_cert(client, a["rw"], ["iso.example.com"])
    base = f"{API}/certificates/{cert['id']}"
    calls = [("get", base, None), ("patch", base, {"name": "x"}), ("delete", base, None),
             ("post", base + "/issue", None), ("post", base + "/renew", None),
             ("post", base + "/revoke", {}), ("get", base + "/leaf.pem", None),
             ("get", base + "/chain.pem", None), ("get", base + "/fullchain.pem", None)]
    for method, url, body in calls:
        kwargs = {"json": body} if body is not None else {}
        response = getattr(client, method)(url, headers=b["rw"].headers, **kwargs)
        assert response.status_code == 404, (method, url, response.json)
    listed = client.get(f"{API}/certificates", headers=b["rw"].headers).json["items"]
    assert cert["id"] not in {c["id"] for c in listed}
    # A project token cannot create in another project.
    response = client.post(f"{API}/certificates", headers=b["rw"].headers,
                           json={"names": ["x.example.com"], "project_id": a["project"]})
    assert response.status_code == 404
    # The admin must say which project (its token implies none).
    response = client.post(f"{API}/certificates", headers=world["admin"].headers,
                           json={"names": ["x.example.com"], "issue": False})
    assert response.status_code == 403 and "project_id" in response.json["errors"]
    assert response.json["code"] == "project_required"


def test_invalid_certificate_input_is_422_and_stores_nothing(client, world,
                                                             migrated_db) -> None:
    a = world["alpha"]
    for body in ({"names": []}, {"names": ["not a name"]}, {"names": ["a.example.com"],
                                                           "key_type": "dsa"},
                 {"names": ["*.example.com"], "challenge": {"type": "tls-alpn-01"}},
                 {"names": ["*.example.com"], "challenge": {"type": "http-01"}},
                 {"names": ["a.example.com"], "endpoints": [{"host": "a b", "port": 1}]},
                 {"names": ["a.example.com"], "challenge": {"type": "dns-01",
                                                           "provider": "cloudflare",
                                                           "options": {"auth_token": "x"}}}):
        response = client.post(f"{API}/certificates", headers=a["rw"].headers, json=body)
        assert response.status_code == 422, (body, response.json)
        assert set(response.json) == ENVELOPE
    # A valid request naming an account the project does not have: a conflict with the
    # stored state, not bad input (the schema cannot know the accounts).
    response = client.post(f"{API}/certificates", headers=a["rw"].headers,
                           json={"names": ["a.example.com"], "account_id": "acc_missing"})
    assert response.status_code == 409 and "account_id" in response.json["errors"]
    assert migrated_db[dbm.CERTIFICATES].count_documents({}) == 0


def test_internationalised_names_are_taken_beyond_the_schemas_ascii_pattern(
        client, world) -> None:
    """The schema states ASCII names (a pattern cannot judge IDNA); the API still takes an
    IDN as Unicode or as its A-labels, stores the A-labels, and refuses broken A-labels."""
    rw = world["alpha"]["rw"]
    created = create_cert(client, rw, ["bücher.example", "xn--caf-dma.example"])
    assert created["names"] == ["xn--bcher-kva.example", "xn--caf-dma.example"]
    broken = client.post(f"{API}/certificates", headers=rw.headers,
                         json={"names": ["xn--zz-.example"], "issue": False})
    assert broken.status_code in (400, 422) and "IDNA" in str(broken.json)


def test_ipv6_addresses_and_absolute_names_are_taken_as_the_cli_takes_them(
        client, world) -> None:
    """The API takes what the CLI takes: an IPv6 address (http-01, RFC 8738) stored
    compressed, and a name with its final dot stored without it; a tls-alpn-01 one
    still refuses an address, naming the field."""
    rw = world["alpha"]["rw"]
    created = create_cert(client, rw, ["2001:DB8:0:0::1", "www.example.com."])
    assert created["names"] == ["2001:db8::1", "www.example.com"]
    refused = client.post(f"{API}/certificates", headers=rw.headers, json={
        "names": ["2001:db8::2"], "issue": False,
        "challenge": {"type": "tls-alpn-01"}})
    assert refused.status_code in (400, 422) and "names" in str(refused.json)


def test_a_create_retried_after_its_first_requests_process_died_answers_with_that_certificate(
        client, migrated_db, world) -> None:
    """kill -9 of the api after the create committed, before the answer was stored: the
    retry takes the key over and gets the certificate the dead request made, not a second
    certificate (nor a second first issuance)."""
    from app.api.idempotency import IDEMPOTENCY

    a = world["alpha"]
    headers = {**a["rw"].headers, "Idempotency-Key": "cert-owner-died"}
    body = {"names": ["Died.Example.com"], "issue": True}
    first = client.post(f"{API}/certificates", headers=headers, json=body)
    assert first.status_code == 201, first.json
    record = migrated_db[IDEMPOTENCY].find_one({})
    # The state the dead process left: committed, its answer not stored, lease lapsed.
    migrated_db[IDEMPOTENCY].update_one({"_id": record["_id"]}, {
        "$set": {"state": "running", "owner": "vm:1:dead",
                 "lease_until": dbm.server_now(migrated_db) - dt.timedelta(seconds=1)},
        "$unset": {"status": "", "body": "", "headers": ""}})
    retry = client.post(f"{API}/certificates", headers=headers, json=body)
    assert retry.status_code == 201 and "Idempotent-Replayed" not in retry.headers
    assert retry.json["id"] == first.json["id"]
    assert retry.headers["ETag"] == first.headers["ETag"]
    assert migrated_db[dbm.CERTIFICATES].count_documents({"project_id": a["project"]}) == 1
    assert migrated_db[dbm.JOBS].count_documents(
        {"payload.certificate_id": first.json["id"]}) == 1
    assert migrated_db[IDEMPOTENCY].find_one({})["state"] == "done"
    # Without a takeover the key is not looked up: another key makes another certificate.
    other = client.post(f"{API}/certificates", json=body,
                        headers={**a["rw"].headers, "Idempotency-Key": "another"})
    assert other.status_code == 201 and other.json["id"] != first.json["id"]
    # The stored reservation is not part of the answer.
    assert "request_key" not in first.json and "request_key" not in other.json
