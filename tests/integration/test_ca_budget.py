"""The shared CA budget on the real wire server: concurrent takers never get more than N
tokens in a window, a refused order gets a time to come back, tokens come back after the
window, a spent bucket is drained by the CA's word, buckets are per registered domain."""

from __future__ import annotations

import os
import threading
import time
from datetime import timedelta

import pytest

from app import db as dbm
from app.config.ca_budgets import Limit
from app.db import clock
from app.domain import budget

pytestmark = pytest.mark.integration

CA = "https://ca.example/dir"


def bucket(count=5, window=3.0, kind=budget.ORDERS_PER_ACCOUNT, subject="acct-1"):
    return budget.Bucket(CA, kind, subject, Limit(count, window))


def test_concurrent_takers_never_exceed_the_budget(migrated_db):
    b = bucket(count=5, window=30.0)
    granted, refused = [], []
    lock = threading.Lock()

    def worker():
        for _ in range(4):
            answer = budget.take(migrated_db, [b])
            with lock:
                (granted if isinstance(answer, budget.Grant) else refused).append(answer)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(granted) == 5
    assert len(refused) == 19
    now = dbm.server_now(migrated_db)
    # Each refusal says when to come back: after the window, spread along a waiting line.
    assert all(r.until > now + timedelta(seconds=20) for r in refused)
    assert len({r.until for r in refused}) > 1
    [level] = budget.levels(migrated_db, ca=CA)
    assert level["tokens"] == 0 and level["capacity"] == 5
    assert level["next_token_at"] is not None


def test_tokens_come_back_after_the_window(migrated_db):
    b = bucket(count=2, window=1.5)
    assert isinstance(budget.take(migrated_db, [b]), budget.Grant)
    assert isinstance(budget.take(migrated_db, [b]), budget.Grant)
    refusal = budget.take(migrated_db, [b])
    assert isinstance(refusal, budget.Refusal) and refusal.bucket == b
    time.sleep(max(0.0, (refusal.until - dbm.server_now(migrated_db)).total_seconds()) + 0.2)
    assert isinstance(budget.take(migrated_db, [b]), budget.Grant)


def test_settling_moves_a_token_to_when_its_request_was_answered(migrated_db):
    b = bucket(count=1, window=30.0)
    grant = budget.take(migrated_db, [b])
    assert isinstance(grant, budget.Grant)
    time.sleep(0.6)  # the request to the CA takes at least this long
    budget.settle(migrated_db, grant)
    refusal = budget.take(migrated_db, [b])
    assert isinstance(refusal, budget.Refusal)
    # The token comes back a window after the answer, not after the take.
    assert refusal.until.timestamp() * 1000 >= grant.taken_ms + 30_600


def test_tokens_are_stamped_by_the_servers_clock_not_a_stale_estimate(migrated_db):
    """A process's clock estimate behind the server's (half a slow round trip at its last
    sample) must not stamp a token early: it would come back early, and the CA would see
    one order too many in a window (seen in CI: 11 in 10 s under a 10/10 s budget)."""
    b = bucket(count=1, window=30.0)
    key = (os.getpid(), id(migrated_db.client))
    behind = clock.read_server_time(migrated_db) - timedelta(seconds=5)
    with clock.CLOCK._lock:
        clock.CLOCK._samples[key] = (behind, time.monotonic())
    try:
        assert dbm.server_now(migrated_db) < behind + timedelta(seconds=1)  # stale indeed
        grant = budget.take(migrated_db, [b])
        assert isinstance(grant, budget.Grant)
        real_ms = clock.read_server_time(migrated_db).timestamp() * 1000
        assert real_ms - 1000 < grant.taken_ms <= real_ms
        with clock.CLOCK._lock:
            clock.CLOCK._samples[key] = (clock.read_server_time(migrated_db)
                                         - timedelta(seconds=5), time.monotonic())
        budget.settle(migrated_db, grant)
        [slot] = migrated_db[dbm.CA_BUDGETS].find_one({"_id": b.key})["slots"]
        assert slot >= real_ms  # settled at the server's time after the answer
    finally:
        clock.CLOCK.reset()


def test_a_refusal_gives_back_the_other_buckets_tokens(migrated_db):
    roomy, tight = bucket(count=3, subject="roomy"), bucket(count=1, subject="tight")
    assert isinstance(budget.take(migrated_db, [roomy, tight]), budget.Grant)
    refusal = budget.take(migrated_db, [roomy, tight])
    assert isinstance(refusal, budget.Refusal) and refusal.bucket == tight
    levels = {row["subject"]: row["tokens"] for row in budget.levels(migrated_db, ca=CA)}
    assert levels == {"roomy": 2, "tight": 0}


def test_drain_empties_a_bucket_until_the_retry_after(migrated_db):
    b = bucket(count=5, window=2.0)
    until = dbm.server_now(migrated_db) + timedelta(seconds=60)
    budget.drain(migrated_db, b, until)
    refusal = budget.take(migrated_db, [b])
    assert isinstance(refusal, budget.Refusal) and refusal.until >= until


def test_failed_validations_block_an_identifier_until_they_age_out(migrated_db, settings):
    buckets = budget.validation_buckets(settings, CA, "acct-1", ["a.example.com"])
    assert budget.check(migrated_db, buckets) is None
    for _ in range(5):
        budget.spend(migrated_db, buckets)
    refusal = budget.check(migrated_db, buckets)
    assert refusal is not None and refusal.until > dbm.server_now(migrated_db)
    other = budget.validation_buckets(settings, CA, "acct-1", ["b.example.com"])
    assert budget.check(migrated_db, other) is None


def test_a_changed_limit_resizes_the_bucket(migrated_db):
    assert isinstance(budget.take(migrated_db, [bucket(count=1, window=60)]), budget.Grant)
    assert isinstance(budget.take(migrated_db, [bucket(count=1, window=60)]), budget.Refusal)
    assert isinstance(budget.take(migrated_db, [bucket(count=3, window=60)]), budget.Grant)
    [level] = budget.levels(migrated_db, ca=CA)
    assert level["capacity"] == 3 and level["tokens"] == 1


def test_registered_domains_follow_the_public_suffix_list(settings):
    assert budget.registered_domain("a.b.example.co.uk") == "example.co.uk"
    assert budget.registered_domain("*.shop.example.com") == "example.com"
    assert budget.registered_domain("me.github.io") == "me.github.io"
    assert budget.registered_domain("192.0.2.7") == "192.0.2.7"
    buckets = budget.order_buckets(settings, CA, "acct-1",
                                   ["a.example.com", "b.example.com", "x.example.org"],
                                   replaces=False)
    assert [(b.kind, b.subject) for b in buckets] == [
        (budget.ORDERS_PER_ACCOUNT, "acct-1"),
        (budget.CERTS_PER_DOMAIN, "example.com"), (budget.CERTS_PER_DOMAIN, "example.org"),
        (budget.PACE, "*")]
    exempt = budget.order_buckets(settings, CA, "acct-1", ["a.example.com"], replaces=True)
    assert [b.kind for b in exempt] == [budget.PACE]


def test_the_named_bucket_of_a_rate_limited_answer(settings):
    buckets = budget.order_buckets(settings, CA, "acct-1", ["a.example.com"], replaces=False)
    named = budget.bucket_named_by(
        "too many certificates (50) already issued for \"example.com\" in the last 168h0m0s, "
        "see https://letsencrypt.org/docs/rate-limits/#new-certificates-per-registered-domain",
        buckets)
    assert named is not None and named.kind == budget.CERTS_PER_DOMAIN
    assert budget.bucket_named_by("slow down", buckets).kind == budget.ORDERS_PER_ACCOUNT


def test_an_off_limit_has_no_bucket(settings):
    from app.config import load_settings
    from devstack.pebble import unlimited_budget

    env = {"CAP_MONGO_URI": settings.mongo_uri, "CAP_CA_BUDGETS": unlimited_budget(CA)}
    s = load_settings(env)
    kinds = [b.kind for b in budget.order_buckets(s, CA, "acct-1", ["a.example.com"],
                                                  replaces=False)]
    assert kinds == [budget.PACE]
    assert budget.validation_buckets(s, CA, "acct-1", ["a.example.com"]) == []
