"""Shared pieces of the ACME tests (no tests here): a project, an account on Pebble, and
CertAutoPilot's own HTTP-01 responder (the Flask app) served in a thread on the port
where Pebble's VA fetches challenges."""

from __future__ import annotations

import json
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from werkzeug.serving import make_server

from app.audit import system_actor
from app.domain import accounts, projects

ACTOR = system_actor("cli")


def make_project(db: Any, name: str = "acme-test") -> str:
    return projects.create_project(db, name=name, actor=ACTOR)["_id"]


def make_account(db: Any, project_id: str, settings: Any, *, register: bool = False,
                 name: str = "default") -> dict[str, Any]:
    return accounts.create_account(
        db, project_id, {"name": name, "contact": ["ops@example.test"], "terms_agreed": True},
        ACTOR, register=register, settings=settings)


def acme_settings(settings: Any, pebble: Any) -> Any:
    return settings.with_overrides(acme_directory_url=pebble.directory_url,
                                   acme_ca_bundle=pebble.ca_cert,
                                   acme_order_timeout_seconds=30.0)


@contextmanager
def responder(settings: Any, port: int) -> Iterator[None]:
    """The real api app (its HTTP-01 route) listening on 127.0.0.1:port in a thread."""
    from app import create_app

    app = create_app(settings)
    server = make_server("127.0.0.1", port, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def challtest(pebble: Any, path: str, body: dict[str, Any]) -> None:
    request = urllib.request.Request(f"{pebble.challtestsrv_url}/{path}",
                                     data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=5):
        pass


def pebble_order_count(pebble: Any) -> int:
    return pebble.log().count("Added order")


def issue_wildcard_at(db: Any, settings: Any, pebble: Any, zone: str,
                      challenge: dict[str, Any], *, dns_address: str) -> tuple[Any, Any]:
    """Issue ``*.zone`` and ``zone`` at ``pebble`` through ``challenge`` (dns-01); assert
    the leaf's names and that the TXT records are gone. Returns (created, stored)."""
    from cryptography import x509

    from app.domain import certificates
    from app.domain.issuance import run_issuance
    from tests.helpers.dnsservers import txt_at
    from tests.helpers.fences import LocalFence

    s = settings.with_overrides(acme_directory_url=pebble.directory_url,
                                acme_ca_bundle=pebble.ca_cert, acme_order_timeout_seconds=30.0)
    project_id = make_project(db)
    accounts.create_account(db, project_id, {"terms_agreed": True}, ACTOR, settings=s)
    created = certificates.create_certificate(db, project_id, {
        "names": [f"*.{zone}", zone], "challenge": challenge}, ACTOR, settings=s)
    result = run_issuance(db, LocalFence(db, f"job-{challenge.get('provider')}"),
                          created["_id"], reason="initial", settings=s)
    assert result["outcome"] == "issued"
    stored = certificates.get_certificate(db, created["_id"])
    leaf = x509.load_pem_x509_certificate(stored["certificate_pem"].encode())
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(sans.get_values_for_type(x509.DNSName)) == [f"*.{zone}", zone]
    assert txt_at(dns_address, f"_acme-challenge.{zone}") == []  # cleaned up
    return created, stored
