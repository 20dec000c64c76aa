"""Invariant 4, walked: every mutating API route and every CLI command is listed below,
either with how to run it and the audit actions it must write (exactly one entry per
mutation, in the same transaction), or with why it changes no user-visible state.

A route or command missing from these tables fails ``test_*_are_all_classified``: add
a row (a runnable case, or a reason) when you add one.
"""

from __future__ import annotations

import base64
import secrets
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from app import create_app
from app.audit import system_actor
from app.cli import cli
from tests.helpers.api import make_admin, make_project, make_token
from tests.helpers.audit_walk import AuditProbe, cli_commands, mutating_routes, stale, unclassified
from tests.integration.test_acme_helpers import acme_settings, make_account, responder


@dataclass
class World:
    db: Any
    kek_dir: Path
    settings: Any = None  # with Pebble as the CA, for cases that need a CA
    cleanup: list[Callable[[], None]] = field(default_factory=list)

    def project(self) -> str:
        return make_project(self.db, f"p{secrets.token_hex(4)}")

    def project_with_account(self) -> str:
        project_id = self.project()
        self.account(project_id)
        return project_id

    def certificate(self) -> str:
        from app.domain import certificates

        doc = certificates.create_certificate(
            self.db, self.project_with_account(),
            {"names": [f"{secrets.token_hex(4)}.example.com"]}, system_actor("cli"))
        return str(doc["_id"])

    def project_of(self, certificate_id: str) -> str:
        return str(self.db["certificates"].find_one({"_id": certificate_id})["project_id"])

    def renewal_batch(self) -> str:
        from app.domain import renewal_batches

        project_id = self.project_of(self.issued_certificate())
        batch = renewal_batches.start_batch(self.db, {"project_id": project_id},
                                            system_actor("cli"))
        return str(batch["_id"])

    def scratch(self) -> Path:
        return Path(tempfile.mkdtemp(prefix="walk-export-")) / "out"

    def account(self, project_id: str | None = None) -> str:
        from app.domain import accounts

        doc = accounts.create_account(self.db, project_id or self.project(),
                                      {"directory_url": "https://127.0.0.1:1/dir",
                                       "terms_agreed": True}, system_actor("cli"),
                                      register=False)
        return str(doc["_id"])

    def issued_certificate(self) -> str:
        """A certificate really issued by Pebble (revocation talks to the CA)."""
        from app.domain import certificates
        from app.domain.issuance import run_issuance
        from tests.helpers.fences import LocalFence

        project_id = self.project()
        make_account(self.db, project_id, self.settings)
        doc = certificates.create_certificate(
            self.db, project_id, {"names": [f"{secrets.token_hex(4)}.walk.test"]},
            system_actor("cli"), settings=self.settings)
        outcome = run_issuance(self.db, LocalFence(self.db, "walk-issue"), doc["_id"],
                               reason="initial", settings=self.settings)
        assert outcome["outcome"] == "issued", outcome
        return str(doc["_id"])

    def queued_job(self) -> str:
        from app.jobs import enqueue

        return str(enqueue(self.db, "jobs.reap", {}, publish=False)["_id"])

    def dead_job(self) -> str:
        from app import db as dbm

        job_id = self.queued_job()
        self.db[dbm.JOBS].update_one({"_id": job_id}, {"$set": {"state": "dead"}})
        return job_id

    def channel(self, url: str = "smtps://mail.example.com") -> str:
        from app.ops.alerts import channels, engine

        doc = channels.create_channel(self.db, self.project(), {
            "name": f"c{secrets.token_hex(3)}", "url": url, "to": ["ops@example.com"]
            } if url.startswith("smtp") else {"name": f"c{secrets.token_hex(3)}", "url": url,
                                              "allow_http": True},
            system_actor("cli"), rule_names=engine.RULES)
        return str(doc["_id"])

    def receiver_channel(self) -> str:
        """A webhook channel whose receiver is up for the rest of the test."""
        from tests.helpers.receivers import HttpReceiver

        receiver = HttpReceiver()
        self.cleanup.append(receiver.down)
        return self.channel(receiver.url())

    def certificate_with_endpoint(self) -> str:
        from app.domain import certificates

        cert_id = self.certificate()
        certificates.update_certificate(self.db, cert_id, {"endpoints": ["127.0.0.1:1"]},
                                        system_actor("cli"))
        return cert_id

    def kek_version(self, version: int) -> None:
        path = self.kek_dir / f"v{version}.key"
        path.write_text(base64.b64encode(secrets.token_bytes(32)).decode() + "\n")
        path.chmod(0o600)


@dataclass(frozen=True)
class Mutating:
    """Run it (``setup`` returns the argv, or the (path, json body) of the request) and
    expect exactly these audit actions, in this order."""

    actions: tuple[str, ...]
    setup: Callable[[World], Any]
    needs_ca: bool = False


@dataclass(frozen=True)
class NotAudited:
    reason: str


READS = NotAudited("reads only")

# ---------------------------------------------------------------- CLI commands
CLI: dict[str, Mutating | NotAudited] = {
    "migrate": NotAudited("schema and indexes, recorded in the migrations collection; run "
                          "by the Helm hook before any user data changes"),
    "health": READS,
    "dev": NotAudited("starts the local stack; its processes audit their own mutations"),
    "scheduler status": READS,
    # Two mutations: the first use of v2 stores its canary, then the rotation is recorded.
    "kek rotate": Mutating(("kek.canary_create", "kek.rotate"),
                           lambda w: (w.kek_version(2), ["kek", "rotate", "--to", "2"])[1]),
    "kek status": READS,
    "kek retire": Mutating(("kek.retire",),
                           lambda w: (w.kek_version(2), ["kek", "retire", "2"])[1]),
    "projects create": Mutating(("project.create",),
                                lambda w: ["projects", "create", "walked"]),
    "projects list": READS,
    "projects delete": Mutating(("project.delete",),
                                lambda w: ["projects", "delete", w.project(), "--yes"]),
    "certs list": READS,
    "certs show": READS,
    "certs issue": Mutating(("certificate.issue_requested",),
                            lambda w: ["certs", "issue", w.certificate(), "--no-wait"]),
    "certs renew": Mutating(("certificate.issue_requested",),
                            lambda w: ["certs", "renew", w.certificate(), "--no-wait"]),
    "certs revoke": Mutating(("certificate.revoke",), lambda w: [
        "certs", "revoke", w.issued_certificate(), "--yes"], needs_ca=True),
    # The chain is public; the key's export is the audited part.
    "certs export": Mutating(("certificate.private_key_export",), lambda w: [
        "certs", "export", w.issued_certificate(), "--out", str(w.scratch()), "--key",
        "--yes"], needs_ca=True),
    "probe": NotAudited("reads this container's probe state file; changes nothing"),
    "ca budgets": READS,
    "ca fallback": Mutating(("project.ca_fallback_set",),
                            lambda w: ["ca", "fallback", w.project()]),
    "renewals renew": Mutating(("certificate.renew_requested", "renewal_batch.create"),
                               lambda w: ["renewals", "renew", "--project",
                                          w.project_of(w.issued_certificate())],
                               needs_ca=True),
    "renewals show": READS,
    "renewals cancel": Mutating(("renewal_batch.cancel",), lambda w: [
        "renewals", "cancel", w.renewal_batch()], needs_ca=True),
    "accounts list": READS,
    "accounts show": READS,
    "orders list": READS,
    "orders show": READS,
    "tokens create": Mutating(("token.create",), lambda w: ["tokens", "create", "--admin"]),
    "tokens list": READS,
    "tokens revoke": Mutating(("token.revoke",), lambda w: [
        "tokens", "revoke", make_token(w.db, w.project(), ["read"]).id]),
    "audit verify": READS,
    "audit sinks": READS,
    "jobs reap": NotAudited("internal bookkeeping: re-claims lapsed leases and re-publishes "
                            "lost messages (the same work as the jobs.reap job)"),
    "jobs list": READS,
    "jobs show": READS,
    "jobs retry": Mutating(("job.retry",), lambda w: ["jobs", "retry", w.dead_job()]),
    "jobs cancel": Mutating(("job.cancel",), lambda w: ["jobs", "cancel", w.queued_job()]),
    "jobs depth": READS,
    "jobs workers": READS,
    "dns test": NotAudited("adds and removes a test TXT record at the DNS provider; "
                           "nothing of CertAutoPilot's changes"),
    "backup": NotAudited("reads only (writes files outside the database)"),
    "restore": NotAudited("replaces the whole database with a backup; appends one "
                          "ops.restore entry to the restored chain (checked in "
                          "tests/integration/test_backup_restore.py)"),
    "dr-test": NotAudited("changes go through the domain functions and the API, which audit "
                          "them (token.create, acme_account.create, certificate.create, ..., "
                          "certificate.revoke, token.revoke; tests/e2e/test_backup_dr_e2e.py)"),
    "alerts list": READS,
    "alerts test": Mutating(("alert.test_sent",),
                            lambda w: ["alerts", "test", w.receiver_channel()]),
    # With a dead job and no channel: one alert opens (alert.sent follows per channel).
    "alerts evaluate": Mutating(("alert.open",), lambda w: (w.dead_job(),
                                                            ["alerts", "evaluate"])[1]),
    "alerts channels add": Mutating(("alert_channel.create",), lambda w: [
        "alerts", "channels", "add", "walked", "--url", "smtps://mail.example.com",
        "--to", "ops@example.com", "--project", w.project()]),
    "alerts channels list": READS,
    "alerts channels remove": Mutating(("alert_channel.delete",), lambda w: [
        "alerts", "channels", "remove", w.channel()]),
    "endpoints add": Mutating(("certificate.update",), lambda w: [
        "endpoints", "add", w.certificate(), "127.0.0.1:2"]),
    "endpoints remove": Mutating(("certificate.update",), lambda w: [
        "endpoints", "remove", w.certificate_with_endpoint(), "127.0.0.1:1"]),
    "endpoints list": READS,
    "endpoints scan": NotAudited("records what the endpoints serve (observations, like the "
                                 "certificates.drift_scan job); exits 1 unless all serve "
                                 "the certificate"),
}

# ---------------------------------------------------------------- API routes
P = "/api/v1"
API: dict[str, Mutating | NotAudited] = {
    f"POST {P}/projects": Mutating(("project.create",), lambda w: (
        f"{P}/projects", {"name": "walkedproject"})),
    f"PATCH {P}/projects/<string:project_id>": Mutating(("project.update",), lambda w: (
        f"{P}/projects/{w.project()}", {"description": "walked"})),
    f"DELETE {P}/projects/<string:project_id>": Mutating(("project.delete",), lambda w: (
        f"{P}/projects/{w.project()}", None)),
    f"POST {P}/tokens": Mutating(("token.create",), lambda w: (
        f"{P}/tokens", {"project_id": w.project(), "scopes": ["read"]})),
    f"DELETE {P}/tokens/<string:token_id>": Mutating(("token.revoke",), lambda w: (
        f"{P}/tokens/{make_token(w.db, w.project(), ['read']).id}", None)),
    f"POST {P}/certificates": Mutating(("certificate.create",), lambda w: (
        f"{P}/certificates", {"project_id": w.project_with_account(),
                              "names": ["walk.example.com"],
                              "issue": False})),
    f"PATCH {P}/certificates/<string:certificate_id>": Mutating(
        ("certificate.update",), lambda w: (f"{P}/certificates/{w.certificate()}",
                                            {"name": "renamed"})),
    f"DELETE {P}/certificates/<string:certificate_id>": Mutating(
        ("certificate.delete",), lambda w: (f"{P}/certificates/{w.certificate()}", None)),
    f"POST {P}/certificates/<string:certificate_id>/issue": Mutating(
        ("certificate.issue_requested",),
        lambda w: (f"{P}/certificates/{w.certificate()}/issue", None)),
    f"POST {P}/certificates/<string:certificate_id>/renew": Mutating(
        ("certificate.issue_requested",),
        lambda w: (f"{P}/certificates/{w.certificate()}/renew", None)),
    f"POST {P}/certificates/<string:certificate_id>/revoke": Mutating(
        ("certificate.revoke",),
        lambda w: (f"{P}/certificates/{w.issued_certificate()}/revoke", {"reason_code": 0}),
        needs_ca=True),
    f"POST {P}/acme-accounts": Mutating(("acme_account.create",), lambda w: (
        f"{P}/acme-accounts", {"project_id": w.project(),
                               "directory_url": "https://127.0.0.1:1/dir",
                               "register": False})),
    f"PATCH {P}/acme-accounts/<string:account_id>": Mutating(
        ("acme_account.update",),
        lambda w: (f"{P}/acme-accounts/{w.account()}", {"terms_agreed": True})),
    f"DELETE {P}/acme-accounts/<string:account_id>": Mutating(
        ("acme_account.delete",), lambda w: (f"{P}/acme-accounts/{w.account()}", None)),
    f"POST {P}/renewals": Mutating(
        ("certificate.renew_requested", "renewal_batch.create"),
        lambda w: (f"{P}/renewals", {"project_id": w.project_of(w.issued_certificate())}),
        needs_ca=True),
    f"POST {P}/renewals/<string:batch_id>/cancel": Mutating(
        ("renewal_batch.cancel",),
        lambda w: (f"{P}/renewals/{w.renewal_batch()}/cancel", None), needs_ca=True),
    f"POST {P}/jobs/<string:job_id>/retry": Mutating(
        ("job.retry",), lambda w: (f"{P}/jobs/{w.dead_job()}/retry", None)),
    f"POST {P}/jobs/<string:job_id>/cancel": Mutating(
        ("job.cancel",), lambda w: (f"{P}/jobs/{w.queued_job()}/cancel", {"reason": "walk"})),
    f"POST {P}/alert-channels": Mutating(("alert_channel.create",), lambda w: (
        f"{P}/alert-channels", {"project_id": w.project(), "name": "walked",
                                "url": "smtps://mail.example.com", "to": ["a@example.com"]})),
    f"DELETE {P}/alert-channels/<string:channel_id>": Mutating(
        ("alert_channel.delete",), lambda w: (f"{P}/alert-channels/{w.channel()}", None)),
    f"POST {P}/alert-channels/<string:channel_id>/test": Mutating(
        ("alert.test_sent",),
        lambda w: (f"{P}/alert-channels/{w.receiver_channel()}/test", None)),
    # The dashboard's forms need a session cookie and a CSRF token, not a bearer token:
    # tests/integration/test_dashboard.py checks the entry each one writes.
    **{f"POST /dashboard/{path}": NotAudited(
        "a dashboard form: calls the same domain/jobs function as the API route, which "
        "writes the entry (test_dashboard.py: test_dashboard_actions_are_audited_as_the_api)")
       for path in ("certificates/<certificate_id>/issue",
                    "certificates/<certificate_id>/renew",
                    "certificates/<certificate_id>/revoke",
                    "jobs/<job_id>/retry", "jobs/<job_id>/cancel")},
    "POST /dashboard/signin": NotAudited("opens a dashboard session: writes dashboard.sign_in "
                                         "(test_dashboard.py)"),
    "POST /dashboard/signout": NotAudited("closes a dashboard session: writes "
                                          "dashboard.sign_out (test_dashboard.py)"),
}


def with_the_ca(settings: Any, request: pytest.FixtureRequest, stack: ExitStack) -> Any:
    """Pebble for a case that talks to the CA: its settings, also in the environment (some
    domain calls read them from there, as in production), and the HTTP-01 responder."""
    pebble = request.getfixturevalue("pebble")
    settings = acme_settings(settings, pebble)
    monkeypatch = request.getfixturevalue("monkeypatch")
    monkeypatch.setenv("CAP_ACME_DIRECTORY_URL", pebble.directory_url)
    monkeypatch.setenv("CAP_ACME_CA_BUNDLE", str(pebble.ca_cert))
    stack.enter_context(responder(settings, pebble.http_port))
    return settings


@pytest.fixture
def world(migrated_db: Any, kek_dir: Path, settings: Any) -> Iterator[World]:
    from app.keys import canary
    from app.keys.keyring import get_keyring

    canary.ensure(migrated_db, get_keyring(settings), 1)  # once per database, audited
    world = World(migrated_db, kek_dir)
    yield world
    for step in world.cleanup:
        step()


def test_cli_commands_are_all_classified() -> None:
    commands = cli_commands(cli)
    missing = unclassified(commands, CLI)
    assert not missing, (f"CLI commands with no row in CLI of {__file__}: {missing}; add "
                         "each as Mutating(actions, setup) or NotAudited(reason)")
    assert not stale(commands, CLI), f"rows for commands that no longer exist: " \
                                     f"{stale(commands, CLI)}"


def test_api_routes_are_all_classified(settings: Any) -> None:
    routes = mutating_routes(create_app(settings))
    missing = unclassified(routes, API)
    assert not missing, (f"mutating API routes with no row in API of {__file__}: {missing}; "
                         "add each as Mutating(actions, setup) or NotAudited(reason)")
    assert not stale(routes, API), f"rows for routes that no longer exist: " \
                                   f"{stale(routes, API)}"


@pytest.mark.parametrize("command", sorted(c for c, v in CLI.items() if isinstance(v, Mutating)))
def test_each_mutating_command_writes_exactly_its_entries(world: World, settings: Any,
                                                         command: str,
                                                         request: pytest.FixtureRequest) -> None:
    case = CLI[command]
    assert isinstance(case, Mutating)
    with ExitStack() as stack:
        if case.needs_ca:
            world.settings = with_the_ca(settings, request, stack)
        argv = case.setup(world)
    with AuditProbe(world.db) as probe:
        outcome = CliRunner().invoke(cli, argv)
    assert outcome.exit_code == 0, outcome.output
    assert probe.actions == list(case.actions), (command, probe.actions)
    for entry in probe.entries:
        assert entry["actor"]["kind"] == "system" and entry["actor"]["id"].startswith("cli@")


@pytest.mark.parametrize("route", sorted(r for r, v in API.items() if isinstance(v, Mutating)))
def test_each_mutating_route_writes_exactly_its_entries(world: World, settings: Any,
                                                        route: str,
                                                        request: pytest.FixtureRequest) -> None:
    from app.domain import tokens

    tokens.clear_cache()
    case = API[route]
    assert isinstance(case, Mutating)
    method = route.split(" ", 1)[0]
    admin = make_admin(world.db)
    with ExitStack() as stack:
        if case.needs_ca:
            settings = world.settings = with_the_ca(settings, request, stack)
        path, body = case.setup(world)
    client = create_app(settings).test_client()
    with AuditProbe(world.db) as probe:
        response = client.open(path, method=method, json=body, headers=admin.headers)
    assert response.status_code < 300, (route, response.status_code, response.get_json())
    assert probe.actions == list(case.actions), (route, probe.actions)
    for entry in probe.entries:
        assert entry["actor"] == {"kind": "token", "id": admin.id}
        assert entry["request_id"] == response.headers.get("X-Request-ID")
