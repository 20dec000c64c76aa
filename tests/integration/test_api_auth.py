"""Tokens, scopes, per-project isolation, the rate limit and the error envelope, through
the real app on the embedded database."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

import pytest

from app import create_app
from app import db as dbm
from app.config import load_settings
from app.domain import tokens
from tests.helpers.api import API, make_admin, make_project, make_token

ENVELOPE = {"code", "status", "message", "errors"}


@pytest.fixture
def client(migrated_db, settings):
    tokens.clear_cache()
    return create_app(settings).test_client()


def test_no_token_bad_token_and_revoked_token_are_401(client, migrated_db) -> None:
    pid = make_project(migrated_db, "alpha")
    good = make_token(migrated_db, pid, ["read"])
    for headers in ({}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer nope"},
                    {"Authorization": "Bearer cap_" + "A" * 43}):
        response = client.get(f"{API}/projects", headers=headers)
        assert response.status_code == 401, headers
        assert set(response.json) == ENVELOPE
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert client.get(f"{API}/projects", headers=good.headers).status_code == 200

    tokens.revoke_token(migrated_db, good.id, actor=make_admin_actor())
    response = client.get(f"{API}/projects", headers=good.headers)
    assert response.status_code == 401
    assert "revoked" in response.json["message"]


def make_admin_actor():
    from app.audit import system_actor

    return system_actor("cli")


def test_expired_token_is_401(client, migrated_db) -> None:
    pid = make_project(migrated_db, "alpha")
    tok = make_token(migrated_db, pid, ["read"])
    migrated_db[dbm.API_TOKENS].update_one(
        {"_id": tok.id}, {"$set": {"expires_at": datetime.now(UTC) - timedelta(minutes=1)}})
    response = client.get(f"{API}/projects", headers=tok.headers)
    assert response.status_code == 401
    assert "expired" in response.json["message"]


def test_token_is_shown_once_and_stored_only_as_a_hash(client, migrated_db) -> None:
    admin = make_admin(migrated_db)
    pid = make_project(migrated_db, "alpha")
    created = client.post(f"{API}/tokens", json={"project_id": pid, "scopes": ["read"]},
                          headers=admin.headers)
    assert created.status_code == 201, created.json
    plaintext = created.json["token"]
    assert plaintext.startswith("cap_") and len(plaintext) == 4 + 43  # 256 bits
    stored = migrated_db[dbm.API_TOKENS].find_one({"_id": created.json["id"]})
    assert stored["token_hash"] == hashlib.sha256(plaintext.encode()).hexdigest()
    dumped = repr(list(migrated_db[dbm.API_TOKENS].find())) + repr(
        list(migrated_db[dbm.AUDIT].find()))
    assert plaintext not in dumped and plaintext[4:] not in dumped
    # Reading it back never shows it again.
    again = client.get(f"{API}/tokens/{created.json['id']}", headers=admin.headers)
    assert again.status_code == 200 and "token" not in again.json
    assert "token_hash" not in again.json
    # And it works.
    response = client.get(f"{API}/projects/{pid}",
                          headers={"Authorization": f"Bearer {plaintext}"})
    assert response.status_code == 200


def test_missing_scope_is_403_and_writes_nothing(client, migrated_db) -> None:
    pid = make_project(migrated_db, "alpha")
    reader = make_token(migrated_db, pid, ["read"])
    audit_before = migrated_db[dbm.AUDIT].count_documents({})
    response = client.post(f"{API}/tokens", json={"scopes": ["read"]}, headers=reader.headers)
    assert response.status_code == 403
    assert response.json["errors"] == {"required_scope": "write"}
    response = client.post(f"{API}/projects", json={"name": "x"}, headers=reader.headers)
    assert response.status_code == 403
    assert migrated_db[dbm.AUDIT].count_documents({}) == audit_before
    assert migrated_db[dbm.PROJECTS].count_documents({}) == 1


def test_a_token_cannot_grant_more_than_it_holds(client, migrated_db) -> None:
    pid = make_project(migrated_db, "alpha")
    writer = make_token(migrated_db, pid, ["read", "write"])
    ok = client.post(f"{API}/tokens", json={"scopes": ["read"]}, headers=writer.headers)
    assert ok.status_code == 201 and ok.json["project_id"] == pid
    for body in ({"scopes": ["keys:export"]}, {"admin": True}):
        response = client.post(f"{API}/tokens", json=body, headers=writer.headers)
        assert response.status_code == 403, body
    response = client.post(f"{API}/tokens", json={"scopes": ["admin"]}, headers=writer.headers)
    assert response.status_code == 422


def test_other_projects_objects_are_404_and_lists_are_scoped(client, migrated_db) -> None:
    admin = make_admin(migrated_db)
    a, b = make_project(migrated_db, "alpha"), make_project(migrated_db, "beta")
    tok_a = make_token(migrated_db, a, ["read", "write"])
    tok_b = make_token(migrated_db, b, ["read", "write"])
    for path in (f"/projects/{a}", f"/tokens/{tok_a.id}", f"/tokens/{admin.id}"):
        response = client.get(API + path, headers=tok_b.headers)
        assert response.status_code == 404, path
        assert set(response.json) == ENVELOPE
    assert client.delete(f"{API}/tokens/{tok_a.id}", headers=tok_b.headers).status_code == 404
    assert client.patch(f"{API}/projects/{a}", json={"description": "x"},
                        headers=tok_b.headers).status_code == 404
    assert client.post(f"{API}/tokens", json={"project_id": a, "scopes": ["read"]},
                       headers=tok_b.headers).status_code == 404
    assert client.get(f"{API}/tokens?project_id={a}", headers=tok_b.headers).status_code == 404

    listed = client.get(f"{API}/projects", headers=tok_b.headers).json["items"]
    assert [p["id"] for p in listed] == [b]
    listed = client.get(f"{API}/tokens", headers=tok_b.headers).json["items"]
    assert {t["id"] for t in listed} == {tok_b.id}
    # The admin sees everything.
    listed = client.get(f"{API}/projects", headers=admin.headers).json["items"]
    assert {p["id"] for p in listed} == {a, b}
    assert client.get(f"{API}/tokens/{tok_a.id}", headers=admin.headers).status_code == 200
    # Still there: B's attempt changed nothing.
    assert migrated_db[dbm.API_TOKENS].find_one({"_id": tok_a.id})["revoked_at"] is None


def test_project_lifecycle_and_audit(client, migrated_db) -> None:
    admin = make_admin(migrated_db)
    created = client.post(f"{API}/projects", json={"name": "payments", "description": "p"},
                          headers=admin.headers)
    assert created.status_code == 201
    pid = created.json["id"]
    dup = client.post(f"{API}/projects", json={"name": "payments"}, headers=admin.headers)
    assert dup.status_code == 409 and set(dup.json) == ENVELOPE
    bad = client.post(f"{API}/projects", json={"name": "Not A Name!"}, headers=admin.headers)
    assert bad.status_code == 422 and "name" in bad.json["errors"]["json"]
    tok = make_token(migrated_db, pid, ["read"])
    assert client.delete(f"{API}/projects/{pid}", headers=admin.headers).status_code == 204
    assert client.get(f"{API}/projects/{pid}", headers=admin.headers).status_code == 404
    # Its tokens went with it.
    tokens.clear_cache()
    assert client.get(f"{API}/projects", headers=tok.headers).status_code == 401
    actions = [e["action"] for e in migrated_db[dbm.AUDIT].find().sort("seq", 1)]
    assert actions[-2:] == ["token.create", "project.delete"]
    assert "project.create" in actions
    entry = migrated_db[dbm.AUDIT].find_one({"action": "project.create",
                                            "target": f"project:{pid}"})
    assert entry["actor"] == {"kind": "token", "id": admin.id}


def test_request_id_is_echoed_and_recorded_in_the_audit_entry(client, migrated_db) -> None:
    admin = make_admin(migrated_db)
    response = client.post(f"{API}/projects", json={"name": "traced"},
                           headers={**admin.headers, "X-Request-ID": "req-12345"})
    assert response.headers["X-Request-ID"] == "req-12345"
    entry = migrated_db[dbm.AUDIT].find_one({"action": "project.create"})
    assert entry["request_id"] == "req-12345"
    # A missing or insane id is replaced by a fresh one.
    response = client.get("/healthz", headers={"X-Request-ID": "bad id <script>"})
    assert len(response.headers["X-Request-ID"]) == 32


def test_rate_limit_is_shared_between_replicas(migrated_db, cap_env) -> None:
    tokens.clear_cache()
    settings = load_settings({**cap_env, "CAP_API_RATE_LIMIT": "6/minute"})
    replica_1 = create_app(settings).test_client()
    replica_2 = create_app(settings).test_client()
    pid = make_project(migrated_db, "alpha")
    tok = make_token(migrated_db, pid, ["read"])
    other = make_token(migrated_db, pid, ["read"])
    statuses = []
    for i in range(10):
        client = replica_1 if i % 2 else replica_2
        statuses.append(client.get(f"{API}/projects", headers=tok.headers).status_code)
    assert statuses.count(200) == 6 and statuses.count(429) == 4, statuses
    limited = replica_1.get(f"{API}/projects", headers=tok.headers)
    assert limited.status_code == 429 and set(limited.json) == ENVELOPE
    assert 1 <= int(limited.headers["Retry-After"]) <= 60
    # Another token has its own budget.
    assert replica_1.get(f"{API}/projects", headers=other.headers).status_code == 200


def test_unreachable_database_is_503_with_retry_after(cap_env) -> None:
    tokens.clear_cache()
    settings = load_settings({**cap_env, "CAP_MONGO_URI": "mongodb://127.0.0.1:1/x",
                              "CAP_MONGO_TIMEOUT_MS": "300"})
    client = create_app(settings).test_client()
    response = client.get(f"{API}/projects",
                          headers={"Authorization": "Bearer cap_" + "B" * 43})
    assert response.status_code == 503
    assert set(response.json) == ENVELOPE
    assert int(response.headers["Retry-After"]) >= 1


def test_bad_input_never_500_and_uses_the_envelope(client, migrated_db) -> None:
    admin = make_admin(migrated_db)
    cases = [
        ("post", f"{API}/projects", {"data": "{not json", "content_type": "application/json"}),
        ("post", f"{API}/projects", {"json": {"name": "ok", "extra": 1}}),
        ("post", f"{API}/projects", {"json": ["a", "list"]}),
        ("get", f"{API}/projects?limit=0", {}),
        ("get", f"{API}/projects?limit=abc", {}),
        ("get", f"{API}/projects?cursor=%%%", {}),
        ("get", f"{API}/projects?cursor=eyJrIjoiX2lkIiwidiI6W119", {}),
        ("post", f"{API}/tokens", {"json": {"scopes": ["read"], "expires_in_days": -1}}),
        ("post", f"{API}/projects", {"json": {"name": "x"},
                                     "headers": {"Idempotency-Key": "a" * 300}}),
        ("put", f"{API}/projects", {}),
        ("post", f"{API}/projects", {"data": b"x" * (2 * 1024 * 1024)}),
    ]
    before = migrated_db[dbm.PROJECTS].count_documents({})
    for method, url, kwargs in cases:
        headers = {**admin.headers, **kwargs.pop("headers", {})}
        response = getattr(client, method)(url, headers=headers, **kwargs)
        assert 400 <= response.status_code < 500, (url, kwargs, response.status_code)
        assert set(response.json) == ENVELOPE, (url, response.json)
    assert migrated_db[dbm.PROJECTS].count_documents({}) == before


def test_probes_metrics_and_spec_need_no_token(client) -> None:
    assert client.get("/healthz").status_code == 200
    assert client.get("/openapi.json").status_code == 200
    assert client.get("/docs").status_code == 200
    metrics = client.get("/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["Content-Type"].startswith("text/plain")
    assert b"certautopilot_database_up 1.0" in metrics.data
