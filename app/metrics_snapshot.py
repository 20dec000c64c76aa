"""Fleet gauges from one shared snapshot instead of a fleet read at every scrape.

Reading every certificate at every scrape on every api replica costs each replica a
collection scan per scrape interval (100,000 documents at 100,000 certificates). Instead
the scheduler leader enqueues ``metrics.snapshot`` every 60 s (``scheduler/timed.py``),
one worker runs it, and every api replica serves what it wrote:

- the *head* document (``metrics_snapshots/_id: "head"``): when it was built, the
  aggregate gauges (certificates by status, a days-left gauge histogram, the soonest
  expiry per project), jobs by kind and state, and the generation of its chunks;
- *chunks*: the per-certificate series (cert-manager-like expiry, renewal and ready
  gauges), as zlib-compressed exposition text, ``CHUNK_CERTIFICATES`` certificates per
  document per family. A scrape streams them one at a time, so an api process holds one
  chunk in memory whatever the fleet size. Chunks of all but the last two generations
  are deleted at each refresh, and every chunk expires (TTL on ``expire_at``) in case
  refreshes stop.

``CAP_METRICS_CERTIFICATE_SERIES=aggregate`` (Helm ``metrics.certificateSeries``) drops
the per-certificate series: the snapshot writes no chunks and the api serves none, only
the aggregates, which are always there. The snapshot's age is itself a gauge
(``certautopilot_metrics_snapshot_age_seconds``) so a stalled refresh is visible.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from bson import Binary, ObjectId
from prometheus_client.core import GaugeHistogramMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.utils import floatToGoString
from pymongo.database import Database

from app import db as dbm
from app.config import METRICS_CERTIFICATE_SERIES, Settings, load_settings
from app.db import Doc

log = logging.getLogger(__name__)

SNAPSHOT_KIND = "metrics.snapshot"
HEAD_ID = "head"
CHUNK_CERTIFICATES = 5000
# Chunks outlive two refreshes by far; they expire if refreshes stop (the head stays).
CHUNK_TTL = timedelta(minutes=15)
PER_CERTIFICATE, AGGREGATE = METRICS_CERTIFICATE_SERIES
READY_STATUSES = ("issued", "valid", "ready")
DAYS_LEFT_BUCKETS = (0.0, 7.0, 14.0, 21.0, 30.0, 60.0, 90.0)

LABELS = ("id", "name", "project", "issuer")
# (name, help, extra label) of each per-certificate family, in exposition order.
FAMILIES = (
    ("certautopilot_certificate_expiration_timestamp_seconds",
     "Expiry (notAfter) of the certificate currently issued, as a Unix timestamp.", None),
    ("certautopilot_certificate_renewal_timestamp_seconds",
     "When the certificate is next due for renewal, as a Unix timestamp.", None),
    ("certautopilot_certificate_ready_status",
     "Whether the certificate is ready (issued and valid): one series per condition.",
     "condition"),
)
PROJECTION = {"_id": 1, "name": 1, "names": 1, "project_id": 1, "status": 1, "not_after": 1,
              "next_renewal_at": 1, "account_id": 1, "directory_url": 1}


def _ts(value: Any) -> float | None:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.timestamp()
    return None


def _label(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


class _ChunkWriter:
    """Buffers one family's exposition lines; writes a compressed chunk per
    ``CHUNK_CERTIFICATES`` certificates."""

    def __init__(self, db: Database[Doc], generation: str, family: int,
                 expire_at: datetime) -> None:
        self.db = db
        self.generation = generation
        self.family = family
        self.expire_at = expire_at
        self.lines: list[str] = []
        self.certificates = 0
        self.chunks = 0

    def add(self, lines: list[str]) -> None:
        self.lines.extend(lines)
        self.certificates += 1
        if self.certificates % CHUNK_CERTIFICATES == 0:
            self.flush()

    def flush(self) -> None:
        if not self.lines:
            return
        data = zlib.compress("".join(self.lines).encode(), 6)
        self.lines = []
        doc = {"_id": f"{self.generation}:{self.family}:{self.chunks:06d}", "kind": "chunk",
               "generation": self.generation, "family": self.family, "seq": self.chunks,
               "data": Binary(data), "expire_at": self.expire_at}
        # An upsert by _id: a retry after a lost reply writes the same chunk again.
        dbm.retry(lambda: self.db[dbm.METRICS_SNAPSHOTS].replace_one(
            {"_id": doc["_id"]}, doc, upsert=True), what="write metrics chunk")
        self.chunks += 1


def series_mode(settings: Settings | None) -> str:
    return (settings or load_settings()).metrics_certificate_series


def refresh(db: Database[Doc], settings: Settings | None = None, *,
            check: Callable[[], None] | None = None) -> Doc:
    """Read the fleet once and publish a new snapshot; return its summary.

    ``check`` (the job's lease check) runs between chunks, so a worker that lost its lease
    stops writing; a half-written generation is never published (the head moves last)."""
    started = time.monotonic()
    mode = series_mode(settings)
    now = dbm.server_now(db)
    generation = str(ObjectId())
    expire_at = now + CHUNK_TTL
    writers = [_ChunkWriter(db, generation, i, expire_at) for i in range(len(FAMILIES))]
    by_status: Counter[str] = Counter()
    buckets = [0] * len(DAYS_LEFT_BUCKETS)
    days_count, days_sum = 0, 0.0
    soonest: dict[str, float] = {}
    count = 0
    cursor = dbm.primary(db)[dbm.CERTIFICATES].find({"deleted_at": None}, PROJECTION,
                                                    batch_size=2000)
    for doc in cursor:
        count += 1
        status = str(doc.get("status") or "")
        by_status[status] += 1
        project = str(doc.get("project_id") or "")
        not_after = _ts(doc.get("not_after"))
        if not_after is not None and status in READY_STATUSES:
            days = (not_after - now.timestamp()) / 86400
            days_count += 1
            days_sum += days
            for i, le in enumerate(DAYS_LEFT_BUCKETS):
                if days <= le:
                    buckets[i] += 1
            if project not in soonest or not_after < soonest[project]:
                soonest[project] = not_after
        if mode == PER_CERTIFICATE:
            _add_certificate_lines(writers, doc, status, not_after, now.timestamp())
            if check is not None and count % CHUNK_CERTIFICATES == 0:
                check()
    for writer in writers:
        writer.flush()
    if check is not None:
        check()
    jobs = [{"kind": str((row["_id"] or {}).get("kind")),
             "state": str((row["_id"] or {}).get("state")), "n": int(row["n"])}
            for row in db[dbm.JOBS].aggregate([{"$group": {
                "_id": {"kind": "$kind", "state": "$state"}, "n": {"$sum": 1}}}])]
    head: Doc = {
        "_id": HEAD_ID, "kind": "head", "generation": generation, "built_at": now,
        "build_seconds": round(time.monotonic() - started, 3), "mode": mode,
        "certificates": count, "by_status": dict(by_status),
        "days_left": {"buckets": buckets, "count": days_count, "sum": round(days_sum, 3)},
        "soonest_expiry": soonest,
        "families": [w.chunks for w in writers], "jobs": jobs,
    }
    collection = dbm.primary(db)[dbm.METRICS_SNAPSHOTS]
    previous = collection.find_one({"_id": HEAD_ID}, {"generation": 1}) or {}
    dbm.retry(lambda: collection.replace_one({"_id": HEAD_ID}, head, upsert=True),
              what="publish metrics snapshot")
    # Keep the previous generation: a scrape that read the old head may still stream it.
    keep = [generation, previous.get("generation")]
    dbm.retry(lambda: collection.delete_many({"kind": "chunk", "generation": {"$nin": keep}}),
              what="drop old metrics chunks")
    summary = {"generation": generation, "certificates": count, "mode": mode,
               "chunks": sum(head["families"]), "build_seconds": head["build_seconds"]}
    log.info("metrics snapshot published", extra=summary)
    return summary


def _add_certificate_lines(writers: list[_ChunkWriter], doc: Doc, status: str,
                           not_after: float | None, now: float) -> None:
    name = doc.get("name") or ",".join(doc.get("names") or [])
    issuer = str(doc.get("directory_url") or doc.get("account_id") or "")
    labels = ",".join(f'{k}="{_label(str(v))}"' for k, v in zip(
        LABELS, (doc["_id"], name, doc.get("project_id") or "", issuer), strict=True))
    expiry, renewal, ready = writers
    if not_after is not None:
        expiry.add([f"{FAMILIES[0][0]}{{{labels}}} {floatToGoString(not_after)}\n"])
    else:
        expiry.add([])
    next_renewal = _ts(doc.get("next_renewal_at"))
    if next_renewal is not None:
        renewal.add([f"{FAMILIES[1][0]}{{{labels}}} {floatToGoString(next_renewal)}\n"])
    else:
        renewal.add([])
    is_ready = status in READY_STATUSES and (not_after is None or not_after > now)
    ready.add([f'{FAMILIES[2][0]}{{{labels},condition="{c}"}} '
               f'{"1.0" if (c == "True") == is_ready else "0.0"}\n' for c in ("True", "False")])


# ------------------------------------------------------------------ serving (api)
def read_head(db: Database[Doc]) -> Doc | None:
    """The current snapshot's head (one small read per scrape), or None before the
    first refresh."""
    return dbm.retry(lambda: db[dbm.METRICS_SNAPSHOTS].find_one({"_id": HEAD_ID}),
                     what="read metrics snapshot")


def aggregate_metrics(head: Doc | None) -> Iterator[Metric]:
    """The gauges every scrape serves from the head: aggregates, jobs, the snapshot age."""
    stamp = GaugeMetricFamily("certautopilot_metrics_snapshot_timestamp_seconds",
                              "When the fleet snapshot these gauges come from was built "
                              "(0: none yet).")
    age = GaugeMetricFamily("certautopilot_metrics_snapshot_age_seconds",
                            "Seconds since the fleet snapshot was built (-1: none yet); "
                            "refreshed every 60 s by one worker.")
    built = _ts((head or {}).get("built_at"))
    stamp.add_metric([], built or 0.0)
    age.add_metric([], round(time.time() - built, 3) if built else -1.0)
    yield stamp
    yield age
    if head is None:
        return
    statuses = GaugeMetricFamily("certautopilot_certificates",
                                 "Managed certificates (not deleted), by status.",
                                 labels=["status"])
    for status, n in sorted((head.get("by_status") or {}).items()):
        statuses.add_metric([status], float(n))
    yield statuses
    days = head.get("days_left") or {}
    counts = list(days.get("buckets") or [0] * len(DAYS_LEFT_BUCKETS))
    buckets = [(floatToGoString(le), float(n)) for le, n in zip(DAYS_LEFT_BUCKETS, counts,
                                                                 strict=False)]
    buckets.append(("+Inf", float(days.get("count") or 0)))
    yield GaugeHistogramMetricFamily(
        "certautopilot_certificate_days_left",
        "Issued certificates by days until notAfter (le: at most that many; 0: expired).",
        buckets=buckets, gsum_value=float(days.get("sum") or 0.0))
    soonest = GaugeMetricFamily("certautopilot_project_soonest_expiry_timestamp_seconds",
                                "The earliest notAfter among a project's issued "
                                "certificates, as a Unix timestamp.", labels=["project"])
    for project, when in sorted((head.get("soonest_expiry") or {}).items()):
        soonest.add_metric([project], float(when))
    yield soonest
    jobs = GaugeMetricFamily("certautopilot_jobs", "Jobs currently stored, by kind and state "
                             "(from the fleet snapshot).", labels=["kind", "state"])
    for row in head.get("jobs") or []:
        jobs.add_metric([row["kind"], row["state"]], float(row["n"]))
    yield jobs


def stream_certificate_series(db: Database[Doc], head: Doc | None,
                              settings: Settings | None) -> Iterator[bytes]:
    """The per-certificate families of ``head``, one chunk at a time (nothing in
    aggregate mode or before the first snapshot)."""
    if head is None or series_mode(settings) != PER_CERTIFICATE:
        return
    collection = db[dbm.METRICS_SNAPSHOTS]
    for family, chunks in enumerate(head.get("families") or []):
        if not chunks:
            continue
        name, help_text, _extra = FAMILIES[family]
        yield f"# HELP {name} {help_text}\n# TYPE {name} gauge\n".encode()
        for doc in collection.find({"generation": head["generation"], "family": family},
                                   {"data": 1}).sort("seq", 1):
            yield zlib.decompress(doc["data"])

