"""The dashboard in headless chromium against real processes: gunicorn (the api, on the
port where Pebble's VA fetches HTTP-01), Celery workers and Debian's Pebble.

An operator signs in with a token; sees queued jobs, a worker appear when it starts (the
page refreshes itself), the queue drain, a dead job retried from its page succeed, a
certificate issued from its page become valid, and the worker disappear when it stops.
A project token gets a 404 page for another project's certificate; a read-only token
sees no buttons; a POST without the CSRF token is refused. Every page is screenshotted
into test-artifacts/browser/; no page logs a console error (a CSP violation is one) or
requests another origin.
"""

from __future__ import annotations

import pytest
import requests

from app import db as dbm
from app.audit import system_actor
from app.domain import accounts, certificates
from app.jobs import enqueue
from devstack.embedded import free_port
from tests.browser.conftest import Recorder, screenshot, sign_in
from tests.e2e.test_acme_e2e import stack_env, start_api
from tests.helpers import wait_for
from tests.helpers.api import make_admin, make_project, make_token

ACTOR = system_actor("cli")
LIVE_TIMEOUT_MS = 120_000  # a loaded machine: generous


def _text(page, selector: str) -> str:
    return page.locator(selector).inner_text().strip()


def _wait_text(page, selector: str, wanted: str, timeout: float = LIVE_TIMEOUT_MS,
               exact: bool = False) -> None:
    """Wait, without reloading, until the element's text contains (or, ``exact``, is)
    ``wanted``: the page's own htmx polling must bring it."""
    page.wait_for_function(
        "([sel, want, exact]) => { const e = document.querySelector(sel);"
        " if (e === null) { return false; } const t = e.textContent.trim();"
        " return exact ? t === want : t.includes(want); }",
        arg=[selector, wanted, exact], timeout=timeout)


@pytest.fixture
def stack(migrated_db, settings, pebble, cap_env, procs, monkeypatch):
    monkeypatch.setenv("CAP_ACME_DIRECTORY_URL", pebble.directory_url)
    monkeypatch.setenv("CAP_ACME_CA_BUNDLE", str(pebble.ca_cert))
    db = migrated_db
    project_id = make_project(db, "browser")
    s = settings.with_overrides(acme_directory_url=pebble.directory_url,
                                acme_ca_bundle=pebble.ca_cert)
    accounts.create_account(db, project_id, {"contact": ["ops@example.test"],
                                             "terms_agreed": True}, ACTOR, register=False,
                            settings=s)
    env = stack_env(cap_env, pebble, CAP_EXTRA_HANDLER_MODULES="tests.helpers.job_kinds")
    start_api(procs, env, pebble)
    return {"db": db, "project_id": project_id, "settings": s, "env": env,
            "base": f"http://127.0.0.1:{pebble.http_port}"}


def test_operator_watches_workers_queue_retry_and_issuance(stack, procs, chromium) -> None:
    db, base, project_id = stack["db"], stack["base"], stack["project_id"]
    admin = make_admin(db)
    cert = certificates.create_certificate(db, project_id, {"names": ["dash.browser.test"]},
                                           ACTOR, settings=stack["settings"])
    for i in range(12):
        enqueue(db, "test.noop", {"i": i}, project_id=project_id)
    dead = enqueue(db, "test.noop", {"i": "dead"}, project_id=project_id, publish=False)
    now = dbm.server_now(db)
    db[dbm.JOBS].update_one({"_id": dead["_id"]}, {"$set": {
        "state": "dead", "finished_at": now, "attempts": 5,
        "last_error": "permanent failure: the test made it dead"}})

    recorder = Recorder(base)
    context = chromium.new_context(viewport={"width": 1400, "height": 900})
    page = recorder.watch(context.new_page())
    page.goto(f"{base}/dashboard/signin")
    screenshot(page, "00-signin")
    sign_in(page, base, admin.token)
    assert "admin" in _text(page, "#who")
    screenshot(page, "01-overview-no-worker")

    page.goto(f"{base}/dashboard/jobs")
    _wait_text(page, "#queued-count", "12", exact=True)
    screenshot(page, "02-jobs-queued")

    page.goto(f"{base}/dashboard/workers")
    assert page.locator("#workers-online tr.worker").count() == 0
    worker = procs.worker(stack["env"], concurrency=2)
    page.wait_for_selector("#workers-online tr.worker", timeout=LIVE_TIMEOUT_MS)
    row = _text(page, "#workers-online tr.worker")
    assert str(worker.pid) in row or "celery" in row or "worker" in row
    screenshot(page, "03-workers-online")

    page.goto(f"{base}/dashboard/jobs")
    _wait_text(page, "#queued-count", "0", exact=True)  # drains while the page watches
    screenshot(page, "04-jobs-drained")

    page.goto(f"{base}/dashboard/jobs/{dead['_id']}")
    assert "dead" in _text(page, "#job-state")
    screenshot(page, "05-job-dead")
    page.click("#btn-retry")
    page.wait_for_url("**done=retry")
    _wait_text(page, "#job-state", "succeeded")
    screenshot(page, "06-job-retried")

    page.goto(f"{base}/dashboard/certificates/{cert['_id']}")
    assert "pending" in _text(page, "#cert-state")
    page.click("#btn-issue")
    page.wait_for_url("**done=issue")
    assert "Issuance requested" in _text(page, "#flash")
    _wait_text(page, "#cert-state", "issued", timeout=180_000)
    _wait_text(page, "#orders", "completed")
    screenshot(page, "07-certificate-issued")
    issued = db[dbm.CERTIFICATES].find_one({"_id": cert["_id"]})
    assert issued["status"] == "issued" and issued["serial"]
    entry = db[dbm.AUDIT].find_one({"action": "certificate.issue_requested",
                                    "target": f"certificate:{cert['_id']}"})
    assert entry["actor"] == {"kind": "token", "id": admin.id}

    # Revoke at Pebble: needs the reason and the confirmation box.
    page.select_option("select[name=reason_code]", "4")
    page.check("input[name=confirm]")
    page.click("#btn-revoke")
    page.wait_for_url("**done=revoke")
    assert "revoked" in _text(page, "#cert-state")
    entry = db[dbm.AUDIT].find_one({"action": "certificate.revoke",
                                    "target": f"certificate:{cert['_id']}"})
    assert entry["actor"] == {"kind": "token", "id": admin.id}
    assert entry["details"]["reason_code"] == 4
    screenshot(page, "07b-certificate-revoked")

    for name, path in (("08-overview", "/dashboard/"),
                       ("09-certificates", "/dashboard/certificates"),
                       ("10-scheduler", "/dashboard/scheduler"),
                       ("11-audit", "/dashboard/audit")):
        page.goto(base + path)
        page.wait_for_load_state("networkidle")
        screenshot(page, name)
    page.goto(f"{base}/dashboard/")
    page.wait_for_selector("#chart .uplot canvas", timeout=30_000)  # uPlot drew the chart

    page.goto(f"{base}/dashboard/workers")
    page.wait_for_selector("#workers-online tr.worker")
    worker.stop()
    page.wait_for_selector("#workers-online tr.worker", state="detached",
                           timeout=LIVE_TIMEOUT_MS)
    assert page.locator("#workers-gone td", has_text="stopped").count() >= 1
    screenshot(page, "12-worker-stopped")
    context.close()
    recorder.check()


def test_isolation_read_only_and_csrf(migrated_db, cap_env, procs, chromium) -> None:
    db = migrated_db
    a, b = make_project(db, "alpha"), make_project(db, "beta")
    accounts.create_account(db, a, {"directory_url": "https://127.0.0.1:1/dir",
                                    "terms_agreed": True}, ACTOR, register=False)
    cert = certificates.create_certificate(db, a, {"names": ["a.browser.test"]}, ACTOR)
    b_writer = make_token(db, b, ["read", "write"], name="beta-writer")
    a_reader = make_token(db, a, ["read"], name="alpha-reader")
    a_writer = make_token(db, a, ["read", "write"], name="alpha-writer")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    procs.api({**cap_env, "CAP_API_RATE_LIMIT": "off"}, f"127.0.0.1:{port}")

    def ready() -> bool:
        try:
            return requests.get(f"{base}/healthz", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    wait_for(ready, timeout=60, message="api")
    recorder = Recorder(base)
    cert_url = f"{base}/dashboard/certificates/{cert['_id']}"
    recorder.expected_errors.add(cert_url)  # beta's 404, and nothing else

    context = chromium.new_context()
    page = recorder.watch(context.new_page())
    sign_in(page, base, b_writer.token)
    response = page.goto(cert_url)
    assert response.status == 404
    assert _text(page, "#error-status") == "404"
    assert "a.browser.test" not in page.content()
    page.goto(f"{base}/dashboard/certificates")
    assert "a.browser.test" not in page.content()
    page.goto(cert_url)
    screenshot(page, "20-other-project-404")
    context.close()

    context = chromium.new_context()
    page = recorder.watch(context.new_page())
    sign_in(page, base, a_reader.token)
    assert page.goto(cert_url).status == 200
    assert "read-only" in _text(page, "#who")
    for button in ("#btn-issue", "#btn-renew", "#btn-revoke"):
        assert page.locator(button).count() == 0
    screenshot(page, "21-read-only-certificate")
    context.close()

    context = chromium.new_context()
    page = recorder.watch(context.new_page())
    sign_in(page, base, a_writer.token)
    page.goto(cert_url)
    assert page.locator("#btn-issue").count() == 1
    # The same session, a POST without the CSRF token: refused, nothing changes.
    refused = context.request.post(f"{cert_url}/issue", form={"x": "1"}, max_redirects=0)
    assert refused.status == 403 and "CSRF" in refused.text()
    assert db[dbm.JOBS].count_documents({"payload.certificate_id": cert["_id"]}) == 0
    page.click("#btn-issue")  # the page's own form carries the token
    page.wait_for_url("**done=issue")
    assert db[dbm.JOBS].count_documents({"payload.certificate_id": cert["_id"]}) == 1
    screenshot(page, "22-issue-requested")
    context.close()
    recorder.check()
