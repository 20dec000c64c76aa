"""The HTTP-01 responder route, served from the challenges collection."""

from __future__ import annotations

import pytest

from app import create_app
from app import db as dbm
from app.acme import solvers
from app.domain import challenges


@pytest.fixture
def client(migrated_db, settings):
    app = create_app(settings)
    return app.test_client()


def _challenge(token):
    return solvers.Challenge(type="http-01", token=token, identifier="a.example",
                             key_authorization=f"{token}.thumbprint", dns_value=None,
                             order_id="ord_1", certificate_id="crt_1", project_id="prj_1")


def _provision(db, challenge):
    solvers.Http01Solver(challenges.Http01Records(db)).provision(challenge)


def test_known_token_is_answered_then_removed_after_use(client, migrated_db):
    token = "AbC-_09xyz" * 4
    _provision(migrated_db, _challenge(token))
    response = client.get(f"/.well-known/acme-challenge/{token}")
    assert response.status_code == 200
    assert response.get_data(as_text=True) == f"{token}.thumbprint"
    assert response.headers["Content-Type"].startswith("text/plain")
    record = migrated_db[dbm.CHALLENGES].find_one({"_id": token})
    assert record["expires_at"] > record["created_at"]  # TTL index removes stale ones
    assert challenges.remove_for_order(migrated_db, "ord_1") == 1
    assert migrated_db[dbm.CHALLENGES].count_documents({}) == 0


def test_not_found_is_not_remembered(client, migrated_db):
    token = "written-a-moment-later"
    assert client.get(f"/.well-known/acme-challenge/{token}").status_code == 404
    _provision(migrated_db, _challenge(token))
    assert client.get(f"/.well-known/acme-challenge/{token}").status_code == 200


def test_concurrent_requests_for_one_token_share_a_read(client, migrated_db):
    from concurrent.futures import ThreadPoolExecutor

    from pymongo import monitoring

    token = "three-vantage-points"
    _provision(migrated_db, _challenge(token))
    reads = []

    class Count(monitoring.CommandListener):
        def started(self, event):
            if event.command_name == "find" and event.command.get("find") == dbm.CHALLENGES:
                reads.append(1)

        def succeeded(self, event):
            pass

        def failed(self, event):
            pass

    monitoring.register(Count())
    from app import create_app
    from app.acme import responder

    dbm.close_clients()  # the next client of this process picks up the listener
    responder._found.clear()
    app = create_app()
    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(
            lambda _: app.test_client().get(f"/.well-known/acme-challenge/{token}"), range(3)))
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert len(reads) == 1


def test_the_ttl_index_exists(migrated_db):
    indexes = migrated_db[dbm.CHALLENGES].index_information()
    assert any(ix.get("expireAfterSeconds") == 0 and ix["key"] == [("expires_at", 1)]
               for ix in indexes.values())


@pytest.mark.parametrize("path", [
    "/.well-known/acme-challenge/unknown-token",
    "/.well-known/acme-challenge/has.dot",
    "/.well-known/acme-challenge/has%20space",
    "/.well-known/acme-challenge/" + "a" * 300,
    "/.well-known/acme-challenge/%2e%2e",
    "/.well-known/acme-challenge/",
    "/.well-known/acme-challenge/a/b",
])
def test_unknown_or_malformed_tokens_are_404(client, path):
    response = client.get(path)
    assert response.status_code == 404


def test_no_authentication_needed(client, migrated_db):
    _provision(migrated_db, _challenge("open-token"))
    assert client.get("/.well-known/acme-challenge/open-token",
                      headers={"Authorization": "Bearer nonsense"}).status_code == 200
