"""The dashboard through Flask's test client: sign-in sessions, CSRF, scopes and project
isolation, security headers, every page rendering, and actions audited as the API's."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest

from app import create_app
from app import db as dbm
from app.audit import system_actor
from app.dashboard import sessions
from app.domain import certificates, tokens
from app.jobs import enqueue
from tests.helpers.api import make_admin, make_project, make_token

ACTOR = system_actor("cli")
PAGES = ("/dashboard/", "/dashboard/certificates", "/dashboard/jobs", "/dashboard/workers",
         "/dashboard/scheduler", "/dashboard/audit")


@pytest.fixture(autouse=True)
def _stop_keepers():
    from app.dashboard import snapshot

    yield
    snapshot.stop_all()  # the figures' keeper thread a page request started


@pytest.fixture
def world(migrated_db, settings):
    tokens.clear_cache()
    app = create_app(settings)
    db = migrated_db
    a, b = make_project(db, "alpha"), make_project(db, "beta")
    from app.domain import accounts

    account = accounts.create_account(db, a, {"directory_url": "https://127.0.0.1:1/dir",
                                              "terms_agreed": True}, ACTOR, register=False)
    cert = certificates.create_certificate(db, a, {"names": ["a.example.com"],
                                                   "account_id": account["_id"]}, ACTOR)
    job = enqueue(db, "certificates.issue", {"certificate_id": cert["_id"]}, project_id=a,
                  publish=False)
    return {"app": app, "db": db, "a": a, "b": b, "cert": cert, "job": job,
            "admin": make_admin(db), "a_write": make_token(db, a, ["read", "write"]),
            "a_read": make_token(db, a, ["read"]), "b_write": make_token(db, b,
                                                                         ["read", "write"])}


def signed_in(world, tok):
    client = world["app"].test_client()
    response = client.post("/dashboard/signin", data={"token": tok.token,
                                                      "next": "/dashboard/jobs"})
    assert response.status_code == 302, response.data
    assert response.headers["Location"].endswith("/dashboard/jobs")
    return client


def csrf_of(client, path):
    page = client.get(path).get_data(as_text=True)
    found = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert found, page
    return found.group(1)


def test_sign_in_sets_a_strict_http_only_cookie_and_stores_only_a_hash(world) -> None:
    client = world["app"].test_client()
    assert client.get("/dashboard/").status_code == 302  # to the sign-in page
    bad = client.post("/dashboard/signin", data={"token": "cap_" + "x" * 43})
    assert bad.status_code == 401 and "invalid bearer token" in bad.get_data(as_text=True)
    response = client.post("/dashboard/signin", data={"token": world["admin"].token})
    cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/dashboard" in cookie
    assert "Secure" not in cookie  # plain HTTP here; over TLS it is set
    session_id = re.search(r"cap_dashboard=([^;]+)", cookie).group(1)
    stored = list(world["db"][dbm.DASHBOARD_SESSIONS].find())
    assert [s["_id"] for s in stored] == [sessions.session_hash(session_id)]
    assert session_id not in str(stored) and world["admin"].token not in str(stored)
    assert client.get("/dashboard/").status_code == 200
    actions = [e["action"] for e in world["db"][dbm.AUDIT].find({"action": {"$regex": "^dash"}})]
    assert actions == ["dashboard.sign_in"]


def test_a_form_posted_from_another_site_is_refused(world) -> None:
    client = world["app"].test_client()
    refused = client.post("/dashboard/signin", data={"token": world["admin"].token},
                          headers={"Origin": "https://evil.example"})
    assert refused.status_code == 403 and "Set-Cookie" not in refused.headers
    same = client.post("/dashboard/signin", data={"token": world["admin"].token},
                       headers={"Origin": "http://localhost"})
    assert same.status_code == 302


def test_secure_cookie_over_tls(world) -> None:
    client = world["app"].test_client()
    response = client.post("/dashboard/signin", data={"token": world["admin"].token},
                           base_url="https://localhost")
    assert "Secure" in response.headers["Set-Cookie"]


def test_expired_session_and_revoked_token_end_the_session(world) -> None:
    client = signed_in(world, world["admin"])
    assert client.get("/dashboard/").status_code == 200
    world["db"][dbm.DASHBOARD_SESSIONS].update_many(
        {}, {"$set": {"expires_at": dbm.server_now(world["db"]) - timedelta(seconds=1)}})
    assert client.get("/dashboard/").status_code == 302
    client = signed_in(world, world["a_write"])
    tokens.revoke_token(world["db"], world["a_write"].id, actor=ACTOR)
    assert client.get("/dashboard/").status_code == 302


def test_every_page_renders_with_security_headers(world) -> None:
    client = signed_in(world, world["admin"])
    cert, job = world["cert"]["_id"], world["job"]["_id"]
    for path in (*PAGES, f"/dashboard/certificates/{cert}", f"/dashboard/jobs/{job}",
                 "/dashboard/throughput.json",
                 "/dashboard/certificates?name=a.ex&state=pending&expiring_before=2030-01-01",
                 "/dashboard/jobs?state=queued&kind=certificates.issue",
                 "/dashboard/audit?action=certificate.&since=2020-01-01"):
        response = client.get(path)
        assert response.status_code == 200, (path, response.data[:500])
        csp = response.headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert "frame-ancestors 'none'" in csp
        assert response.headers["X-Frame-Options"] == "DENY"
        body = response.get_data(as_text=True)
        assert "<script>" not in body and " style=" not in body and " onclick=" not in body
    assert "a.example.com" in client.get("/dashboard/certificates").get_data(as_text=True)


def test_post_without_csrf_token_is_refused_and_changes_nothing(world) -> None:
    client = signed_in(world, world["a_write"])
    job_id = world["job"]["_id"]
    refused = client.post(f"/dashboard/jobs/{job_id}/cancel", data={"reason": "x"})
    assert refused.status_code == 403 and "CSRF" in refused.get_data(as_text=True)
    wrong = client.post(f"/dashboard/jobs/{job_id}/cancel",
                        data={"reason": "x", "csrf_token": "not-it"})
    assert wrong.status_code == 403
    assert world["db"][dbm.JOBS].find_one({"_id": job_id})["state"] == "queued"
    token = csrf_of(client, f"/dashboard/jobs/{job_id}")
    done = client.post(f"/dashboard/jobs/{job_id}/cancel", data={"reason": "x",
                                                                 "csrf_token": token})
    assert done.status_code == 302
    assert world["db"][dbm.JOBS].find_one({"_id": job_id})["state"] == "cancelled"
    entry = world["db"][dbm.AUDIT].find_one({"action": "job.cancel"})
    assert entry["actor"]["id"] == world["a_write"].id  # audited as the API's own action


def test_project_isolation_is_the_apis(world) -> None:
    client = signed_in(world, world["b_write"])
    cert, job = world["cert"]["_id"], world["job"]["_id"]
    assert client.get(f"/dashboard/certificates/{cert}").status_code == 404
    assert client.get(f"/dashboard/jobs/{job}").status_code == 404
    assert "a.example.com" not in client.get("/dashboard/certificates").get_data(as_text=True)
    assert "a.example.com" not in client.get(
        f"/dashboard/certificates?project={world['a']}").get_data(as_text=True)
    token = csrf_of(client, "/dashboard/")
    refused = client.post(f"/dashboard/certificates/{cert}/issue", data={"csrf_token": token})
    assert refused.status_code == 404


def test_read_only_token_sees_no_buttons_and_is_refused(world) -> None:
    cert = world["cert"]["_id"]
    writer_page = signed_in(world, world["a_write"]).get(f"/dashboard/certificates/{cert}")
    assert 'id="btn-issue"' in writer_page.get_data(as_text=True)
    client = signed_in(world, world["a_read"])
    page = client.get(f"/dashboard/certificates/{cert}").get_data(as_text=True)
    assert "btn-issue" not in page and "btn-renew" not in page and "btn-revoke" not in page
    token = csrf_of(client, "/dashboard/")  # the sign-out form carries it
    before = world["db"][dbm.AUDIT].count_documents({})
    refused = client.post(f"/dashboard/certificates/{cert}/issue", data={"csrf_token": token})
    assert refused.status_code == 403 and "read-only" in refused.get_data(as_text=True)
    assert world["db"][dbm.AUDIT].count_documents({}) == before


@pytest.mark.parametrize("action", ["issue", "renew", "retry", "cancel"])
def test_dashboard_actions_are_audited_as_the_api(world, action) -> None:
    """Exactly the entries the API's route writes, with the token as actor (revoke needs
    a CA: tests/browser revokes against Pebble)."""
    from tests.helpers.audit_walk import AuditProbe

    db = world["db"]
    cert, job = world["cert"]["_id"], world["job"]["_id"]
    if action in ("issue", "renew"):
        db[dbm.JOBS].update_many({}, {"$set": {"state": "succeeded"}})
        page, path = f"/dashboard/certificates/{cert}", f"/dashboard/certificates/{cert}/{action}"
        expected = ["certificate.issue_requested"]
    else:
        if action == "retry":
            db[dbm.JOBS].update_one({"_id": job}, {"$set": {"state": "dead"}})
        page, path = f"/dashboard/jobs/{job}", f"/dashboard/jobs/{job}/{action}"
        expected = [f"job.{action}"]
    client = signed_in(world, world["a_write"])
    token = csrf_of(client, page)
    with AuditProbe(db) as probe:
        response = client.post(path, data={"csrf_token": token, "reason": "walk"})
    assert response.status_code == 302, response.get_data(as_text=True)[:500]
    assert probe.actions == expected
    for entry in probe.entries:
        assert entry["actor"] == {"kind": "token", "id": world["a_write"].id}
    if action in ("issue", "renew"):
        assert probe.entries[0]["details"]["reason"] == (
            "manual" if action == "issue" else "renew_now")
        assert db[dbm.JOBS].count_documents({"state": "queued",
                                             "payload.certificate_id": cert}) == 1
    message = client.get(response.headers["Location"]).get_data(as_text=True)
    assert 'id="flash"' in message


def test_sign_out_needs_csrf_and_ends_the_session(world) -> None:
    client = signed_in(world, world["admin"])
    assert client.post("/dashboard/signout").status_code == 403
    token = csrf_of(client, "/dashboard/")
    assert client.post("/dashboard/signout", data={"csrf_token": token}).status_code == 302
    assert client.get("/dashboard/").status_code == 302
    assert world["db"][dbm.DASHBOARD_SESSIONS].count_documents({}) == 0


def test_windowed_pages_walk_everything_newest_first_without_gaps(migrated_db) -> None:
    from app.dashboard import queries

    db = migrated_db
    now = dbm.server_now(db)
    # Spread over a year, with ties on created_at (the cursor breaks them on _id).
    docs = [{"_id": f"j{i:04d}", "kind": "k", "state": "succeeded" if i % 3 else "dead",
             "created_at": now - timedelta(hours=(i // 2) ** 1.7)} for i in range(130)]
    db["dash_windowed"].insert_many(docs)
    expected = sorted(docs, key=lambda d: (d["created_at"], d["_id"]), reverse=True)
    for query in ({}, {"state": "dead"}):
        seen, cursor = [], None
        while True:
            page = queries.windowed_page(db["dash_windowed"], query, queries.Window(),
                                         limit=20, cursor=cursor)
            seen.extend(d["_id"] for d in page["items"])
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == [d["_id"] for d in expected
                        if all(d[k] == v for k, v in query.items())]


def test_scheduler_standbys_are_shown_apart_from_the_holder(migrated_db) -> None:
    from app.dashboard import queries
    from app.db import schedule

    db = migrated_db
    schedule._noted.clear()
    schedule.note_standby(db, "beat@b:2")
    schedule.note_standby(db, "beat@a:1")
    now = dbm.server_now(db)
    db[dbm.LEASES].insert_one({"_id": "scheduler", "holder": "beat@a:1", "term": 3,
                               "expires_at": now + timedelta(seconds=30), "renewed_at": now})
    found = queries.scheduler(db)
    assert found["lease"]["holder"] == "beat@a:1"
    assert [s["holder"] for s in found["standbys"]] == ["beat@b:2"]
    db[dbm.SCHEDULER_STANDBYS].update_one({"_id": "beat@b:2"}, {"$set": {
        "seen_at": now - timedelta(minutes=5)}})
    assert queries.scheduler(db)["standbys"] == []  # not seen lately: gone


def test_the_dev_banner_url_and_its_admin_token_file_sign_in(world, tmp_path) -> None:
    """``certautopilot dev`` prints ``<base>/dashboard`` and the admin-token file: a
    newcomer opens that URL and pastes the file's content (with its newline)."""
    from devstack import bootstrap

    token_file = bootstrap.ensure_admin_token(world["db"], tmp_path)
    client = world["app"].test_client()
    response = client.get("/dashboard", follow_redirects=True)
    assert response.status_code == 200 and 'id="token"' in response.get_data(as_text=True)
    signed = client.post("/dashboard/signin", data={"token": token_file.read_text()})
    assert signed.status_code == 302, signed.get_data(as_text=True)[:500]
    page = client.get("/dashboard/")
    assert page.status_code == 200
    assert re.search(r'id="who">dev admin · admin<', page.get_data(as_text=True))


def test_the_certificate_page_shows_its_endpoints_and_the_overview_the_ca_budgets(
        world) -> None:
    from app.domain import budget

    db, cert = world["db"], world["cert"]
    certificates.update_certificate(
        db, cert["_id"], {"endpoints": [{"host": "127.0.0.1", "port": 8443}]}, ACTOR,
        project_id=world["a"], expected_version=cert["version"])
    settings = world["app"].extensions["cap_settings"]
    buckets = budget.order_buckets(settings, "https://ca.example/dir", "acct-1",
                                   ["www.example.com"], replaces=False)
    assert not isinstance(budget.take(db, buckets), budget.Refusal)
    client = signed_in(world, world["admin"])
    page = client.get(f"/dashboard/certificates/{cert['_id']}").get_data(as_text=True)
    assert "127.0.0.1:8443" in page and "pending" in page
    overview = client.get("/dashboard/").get_data(as_text=True)
    assert 'id="ca-budgets"' in overview and "new_certificates_per_domain" in overview
    # A project token sees its certificates' endpoints, never the cluster's budgets.
    project = signed_in(world, world["a_write"]).get("/dashboard/").get_data(as_text=True)
    assert 'id="ca-budgets"' not in project
