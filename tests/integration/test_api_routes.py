"""Every API route, walked from the app's URL map: no token → 401; a token lacking the
route's scope → 403; a token of another project → 404 for anything of this project; and
none of those changes anything. A new route without a declared scope, or with a path
parameter this walk does not know, fails here."""

from __future__ import annotations

import re

import pytest

from app import create_app
from app import db as dbm
from app.api.auth import ADMIN, KEYS_EXPORT, READ, WRITE
from app.api.common import API_PREFIX
from app.audit import system_actor
from app.domain import accounts, certificates, tokens
from tests.helpers.api import make_admin, make_project, make_token

METHODS = ("GET", "POST", "PATCH", "PUT", "DELETE")

# A valid body per route, so that what is checked is authorization, not validation.
BODIES = {
    ("POST", "/api/v1/projects"): {"name": "newproject"},
    ("PATCH", "/api/v1/projects/<project_id>"): {"description": "x"},
    ("POST", "/api/v1/tokens"): {"scopes": ["read"]},
    ("POST", "/api/v1/certificates"): {"names": ["new.example.com"], "issue": False},
    ("PATCH", "/api/v1/certificates/<certificate_id>"): {"name": "renamed"},
    ("POST", "/api/v1/certificates/<certificate_id>/revoke"): {"reason_code": 0},
    ("POST", "/api/v1/acme-accounts"): {"directory_url": "https://127.0.0.1:1/dir",
                                        "register": False},
    ("PATCH", "/api/v1/acme-accounts/<account_id>"): {"terms_agreed": True},
    ("POST", "/api/v1/jobs/<job_id>/cancel"): {"reason": "walk"},
    ("POST", "/api/v1/renewals"): {"issuer": "Pebble"},
    ("POST", "/api/v1/alert-channels"): {"name": "walk", "url": "smtps://mail.example.com",
                                         "to": ["ops@example.com"]},
}
# Collection routes whose body may name a project: another project's is 404.
CREATE_IN_PROJECT = {"/api/v1/tokens", "/api/v1/certificates", "/api/v1/acme-accounts",
                     "/api/v1/renewals", "/api/v1/alert-channels"}
# Routes that are the same for every project (no project-owned object in them).
GLOBAL = {"/api/v1/status/scheduler", "/api/v1/status/workers", "/api/v1/status/ca-budgets"}


@pytest.fixture
def world(migrated_db, settings):
    tokens.clear_cache()
    app = create_app(settings)
    db = migrated_db
    actor = system_actor("cli")
    a, b = make_project(db, "alpha"), make_project(db, "beta")
    account = accounts.create_account(db, a, {"directory_url": "https://127.0.0.1:1/dir",
                                              "terms_agreed": True}, actor, register=False)
    cert = certificates.create_certificate(db, a, {"names": ["a.example.com"]}, actor)
    ids = {"project_id": a, "certificate_id": cert["_id"], "account_id": account["_id"],
           "token_id": make_token(db, a, ["read"], name="victim").id}
    try:
        from app.jobs import enqueue

        ids["job_id"] = str(enqueue(db, "certificates.issue",
                                    {"certificate_id": cert["_id"]}, project_id=a,
                                    publish=False)["_id"])
    except ImportError:
        pass
    from app.domain import orders

    order = orders.new_order_doc(
        certificate=cert, account=account, job_id=ids.get("job_id"), reason="initial",
        identifiers=[{"type": "dns", "value": "a.example.com"}], key_type="ec256",
        key_id="k", csr_pem="", challenge={"type": "http-01"}, profile=None, replaces=None,
        attempt=1)
    orders.insert(db, order)
    ids["order_id"] = order["_id"]
    ids["batch_id"] = "6b0000000000000000000001"
    db[dbm.RENEWAL_BATCHES].insert_one({
        "_id": ids["batch_id"], "project_id": a, "selector": {"all": True},
        "reason": "emergency", "state": "active", "total": 0, "items": []})
    ids["channel_id"] = _channel(db, a, "mail")
    full = [READ, WRITE, KEYS_EXPORT]
    return {
        "client": app.test_client(), "app": app, "ids": ids, "a": a, "b": b,
        "admin": make_admin(db),
        "b_full": make_token(db, b, full, name="other project"),
        "lacking": {READ: make_token(db, a, [WRITE, KEYS_EXPORT]),
                    WRITE: make_token(db, a, [READ, KEYS_EXPORT]),
                    KEYS_EXPORT: make_token(db, a, [READ, WRITE]),
                    ADMIN: make_token(db, a, full)},
    }


def _channel(db, project_id: str, name: str) -> str:
    from app.ops.alerts import channels, engine

    return channels.create_channel(db, project_id, {
        "name": name, "url": "smtps://mail.example.com", "to": ["ops@example.com"]},
        system_actor("cli"), rule_names=engine.RULES)["_id"]


def api_routes(app):
    found = []
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith(API_PREFIX):
            continue
        for method in sorted(rule.methods & set(METHODS)):
            view = app.view_functions[rule.endpoint]
            fn = getattr(view.view_class, method.lower())
            plain = re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"<\1>", rule.rule)  # drop converters
            found.append((method, plain, getattr(fn, "_cap_scope", None)))
    return found


def url_for(rule: str, ids: dict[str, str]) -> str:
    def fill(match: re.Match[str]) -> str:
        name = match.group(1)
        assert name in ids, f"the route walk does not know path parameter {name!r}"
        return ids[name]

    return re.sub(r"<([^>]+)>", fill, rule)


def call(client, method: str, rule: str, url: str, headers: dict[str, str]):
    body = BODIES.get((method, rule))
    kwargs = {"json": body} if body is not None else {}
    if method in ("POST", "PATCH", "PUT") and body is None:
        kwargs = {"json": {}}
    return client.open(url, method=method, headers=headers, **kwargs)


def test_every_api_route_declares_a_scope(world) -> None:
    routes = api_routes(world["app"])
    assert len(routes) >= 25, routes
    missing = [(m, r) for m, r, s in routes if s is None]
    assert not missing, f"routes without @scope(...): {missing}"


def test_every_route_without_a_token_is_401_and_changes_nothing(world, migrated_db) -> None:
    audit_before = migrated_db[dbm.AUDIT].count_documents({})
    for method, rule, _ in api_routes(world["app"]):
        url = url_for(rule, world["ids"])
        for headers in ({}, {"Authorization": "Bearer cap_" + "x" * 43}):
            response = call(world["client"], method, rule, url, headers)
            assert response.status_code == 401, (method, url, response.json)
            assert response.json["code"] == "unauthorized"
    assert migrated_db[dbm.AUDIT].count_documents({}) == audit_before


def test_every_route_with_a_token_lacking_its_scope_is_403(world, migrated_db) -> None:
    audit_before = migrated_db[dbm.AUDIT].count_documents({})
    for method, rule, needed in api_routes(world["app"]):
        url = url_for(rule, world["ids"])
        response = call(world["client"], method, rule, url, world["lacking"][needed].headers)
        assert response.status_code == 403, (method, url, needed, response.json)
        assert response.json["errors"] == {"required_scope": needed}
    assert migrated_db[dbm.AUDIT].count_documents({}) == audit_before


def test_every_route_with_another_projects_token_is_404(world, migrated_db) -> None:
    audit_before = migrated_db[dbm.AUDIT].count_documents({})
    other = world["b_full"].headers
    a_ids = set(world["ids"].values())
    checked = 0
    for method, rule, needed in api_routes(world["app"]):
        url = url_for(rule, world["ids"])
        if needed == ADMIN:
            # Admin routes refuse every project token, whatever the project.
            assert call(world["client"], method, rule, url, other).status_code == 403
            continue
        if rule in GLOBAL:
            continue
        if "<" in rule:
            response = call(world["client"], method, rule, url, other)
            assert response.status_code == 404, (method, url, response.json)
            assert response.json["code"] == "not_found"
            checked += 1
        elif method == "GET":
            response = world["client"].get(url, headers=other)
            assert response.status_code == 200, (url, response.json)
            assert not a_ids & {item.get("id") for item in response.json["items"]}, url
            if rule != "/api/v1/projects":  # every other list filters by project_id
                assert world["client"].get(f"{url}?project_id={world['a']}",
                                           headers=other).status_code == 404, url
            checked += 1
        elif method == "POST" and rule in CREATE_IN_PROJECT:
            body = {**BODIES[(method, rule)], "project_id": world["a"]}
            response = world["client"].post(url, headers=other, json=body)
            assert response.status_code == 404, (url, response.json)
            checked += 1
    assert checked >= 20
    assert migrated_db[dbm.AUDIT].count_documents({}) == audit_before
    # And the owner still reaches every object.
    owner = make_token(migrated_db, world["a"], [READ]).headers
    for name, path in (("certificate_id", "certificates"), ("account_id", "acme-accounts"),
                       ("order_id", "orders"), ("token_id", "tokens"),
                       ("job_id", "jobs")):
        if name in world["ids"]:
            response = world["client"].get(f"{API_PREFIX}/{path}/{world['ids'][name]}",
                                           headers=owner)
            assert response.status_code == 200, (path, response.json)


def test_every_successful_mutation_writes_exactly_one_audit_entry(world, migrated_db) -> None:
    """Each mutating route, called successfully, adds one audit entry naming the token."""
    client, admin = world["client"], world["admin"]
    owner = make_token(migrated_db, world["a"], [READ, WRITE, KEYS_EXPORT])
    ids = world["ids"]
    empty = make_project(migrated_db, "empty")
    spare_cert = certificates.create_certificate(
        migrated_db, world["a"], {"names": ["spare.example.com"]}, system_actor("cli"))
    spare_account = accounts.create_account(
        migrated_db, world["a"], {"directory_url": "https://127.0.0.1:1/other",
                                  "terms_agreed": True}, system_actor("cli"), register=False)
    from app.jobs import enqueue

    dead = enqueue(migrated_db, "certificates.issue", {"certificate_id": "x"},
                   project_id=world["a"], publish=False)
    migrated_db[dbm.JOBS].update_one({"_id": dead["_id"]}, {"$set": {"state": "dead"}})
    steps = [
        ("POST", "/api/v1/projects", admin, {"name": "another"}, "project.create"),
        ("PATCH", "/api/v1/projects/<project_id>", owner, {"description": "d"},
         "project.update"),
        ("DELETE", "/api/v1/projects/<project_id>", admin, None, "project.delete",
         {"project_id": empty}),
        ("POST", "/api/v1/tokens", owner, {"scopes": ["read"]}, "token.create"),
        ("DELETE", "/api/v1/tokens/<token_id>", owner, None, "token.revoke"),
        ("POST", "/api/v1/acme-accounts", owner,
         {"directory_url": "https://127.0.0.1:1/third", "register": False},
         "acme_account.create"),
        ("PATCH", "/api/v1/acme-accounts/<account_id>", owner, {"terms_agreed": True},
         "acme_account.update"),
        ("DELETE", "/api/v1/acme-accounts/<account_id>", owner, None,
         "acme_account.delete", {"account_id": spare_account["_id"]}),
        ("POST", "/api/v1/certificates", owner,
         {"names": ["more.example.com"], "account_id": ids["account_id"], "issue": False},
         "certificate.create"),
        ("PATCH", "/api/v1/certificates/<certificate_id>", owner, {"name": "label"},
         "certificate.update"),
        ("POST", "/api/v1/certificates/<certificate_id>/issue", owner, None,
         "certificate.issue_requested"),
        ("POST", "/api/v1/certificates/<certificate_id>/renew", owner, None,
         "certificate.issue_requested"),
        ("DELETE", "/api/v1/certificates/<certificate_id>", owner, None,
         "certificate.delete", {"certificate_id": spare_cert["_id"]}),
        ("POST", "/api/v1/jobs/<job_id>/cancel", owner, {"reason": "r"}, "job.cancel"),
        ("POST", "/api/v1/jobs/<job_id>/retry", owner, None, "job.retry",
         {"job_id": dead["_id"]}),
        ("POST", "/api/v1/renewals/<batch_id>/cancel", owner, None, "renewal_batch.cancel"),
        ("POST", "/api/v1/alert-channels", owner,
         {"name": "pager", "url": "smtp://mail.example.com", "to": ["a@example.com"]},
         "alert_channel.create"),
        ("DELETE", "/api/v1/alert-channels/<channel_id>", owner, None,
         "alert_channel.delete", {"channel_id": _channel(migrated_db, world["a"], "spare")}),
    ]
    # Revoking needs an issued certificate and a CA: covered by the ACME tests. A renewal
    # batch is audited once for the batch and once per certificate: covered by
    # test_renewal_batches.py. A test message needs a receiver: covered by
    # tests/integration/test_alerts.py. Every other mutating route must be in the list above.
    mutating = {(m, r) for m, r, _ in api_routes(world["app"]) if m != "GET"}
    assert mutating - {(s[0], s[1]) for s in steps} == {
        ("POST", "/api/v1/certificates/<certificate_id>/revoke"),
        ("POST", "/api/v1/renewals"),
        ("POST", "/api/v1/alert-channels/<channel_id>/test")}
    for step in steps:
        method, rule, tok, body, action = step[:5]
        url = url_for(rule, {**ids, **(step[5] if len(step) == 6 else {})})
        before = migrated_db[dbm.AUDIT].count_documents({})
        kwargs = {"json": body} if body is not None else {}
        response = client.open(url, method=method, headers=tok.headers, **kwargs)
        assert 200 <= response.status_code < 300, (method, url, response.json)
        new = list(migrated_db[dbm.AUDIT].find().sort("seq", 1).skip(before))
        assert [e["action"] for e in new] == [action], (method, url)
        assert new[0]["actor"] == {"kind": "token", "id": tok.id}
    # Reading the private key is audited too (see test_api_certificates.py).
