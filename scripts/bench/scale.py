#!/usr/bin/env python
"""Scale: how each fleet-wide cost grows from 1,000 to 100,000 certificates.

One run, one embedded MongoDB-wire server, one Debian Pebble. The fleet grows through
``--sizes`` (default 1000,10000,100000; each size adds to the previous one) and at each
size the script measures:

- seeding: certificates bulk-inserted (``insert_many``) shaped exactly as issuance stores
  them (``create_certificate`` + ``describe_issued`` + the issuance's store step), over
  ``--projects`` projects (100), notAfter spread over 90 days, 1 % due now; plus what a
  simulated year of renewals leaves: each certificate's audit entries (create + one
  renewal every 60 days, hash-chained with ``build_entry``) and the renewal jobs still
  inside their retention window (``app.jobs.lifecycle`` retention; a sample of already
  expired ones is inserted too and must be swept by the TTL index);
- the renewal scan (``app.domain.renewal.renewal_scan``): time to enqueue the due 1 %,
  ``explain`` of its query (documents examined / returned), and its floor: the same jobs
  inserted alone into a collection with the ``jobs`` indexes;
- the queue-depth query (``app.jobs.queue_depth``, what the autoscaler's gauge runs):
  p50 over 20 calls, and ``explain`` of its match;
- one ``/metrics`` scrape of a fresh api process (gunicorn, 1 worker): time, bytes, the
  worker's resident memory before and its peak (VmHWM) after; when the certificate
  gauges come from a snapshot (``app.metrics_snapshot``) its refresh time is shown too;
- ``GET /api/v1/certificates`` first page and a deep page (a cursor 80 % into the
  result), filtered by project, by status and by ``expiring_before``: p50/p99 over
  ``--requests`` (200) sequential requests each, at most ``--budget`` seconds per series;
- a due renewal from claim to completion against Pebble (``--renewals`` jobs, 20, run
  in-process through ``app.jobs.runner.run_job``), p50/p95 of the job's run time;
- ``GET /api/v1/audit`` by target, by a one-day time range and the newest page of the
  whole log: p50/p99; and, in the same run, the one sorted ``seq`` range the API asked
  for before it read through windows (straight from pymongo, p50);
- the size of each per-event collection (jobs, schedule_fires, orders, audit, challenges,
  api_idempotency, api_rate_limits).

The table goes to stdout; the last line is one JSON object with every figure per size
and the growth factor between the two largest sizes run (10,000 → 100,000 by default;
1.0 = flat, 10 = linear).

The embedded server is a Python process on the same 2 cores: read ratios and growth,
not absolute times. Its planner loads every candidate an index yields before sorting and
limiting, and its ``explain`` counts one examined document per candidate (a collection
scan: the whole collection), so examined/returned near 1 means "index-backed".

    .venv/bin/python scripts/bench/scale.py [--sizes 1000,10000,100000] [--requests 200]
        [--budget 60] [--renewals 20] [--projects 100]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts" / "bench"))

from renewals import Procs, log, wait_until  # noqa: E402

from app import db as dbm  # noqa: E402
from app.config import load_settings  # noqa: E402
from devstack import embedded  # noqa: E402
from devstack.pebble import unlimited_budget  # noqa: E402
from tests.helpers.pebble import Pebble, start_pebble  # noqa: E402

Doc = dict[str, Any]
DAY = timedelta(days=1)
RENEW_EVERY = timedelta(days=60)
BATCH = 2000
EXPIRED_JOB_SAMPLE = 200
PER_EVENT = ("jobs", "schedule_fires", "orders", "audit", "challenges", "api_idempotency",
             "api_rate_limits")


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q * len(ordered) + 0.5)) - 1))]


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


# -- the documents -------------------------------------------------------------------

def issued_template() -> Doc:
    """The issued fields of a real chain (a P-256 leaf under a throwaway CA), as
    ``app.domain.issued.describe_issued`` stores them."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from app.domain.issued import describe_issued

    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Scale Bench CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - DAY).not_valid_after(now + 3650 * DAY)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA384()))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                        "host.scale.test")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + 90 * DAY)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("host.scale.test")]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (leaf, ca)).decode()
    return describe_issued(pem)


class Seeder:
    """Bulk-inserts the fleet and what a year of renewals leaves, size after size."""

    def __init__(self, db: Any, projects: list[str], account_id: str, directory_url: str,
                 max_size: int) -> None:
        from app.jobs.lifecycle import FINISHED_RETENTION

        self.db = db
        self.projects = projects
        self.account_id = account_id
        self.directory_url = directory_url
        self.max_size = max_size
        self.count = 0
        self.now = dbm.server_now(db)
        self.rng = random.Random(19)
        self.issued = issued_template()
        self.retention = FINISHED_RETENTION
        self.expired_sample = 0
        self.ids: list[str] = []
        self.sample_targets: list[str] = []

    def _audit_head(self) -> tuple[int, str]:
        from app.audit.log import CHAIN_ID, GENESIS_HASH

        head = self.db[dbm.COUNTERS].find_one({"_id": CHAIN_ID}) or {}
        return int(head.get("seq", 0)), str(head.get("hash", GENESIS_HASH))

    def created_at(self, i: int) -> datetime:
        # Every certificate exists for the whole simulated year (six renewals each),
        # created in index order so creation order is the seeding order.
        span = 35 * DAY
        return self.now - 400 * DAY + span * (i / max(1, self.max_size))

    def certificate(self, i: int) -> Doc:
        rng = self.rng
        project_id = self.projects[i % len(self.projects)]
        name = f"host{i}.{project_id}.scale.test"
        due = i % 100 == 0
        failed = i % 500 == 7
        if due:
            not_after = self.now + 30 * DAY - timedelta(seconds=rng.uniform(0, 3600))
            next_renewal = self.now - timedelta(seconds=rng.uniform(1, 3600))
        else:
            not_after = self.now + 30 * DAY + timedelta(seconds=rng.uniform(3600, 90 * 86400))
            next_renewal = not_after - 30 * DAY + timedelta(seconds=rng.uniform(-3000, 0))
        created = self.created_at(i)
        issued_at = not_after - 90 * DAY
        doc: Doc = {
            "_id": f"crt_{i:016x}", "project_id": project_id, "name": name, "names": [name],
            "identifiers": [{"type": "dns", "value": name}], "key_type": "ec256",
            "challenge": {"type": "http-01"}, "account_id": self.account_id,
            "profile": None,
            "renewal": {"renew_before_days": None, "use_ari": True, "reuse_key": False},
            "directory_url": self.directory_url, "status": "issued", "version": 13,
            "created_at": created, "updated_at": issued_at, "deleted_at": None,
            "next_renewal_at": next_renewal, "renewal_source": "lifetime",
            **self.issued,
            "serial": secrets.token_hex(16), "not_before": issued_at, "not_after": not_after,
            "fingerprint_sha256": secrets.token_hex(32),
            "key_id": "key_" + secrets.token_hex(8), "key_type_issued": "ec256",
            "order_id": "ord_" + secrets.token_hex(8), "issued_at": issued_at,
            "ari_cert_id": secrets.token_urlsafe(20) + "." + secrets.token_urlsafe(12),
            "ari": None, "failure": None, "issue_count": 6,
        }
        if failed:
            doc.update({"status": "failed", "serial": None, "not_before": None,
                        "not_after": None, "fingerprint_sha256": None, "issuer": None,
                        "certificate_pem": None, "chain_pem": None, "fullchain_pem": None,
                        "key_id": None, "order_id": None, "issued_at": None,
                        "ari_cert_id": None, "issue_count": 0,
                        "failure": {"count": 3, "last_error": {
                            "type": "urn:ietf:params:acme:error:unauthorized",
                            "detail": "HTTP-01 answer not found"},
                            "last_failed_at": self.now - DAY,
                            "next_attempt_at": next_renewal, "order_id": None}})
        return doc

    def renewals(self, i: int) -> list[datetime]:
        created = self.created_at(i)
        times = []
        when = created + RENEW_EVERY
        while when < self.now:
            times.append(when)
            when += RENEW_EVERY
        return times

    def job(self, cert: Doc, finished: datetime) -> Doc:
        from bson import ObjectId

        started = finished - timedelta(seconds=self.rng.uniform(0.5, 3))
        created = started - timedelta(seconds=self.rng.uniform(0.01, 2))
        return {
            "_id": str(ObjectId()), "kind": "certificates.issue",
            "payload": {"certificate_id": cert["_id"], "reason": "renewal"},
            "state": "succeeded", "dedupe_key": f"certificate:{cert['_id']}:issue",
            "project_id": cert["project_id"], "attempts": 1, "max_attempts": 10,
            "run_after": created, "wake_at": created + timedelta(seconds=30),
            "created_at": created, "updated_at": finished, "started_at": started,
            "finished_at": finished,
            "lease": {"owner": "worker-0@bench", "token": secrets.token_hex(16),
                      "expires_at": started + timedelta(seconds=60), "claimed_at": started},
            "result": {"outcome": "issued", "certificate_id": cert["_id"],
                       "order_id": "ord_" + secrets.token_hex(8), "serial": cert["serial"],
                       "resumed": False, "not_after": None, "order_seconds": 1.2,
                       "run_seconds": 1.4},
            "last_error": None,
            "history": [{"at": created, "event": "enqueued"},
                        {"at": started, "event": "claimed", "worker": "worker-0@bench"},
                        {"at": finished, "event": "succeeded"}],
            "expire_at": finished + self.retention,
        }

    def grow(self, size: int) -> dict[str, float | None]:
        """Insert certificates up to ``size`` (and their year of audit entries and jobs)."""
        from app.audit import system_actor
        from app.audit.log import CHAIN_ID, build_entry

        actor_cli = system_actor("cli")
        actor_worker = system_actor("worker")
        # The chain continues from its head (issuances between sizes added entries).
        self.audit_seq, self.audit_hash = self._audit_head()
        timings = {"certificates_s": 0.0, "audit_s": 0.0, "jobs_s": 0.0}
        added = {"certificates": 0, "audit": 0, "jobs": 0}
        while self.count < size:
            upto = min(size, self.count + BATCH)
            certs = [self.certificate(i) for i in range(self.count, upto)]
            started = time.perf_counter()
            self.db[dbm.CERTIFICATES].insert_many(certs, ordered=False)
            timings["certificates_s"] += time.perf_counter() - started
            entries: list[Doc] = []
            jobs: list[Doc] = []
            events: list[tuple[datetime, Doc, str]] = []
            for offset, cert in enumerate(certs):
                i = self.count + offset
                events.append((cert["created_at"], cert, "certificate.create"))
                for when in self.renewals(i):
                    events.append((when, cert, "certificate.renew"))
                    finished = when + timedelta(seconds=2)
                    if finished + self.retention > self.now:
                        jobs.append(self.job(cert, finished))
                    elif self.expired_sample < EXPIRED_JOB_SAMPLE and offset % 7 == 0:
                        jobs.append(self.job(cert, finished))  # TTL must sweep these
                        self.expired_sample += 1
            for when, cert, action in events:
                self.audit_seq += 1
                details = ({"names": cert["names"], "key_type": "ec256",
                            "challenge": "http-01", "account_id": self.account_id,
                            "profile": None} if action == "certificate.create" else
                           {"order_id": "ord_" + secrets.token_hex(8),
                            "serial": secrets.token_hex(16), "not_after": when + 90 * DAY,
                            "names": cert["names"], "key_id": "key_" + secrets.token_hex(8),
                            "fingerprint_sha256": secrets.token_hex(32)})
                entry = build_entry(
                    seq=self.audit_seq, prev_hash=self.audit_hash, time=when,
                    actor=actor_cli if action == "certificate.create" else actor_worker,
                    action=action, target=f"certificate:{cert['_id']}",
                    project_id=cert["project_id"], details=details, request_id=None,
                    key=None)
                self.audit_hash = entry["hash"]
                entries.append(entry)
            started = time.perf_counter()
            self.db[dbm.AUDIT].insert_many(entries, ordered=False)
            self.db[dbm.COUNTERS].update_one({"_id": CHAIN_ID}, {"$set": {
                "seq": self.audit_seq, "hash": self.audit_hash}}, upsert=True)
            timings["audit_s"] += time.perf_counter() - started
            if jobs:
                started = time.perf_counter()
                self.db[dbm.JOBS].insert_many(jobs, ordered=False)
                timings["jobs_s"] += time.perf_counter() - started
            self.ids.extend(c["_id"] for c in certs)
            if len(self.sample_targets) < 50:
                self.sample_targets.extend(f"certificate:{c['_id']}" for c in certs[:5])
            added["certificates"] += len(certs)
            added["audit"] += len(entries)
            added["jobs"] += len(jobs)
            self.count = upto
        total = sum(timings.values())
        return {**{k: round(v, 2) for k, v in timings.items()}, "total_s": round(total, 2),
                **{f"added_{k}": v for k, v in added.items()},
                "certificates_per_s": round(added["certificates"] / timings["certificates_s"])
                if timings["certificates_s"] else None,
                "audit_per_s": round(added["audit"] / timings["audit_s"])
                if timings["audit_s"] else None}

    def make_due_again(self) -> int:
        """The 1 % due now again: the previous size's queued jobs, which no worker runs
        here, are cancelled as an operator would, and the due time is set after them
        (a renewal cancelled less than an hour ago is otherwise in hand: not
        re-enqueued before the hour)."""
        now = dbm.server_now(self.db)
        self.db[dbm.JOBS].update_many(
            {"state": "queued", "kind": "certificates.issue"},
            {"$set": {"state": "cancelled", "finished_at": now, "updated_at": now,
                      "expire_at": now + self.retention}})
        due_ids = [f"crt_{i:016x}" for i in range(0, self.count, 100)]
        result = self.db[dbm.CERTIFICATES].update_many(
            {"_id": {"$in": due_ids}}, {"$set": {"next_renewal_at": dbm.server_now(self.db)}})
        return result.modified_count


# -- measuring helpers ---------------------------------------------------------------

def explain(db: Any, collection: str, query: Doc, sort: Doc | None = None,
            limit: int | None = None) -> Doc:
    command: Doc = {"find": collection, "filter": query}
    if sort:
        command["sort"] = sort
    if limit:
        command["limit"] = limit
    result = db.command("explain", command, verbosity="executionStats")
    stats = result.get("executionStats") or {}
    plan = result.get("queryPlanner", {}).get("winningPlan", {})
    stage = plan
    while stage.get("inputStage"):
        stage = stage["inputStage"]
    examined = int(stats.get("totalDocsExamined") or 0)
    returned = int(stats.get("nReturned") or 0)
    index = stage.get("indexName")
    return {"examined": examined, "returned": returned,
            "ratio": round(examined / max(1, returned), 2),
            "plan": f"{stage.get('stage')}{':' + index if index else ''}"}


def window_explain(db: Any, query: Doc, keys: list[str]) -> Doc | None:
    if not keys:
        return None
    last = next(iter(db[dbm.CERTIFICATES].find(query, {keys[0]: 1})
                     .sort([(k, 1) for k in keys]).skip(50).limit(1)), None)
    if last is None:
        return None
    bound = dict(query.get(keys[0]) or {})
    upper = last[keys[0]] + timedelta(milliseconds=1)
    bound["$lt"] = min(bound.get("$lt", upper), upper)
    return explain(db, dbm.CERTIFICATES, {**query, keys[0]: bound}, {k: 1 for k in keys}, 51)


def timed_requests(session: Any, url: str, headers: dict[str, str], count: int,
                   budget: float) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0
    deadline = time.monotonic() + budget
    items = None
    for _ in range(count):
        started = time.perf_counter()
        response = session.get(url, headers=headers, timeout=120)
        latencies.append(time.perf_counter() - started)
        if response.status_code != 200:
            errors += 1
        elif items is None:
            items = len(response.json().get("items") or [])
        if time.monotonic() > deadline:
            break
    return {"n": len(latencies), "p50_ms": ms(pct(latencies, 0.5)),
            "p99_ms": ms(pct(latencies, 0.99)), "errors": errors, "items": items}


def direct_p50(collection: Any, query: Doc, sort: list[tuple[str, int]],
               count: int = 10) -> float | None:
    """p50 (ms) of one 51-document page of ``query`` in ``sort`` order, through pymongo."""
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        list(collection.find(query).sort(sort).limit(51))
        latencies.append(time.perf_counter() - started)
    return ms(pct(latencies, 0.5))


def cursor_keys(session: Any, base: str, path: str, headers: dict[str, str]) -> list[str]:
    """The sort keys a list pages on (``app/api/certificates``: soonest expiry first with
    ``expiring_before``, else creation order), after checking it pages at all."""
    sep = "&" if "?" in path else "?"
    response = session.get(f"{base}{path}{sep}limit=1", headers=headers, timeout=120)
    response.raise_for_status()
    if not response.json().get("next_cursor"):
        return []
    return ["not_after", "_id"] if "expiring_before=" in path else ["created_at", "_id"]


def deep_cursor(db: Any, query: Doc, keys: list[str], fraction: float = 0.8) -> str | None:
    from app.api.common import encode_cursor

    total = db[dbm.CERTIFICATES].count_documents(query)
    skip = int(total * fraction)
    if not keys or skip < 1:
        return None
    doc = next(iter(db[dbm.CERTIFICATES].find(query, {k: 1 for k in keys})
                    .sort([(k, 1) for k in keys]).skip(skip - 1).limit(1)), None)
    return encode_cursor([doc.get(k) for k in keys]) if doc else None


def proc_status(pid: int) -> dict[str, float]:
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = round(int(rest.split()[0]) / 1024, 1)
    return values


def gunicorn_worker(master: int) -> int:
    for _ in range(200):
        children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.1)
    raise SystemExit("gunicorn started no worker")


def collection_sizes(db: Any) -> dict[str, int]:
    existing = set(db.list_collection_names())
    return {name: db[name].count_documents({}) if name in existing else 0
            for name in PER_EVENT}


# -- one size ------------------------------------------------------------------------

class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path, pebble: Pebble) -> None:
        self.args = args
        self.workdir = workdir
        self.pebble = pebble
        self.procs = Procs(workdir)

    def start_db(self) -> None:
        port = embedded.free_port()
        self.db_proc, base_uri = embedded.start(self.workdir / "mongo", port,
                                                log_path=self.workdir / "mongo.log")
        kek_dir = self.workdir / "kek"
        kek_dir.mkdir()
        (kek_dir / "v1.key").write_text(base64.b64encode(os.urandom(32)).decode())
        (kek_dir / "v1.key").chmod(0o600)
        name = "bench_scale"
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith("CAP_")},
                    "CAP_MONGO_URI": base_uri.replace("/?", f"/{name}?"),
                    "CAP_MONGO_DB": name, "CAP_BROKER_DB": name + "_broker",
                    "CAP_KEK_DIR": str(kek_dir), "CAP_LOG_FORMAT": "json",
                    "CAP_LOG_LEVEL": "WARNING", "CAP_API_RATE_LIMIT": "off",
                    "CAP_ACME_DIRECTORY_URL": self.pebble.directory_url,
                    "CAP_ACME_CA_BUNDLE": str(self.pebble.ca_cert),
                    # Pebble has no rate limits; Let's Encrypt's default budget (50
                    # certificates per registered domain a week) stops the renewals here.
                    "CAP_CA_BUDGETS": unlimited_budget(self.pebble.directory_url),
                    "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        os.environ.update({k: v for k, v in self.env.items() if k.startswith("CAP_")})
        self.settings = load_settings()
        self.db = dbm.get_db(self.settings)

    def setup(self) -> None:
        from app.audit import system_actor
        from app.domain import accounts, certificates, projects
        from app.handlers import load_handlers
        from app.migrations import migrate
        from tests.helpers.api import make_admin

        migrate(self.db)
        load_handlers()
        actor = system_actor("bench")
        started = time.perf_counter()
        self.projects = [projects.create_project(self.db, name=f"scale-{p:03d}",
                                                 actor=actor)["_id"]
                         for p in range(self.args.projects)]
        log(f"{len(self.projects)} projects in {time.perf_counter() - started:.1f} s")
        self.admin = make_admin(self.db)
        renew_project = projects.create_project(self.db, name="scale-renewals",
                                                actor=actor)["_id"]
        account = accounts.create_account(self.db, renew_project, {
            "contact": ["bench@example.test"], "terms_agreed": True}, actor,
            settings=self.settings)
        self.renew_ids = [certificates.create_certificate(
            self.db, renew_project, {"names": [f"r{i}.renew.scale.test"]}, actor,
            settings=self.settings)["_id"] for i in range(self.args.renewals)]
        self.seeder = Seeder(self.db, self.projects, account["_id"],
                             self.pebble.directory_url, max(self.args.sizes))
        self.start_api()
        try:
            started = time.perf_counter()
            self.run_issuance("initial")
            log(f"{len(self.renew_ids)} first issuances in "
                f"{time.perf_counter() - started:.1f} s")
        finally:
            self.stop_api()

    def start_api(self) -> None:
        import requests

        self.bind = f"127.0.0.1:{self.pebble.http_port}"
        self.api = self.procs.start("api", [
            sys.executable, "-m", "gunicorn", "-c", "python:app.gunicorn_conf", "--bind",
            self.bind, "--workers", "1", "--timeout", "600", "app:create_app()"], self.env)

        def up() -> bool:
            try:
                return requests.get(f"http://{self.bind}/healthz", timeout=2).status_code == 200
            except requests.RequestException:
                return False

        wait_until(up, 120, "the api")
        self.api_worker = gunicorn_worker(self.api.pid)

    def stop_api(self) -> None:
        self.procs.stop()

    def run_issuance(self, reason: str) -> list[float]:
        from app.audit import system_actor
        from app.domain import certificates
        from app.jobs.runner import run_job

        actor = system_actor("bench")
        run_seconds = []
        for certificate_id in self.renew_ids:
            job = certificates.request_issuance(self.db, certificate_id, actor, reason)
            outcome = run_job(str(job["_id"]), db=self.db, settings=self.settings,
                              worker="bench@scale")
            done = self.db[dbm.JOBS].find_one({"_id": job["_id"]})
            if outcome != "succeeded" or done is None:
                raise SystemExit(f"{reason} of {certificate_id}: {outcome}: "
                                 f"{(done or {}).get('last_error')}")
            run_seconds.append((done["finished_at"] - done["started_at"]).total_seconds())
        return run_seconds

    def measure(self, size: int) -> Doc:
        import requests

        from app.domain import renewal
        from app.jobs import queue_depth

        row: Doc = {"size": size}
        log(f"seeding up to {size}")
        row["seed"] = self.seeder.grow(size)
        log(f"seeded: {row['seed']}")
        row["due"] = self.seeder.make_due_again()
        # The autoscaler's query with no backlog (what the fleet's size alone costs it),
        # then again below with the 1 % the scan enqueues waiting (no worker runs here).
        row["queue_depth_idle_ms"] = ms(pct(self.time_queue_depth(), 0.5))
        now = dbm.server_now(self.db)
        row["scan_explain"] = explain(
            self.db, dbm.CERTIFICATES, certificates_due_query(now),
            {"next_renewal_at": 1}, renewal.SCAN_BATCH)
        started = time.perf_counter()
        scanned = renewal.renewal_scan(self.db, max_batches=1000)
        row["scan_s"] = round(time.perf_counter() - started, 3)
        row["scan_enqueued"] = scanned["enqueued"]
        row["scan_job_inserts_s"] = self.job_inserts_alone(scanned["enqueued"])
        log(f"scan: {scanned} in {row['scan_s']} s; its job inserts alone "
            f"{row['scan_job_inserts_s']} s")
        row["queue_depth_ms"] = ms(pct(self.time_queue_depth(), 0.5))
        row["queue_queued"] = queue_depth(self.db)["queued"]
        row["queue_explain"] = explain(self.db, dbm.JOBS, {"state": "queued"})

        row["metrics"] = self.measure_metrics()
        log(f"metrics: {row['metrics']}")
        self.start_api()
        try:
            row["lists"] = self.measure_lists(requests.Session())
            row["audit"] = self.measure_audit(requests.Session())
            runs = self.run_issuance("renewal")
            row["renewal_job_p50_s"] = round(pct(runs, 0.5) or 0, 3)
            row["renewal_job_p95_s"] = round(pct(runs, 0.95) or 0, 3)
        finally:
            self.stop_api()
        row["sizes"] = collection_sizes(self.db)
        row["load_average"] = [round(v, 2) for v in os.getloadavg()]
        return row

    def job_inserts_alone(self, count: int) -> float:
        """The scan's floor: the jobs it just enqueued, inserted again alone
        (``insert_many`` in the scan's batches) into a scratch collection with the
        ``jobs`` collection's indexes; no reads, no transaction, no broker."""
        from pymongo import IndexModel

        from app.domain import renewal

        made = list(self.db[dbm.JOBS].find(
            {"kind": "certificates.issue", "state": "queued"}, limit=count))
        scratch = self.db["bench_scan_floor"]
        scratch.drop()
        options = ("unique", "sparse", "partialFilterExpression", "expireAfterSeconds")
        scratch.create_indexes([
            IndexModel(list(spec["key"]), name=name,
                       **{k: v for k, v in spec.items() if k in options})
            for name, spec in self.db[dbm.JOBS].index_information().items()
            if name != "_id_"])
        started = time.perf_counter()
        for first in range(0, len(made), renewal.SCAN_BATCH):
            scratch.insert_many(made[first:first + renewal.SCAN_BATCH])
        took = time.perf_counter() - started
        scratch.drop()
        return round(took, 3)

    def time_queue_depth(self) -> list[float]:
        from app.jobs import queue_depth

        times = []
        for _ in range(20):
            started = time.perf_counter()
            queue_depth(self.db)
            times.append(time.perf_counter() - started)
        return times

    def measure_metrics(self) -> Doc:
        import requests

        result: Doc = {}
        fleet_metrics: Any
        try:
            from app import metrics_snapshot as fleet_metrics  # the snapshot design, when present
        except ImportError:
            fleet_metrics = None
        if fleet_metrics is not None:
            started = time.perf_counter()
            fleet_metrics.refresh(self.db, self.settings)
            result["snapshot_refresh_s"] = round(time.perf_counter() - started, 2)
        self.start_api()
        try:
            before = proc_status(self.api_worker)
            started = time.perf_counter()
            response = requests.get(f"http://{self.bind}/metrics", timeout=600)
            elapsed = time.perf_counter() - started
            after = proc_status(self.api_worker)
        finally:
            self.stop_api()
        result.update({"status": response.status_code, "scrape_s": round(elapsed, 3),
                       "bytes": len(response.content),
                       "rss_before_mb": before.get("VmRSS"),
                       "peak_mb": after.get("VmHWM"),
                       "series": sum(1 for line in response.text.splitlines()
                                     if line and not line.startswith("#"))})
        if fleet_metrics is not None:
            # The same snapshot served by an api set to aggregate-only gauges.
            self.env["CAP_METRICS_CERTIFICATE_SERIES"] = "aggregate"
            self.start_api()
            try:
                started = time.perf_counter()
                response = requests.get(f"http://{self.bind}/metrics", timeout=600)
                result["aggregate_scrape_s"] = round(time.perf_counter() - started, 3)
                result["aggregate_bytes"] = len(response.content)
                result["aggregate_peak_mb"] = proc_status(self.api_worker).get("VmHWM")
            finally:
                self.stop_api()
                del self.env["CAP_METRICS_CERTIFICATE_SERIES"]
        return result

    def measure_lists(self, session: Any) -> Doc:
        base = f"http://{self.bind}"
        headers = {"Authorization": f"Bearer {self.admin.token}"}
        project = self.projects[len(self.projects) // 2]
        before = (dbm.server_now(self.db) + 45 * DAY).isoformat().replace("+00:00", "Z")
        filters = {
            "project": (f"/api/v1/certificates?project_id={project}",
                        {"project_id": project}),
            "status": ("/api/v1/certificates?status=issued", {"status": "issued"}),
            "expiring": (f"/api/v1/certificates?expiring_before={before}",
                         {"not_after": {"$lt": datetime.fromisoformat(before)}}),
        }
        out: Doc = {}
        for name, (path, query) in filters.items():
            query = {"deleted_at": None, **query}
            keys = cursor_keys(session, base, path, headers)
            out[f"{name}_explain"] = explain(self.db, dbm.CERTIFICATES, query,
                                             {k: 1 for k in keys}, 51)
            # What the api's first page reads once warm (app.api.common.windowed_paginate):
            # the range of the date key up to where the page's 51st item is.
            out[f"{name}_window_explain"] = window_explain(self.db, query, keys)
            first = timed_requests(session, f"{base}{path}&limit=50", headers,
                                   self.args.requests, self.args.budget)
            cursor = deep_cursor(self.db, query, keys)
            deep = timed_requests(session, f"{base}{path}&limit=50&cursor={cursor}",
                                  headers, self.args.requests, self.args.budget)
            out[f"{name}_first"] = first
            out[f"{name}_deep"] = deep
            log(f"list {name}: first {first}, deep {deep}")
        return out

    def measure_audit(self, session: Any) -> Doc:
        base = f"http://{self.bind}/api/v1/audit"
        headers = {"Authorization": f"Bearer {self.admin.token}"}
        target = self.seeder.sample_targets[len(self.seeder.sample_targets) // 2]
        # A day the simulated year's renewals fill at every size (their 5th round).
        day = dbm.server_now(self.db) - 99 * DAY
        since = day.isoformat().replace("+00:00", "Z")
        until = (day + DAY).isoformat().replace("+00:00", "Z")
        by_target = timed_requests(session, f"{base}?target={target}&limit=50", headers,
                                   self.args.requests, self.args.budget)
        by_time = timed_requests(session, f"{base}?since={since}&until={until}&limit=50",
                                 headers, self.args.requests, self.args.budget)
        # The newest page of the whole log (an admin's first look), read through seq
        # windows below the chain head.
        by_all = timed_requests(session, f"{base}?limit=50", headers, self.args.requests,
                                self.args.budget)
        # What the API asked of the database before it read through windows (one sorted
        # range on seq): the same pages, straight from pymongo, in the same run.
        day_range = {"time": {"$gte": day, "$lt": day + DAY}}
        before = {name: direct_p50(self.db[dbm.AUDIT], query, [("seq", -1)])
                  for name, query in (("time", day_range), ("all", {}))}
        out = {"target": by_target, "time": by_time, "all": by_all, "before": before,
               "target_explain": explain(self.db, dbm.AUDIT, {"target": target},
                                         {"seq": -1}, 51),
               # The first time window the API reads (an hour below the range's end).
               "time_explain": explain(self.db, dbm.AUDIT, {"time": {
                   "$gte": day + DAY - timedelta(hours=1), "$lt": day + DAY}},
                   {"time": -1, "seq": -1}, 51)}
        log(f"audit: {out}")
        return out


def certificates_due_query(now: datetime) -> Doc:
    """The renewal scan's query (``certificates.due_query``)."""
    from app.domain import certificates

    due_query = getattr(certificates, "due_query", None)
    if due_query is not None:
        return dict(due_query(now))
    return {"next_renewal_at": {"$lte": now}, "deleted_at": None}


# -- report --------------------------------------------------------------------------

def figures(row: Doc) -> dict[str, float | None]:
    """The flat figures of one size (the table's columns and the growth factors)."""
    lists = row["lists"]
    flat: dict[str, float | None] = {
        "seed_certs_per_s": row["seed"].get("certificates_per_s"),
        "seed_audit_per_s": row["seed"].get("audit_per_s"),
        "scan_s": row["scan_s"],
        "scan_job_inserts_s": row.get("scan_job_inserts_s"),
        "scan_examined_per_returned": row["scan_explain"]["ratio"],
        "queue_depth_idle_ms": row["queue_depth_idle_ms"],
        "queue_depth_ms": row["queue_depth_ms"],
        "queue_examined_per_returned": row["queue_explain"]["ratio"],
        "metrics_scrape_s": row["metrics"]["scrape_s"],
        "metrics_bytes": row["metrics"]["bytes"],
        "metrics_peak_mb": row["metrics"]["peak_mb"],
        "metrics_snapshot_refresh_s": row["metrics"].get("snapshot_refresh_s"),
        "metrics_aggregate_scrape_s": row["metrics"].get("aggregate_scrape_s"),
        "metrics_aggregate_bytes": row["metrics"].get("aggregate_bytes"),
        "renewal_job_p50_s": row["renewal_job_p50_s"],
        "audit_target_p99_ms": row["audit"]["target"]["p99_ms"],
        "audit_time_p99_ms": row["audit"]["time"]["p99_ms"],
        "audit_all_p99_ms": row["audit"]["all"]["p99_ms"],
        "audit_time_seq_sorted_before_p50_ms": row["audit"]["before"]["time"],
        "audit_all_seq_sorted_before_p50_ms": row["audit"]["before"]["all"],
    }
    for name in ("project", "status", "expiring"):
        for page in ("first", "deep"):
            flat[f"list_{name}_{page}_p50_ms"] = lists[f"{name}_{page}"]["p50_ms"]
            flat[f"list_{name}_{page}_p99_ms"] = lists[f"{name}_{page}"]["p99_ms"]
        flat[f"list_{name}_examined_per_returned"] = lists[f"{name}_explain"]["ratio"]
        window = lists.get(f"{name}_window_explain") or {}
        flat[f"list_{name}_window_examined"] = window.get("examined")
    flat["jobs_docs"] = row["sizes"]["jobs"]
    flat["audit_docs"] = row["sizes"]["audit"]
    return flat


def print_table(rows: list[Doc]) -> None:
    table = [figures(r) for r in rows]
    names = list(table[0])
    width = max(len(n) for n in names) + 2
    print("figure".ljust(width) + "".join(f"{r['size']:>14,}" for r in rows))
    for name in names:
        cells = "".join(f"{'-' if t[name] is None else t[name]:>14}" for t in table)
        print(name.ljust(width) + cells)


def growth(rows: list[Doc]) -> Doc:
    if len(rows) < 2:
        return {}
    small, large = figures(rows[-2]), figures(rows[-1])
    out: Doc = {"from": rows[-2]["size"], "to": rows[-1]["size"]}
    for name, value in large.items():
        base = small.get(name)
        if isinstance(value, (int, float)) and isinstance(base, (int, float)) and base > 0:
            out[name] = round(value / base, 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")],
                        default=[1000, 10000, 100000],
                        help="comma-separated fleet sizes, ascending (default 1000,10000,100000)")
    parser.add_argument("--projects", type=int, default=100)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--budget", type=float, default=60.0,
                        help="seconds at most per series of requests")
    parser.add_argument("--renewals", type=int, default=20)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    if args.sizes != sorted(args.sizes) or args.sizes[0] < 100:
        parser.error("--sizes must be ascending, each at least 100")
    workdir = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    pebble = start_pebble(workdir / "pebble", {"PEBBLE_WFE_NONCEREJECT": "0"})
    bench = Bench(args, workdir, pebble)
    rows: list[Doc] = []
    try:
        bench.start_db()
        bench.setup()
        for size in args.sizes:
            started = time.perf_counter()
            rows.append(bench.measure(size))
            log(f"size {size}: measured in {time.perf_counter() - started:.0f} s")
            # Each size's figures as soon as they are known (a long run may be stopped).
            log(f"figures {size}: {json.dumps(figures(rows[-1]), default=str)}")
        ttl_left = bench.db[dbm.JOBS].count_documents(
            {"expire_at": {"$lt": dbm.server_now(bench.db)}})
    finally:
        bench.procs.stop()
        dbm.close_clients()
        if getattr(bench, "db_proc", None) is not None:
            bench.db_proc.terminate()
            try:
                bench.db_proc.wait(30)
            except subprocess.TimeoutExpired:
                bench.db_proc.kill()
        pebble.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print_table(rows)
    print("per-event collections after the simulated year:")
    for row in rows:
        print(f"  {row['size']:>7,}: " + ", ".join(f"{k} {v:,}" for k, v in row["sizes"].items()))
    print("query plans (explain):")
    for row in rows:
        plans = {"scan": row["scan_explain"]["plan"], "queue": row["queue_explain"]["plan"],
                 **{k[:-8]: v["plan"] for k, v in row["lists"].items()
                    if k.endswith("_explain") and v is not None},
                 "audit_target": row["audit"]["target_explain"]["plan"],
                 "audit_time": row["audit"]["time_explain"]["plan"]}
        print(f"  {row['size']:>7,}: " + ", ".join(f"{k} {v}" for k, v in plans.items()))
    print(f"expired jobs not yet swept at the end: {ttl_left}")
    print(json.dumps({"sizes": {str(r["size"]): {**figures(r), "detail": r} for r in rows},
                      "growth": growth(rows), "expired_jobs_unswept": ttl_left},
                     default=str))


if __name__ == "__main__":
    main()
