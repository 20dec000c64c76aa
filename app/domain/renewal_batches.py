"""Emergency and bulk renewal: renew a selection of certificates now, as one tracked batch.

When a CA announces a mass revocation, operators must renew everything affected at once
without overwhelming the CA. A batch selects live, issued certificates by issuer,
project, expiry or a list of serials (the CA's notice), or all of them, and enqueues one
``certificates.issue`` job per certificate (reason ``emergency``, the batch's id in the
payload) in one transaction with its audit entries: one for the batch, one per
certificate. The jobs go through the shared CA budget (``app.domain.budget``) like every
order, so a batch of thousands waits for tokens instead of hitting the CA's limits.

A batch document (``renewal_batches``)::

    _id, project_id (None: every project, admins only), selector, reason, state
    (active | cancelled), created_at, created_by, total, items [{certificate_id, job_id,
    already_queued}], unmatched_serials

Its progress is read from its jobs: queued (queued or running), done (succeeded), failed
(dead), cancelled. Cancelling cancels the jobs still queued; running ones finish.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from bson import ObjectId
from pymongo.client_session import ClientSession
from pymongo.database import Database

from app import audit, jobs
from app import db as dbm
from app.db import Doc
from app.domain import certificates
from app.errors import Conflict, NotFound, ValidationFailed

COLLECTION = dbm.RENEWAL_BATCHES
REASON = "emergency"
SELECTOR_KEYS = ("all", "issuer", "project_id", "expiring_before", "serials")
MAX_SERIALS = 100_000
_SERIAL_RE = re.compile(r"^[0-9a-f]{1,64}$")
_BATCH_ID_RE = re.compile(r"^[0-9a-f]{24}$")


def normalize_serial(value: str) -> str | None:
    """A serial as we store it (lowercase hex, no leading zeros), from hex with optional
    colons or spaces between bytes; None if it is not one."""
    text = value.strip().lower().replace(":", "").replace(" ", "")
    if text.startswith("0x"):
        text = text[2:]
    if not _SERIAL_RE.match(text):
        return None
    return text.lstrip("0") or "0"


def parse_serial_lines(lines: Iterable[str]) -> list[str]:
    """Serials from a CA's notice, one per line (blank lines and ``#`` comments skipped).
    Every garbage line is reported by its number; nothing is returned then."""
    serials: list[str] = []
    errors: dict[str, list[str]] = {}
    for number, line in enumerate(lines, start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        serial = normalize_serial(text)
        if serial is None:
            errors[f"line {number}"] = [f"{text[:80]!r} is not a certificate serial "
                                        "(hexadecimal, colons allowed)"]
        else:
            serials.append(serial)
    if errors:
        first = next(iter(errors))
        raise ValidationFailed(f"the serial list has {len(errors)} bad line(s), first at "
                               f"{first}: {errors[first][0]}", errors=errors)
    if not serials:
        raise ValidationFailed("the serial list names no serial")
    if len(serials) > MAX_SERIALS:
        raise ValidationFailed(f"at most {MAX_SERIALS} serials per batch")
    return list(dict.fromkeys(serials))


def validate_selector(selector: Any) -> Doc:
    """One of the selections, or several (all must hold); refuse anything else."""
    if not isinstance(selector, dict) or not selector:
        raise ValidationFailed("say which certificates to renew: all, issuer, project_id, "
                               "expiring_before or serials")
    unknown = sorted(set(selector) - set(SELECTOR_KEYS))
    if unknown:
        raise ValidationFailed(f"unknown selection {unknown[0]!r}",
                               errors={k: ["unknown field"] for k in unknown})
    clean: Doc = {}
    errors: dict[str, list[str]] = {}
    if "all" in selector:
        if selector["all"] is not True:
            errors["all"] = ["true, or leave it out"]
        clean["all"] = True
    if "issuer" in selector:
        issuer = selector["issuer"]
        if not isinstance(issuer, str) or not issuer.strip() or len(issuer) > 500:
            errors["issuer"] = ["part of the issuer's name, e.g. 'R11' or 'Pebble'"]
        else:
            clean["issuer"] = issuer.strip()
    if "project_id" in selector:
        if not isinstance(selector["project_id"], str) or not selector["project_id"]:
            errors["project_id"] = ["a project id"]
        else:
            clean["project_id"] = selector["project_id"]
    if "expiring_before" in selector:
        when = selector["expiring_before"]
        if not isinstance(when, datetime) or when.tzinfo is None:
            errors["expiring_before"] = ["a date-time with a time zone"]
        else:
            clean["expiring_before"] = when
    if "serials" in selector:
        serials = selector["serials"]
        if not isinstance(serials, list) or not serials or len(serials) > MAX_SERIALS:
            errors["serials"] = [f"a list of 1 to {MAX_SERIALS} serials"]
        else:
            bad = [i for i, s in enumerate(serials)
                   if not isinstance(s, str) or normalize_serial(s) is None]
            if bad:
                errors["serials"] = [f"item {i}: not a certificate serial (hex)"
                                     for i in bad[:20]]
            else:
                clean["serials"] = list(dict.fromkeys(normalize_serial(s) or ""
                                                      for s in serials))
    if errors:
        first = next(iter(errors))
        raise ValidationFailed(f"bad selection: {first}: {errors[first][0]}", errors=errors)
    if clean.get("all") and len(clean) > 1:
        raise ValidationFailed("'all' cannot be combined with another selection")
    return clean


def _query(selector: Doc, project_id: str | None) -> Doc:
    query: Doc = {"deleted_at": None, "certificate_pem": {"$nin": [None, ""]}}
    if project_id is not None:
        query["project_id"] = project_id
    if "project_id" in selector:
        if project_id is not None and selector["project_id"] != project_id:
            raise NotFound(f"project {selector['project_id']!r} not found")
        query["project_id"] = selector["project_id"]
    if "issuer" in selector:
        query["issuer"] = {"$regex": re.escape(selector["issuer"]), "$options": "i"}
    if "expiring_before" in selector:
        query["not_after"] = {"$lt": selector["expiring_before"]}
    if "serials" in selector:
        query["serial"] = {"$in": selector["serials"]}
    return query


def _described(selector: Doc) -> Doc:
    """The selection as plain JSON for the audit entry (a serial list by its size)."""
    out: Doc = {}
    for key, value in selector.items():
        if key == "serials":
            out["serials"] = len(value)
        elif isinstance(value, datetime):
            out[key] = value.isoformat()
        else:
            out[key] = value
    return out


def start_batch(db: Database[Doc], selector: Any, actor: audit.Actor, *,
                project_id: str | None = None, request_key: str | None = None) -> Doc:
    """Select and enqueue (see the module docstring). ``project_id``: the caller's scope
    (a project token's project; None for an admin: every project). ``request_key`` (an
    API request's idempotency reservation) is stored on the batch for ``made_under``."""
    from app.jobs import enqueue, publish_wakeup

    clean = validate_selector(selector)
    query = _query(clean, project_id)
    selected = dbm.retry(lambda: list(dbm.primary(db)[dbm.CERTIFICATES].find(
        query, {"_id": 1, "project_id": 1, "serial": 1, "names": 1})),
        what="select certificates to renew")
    if not selected:
        # A well-formed selection that the fleet does not match now: the server's state.
        raise Conflict("no live issued certificate matches this selection; nothing "
                       "was enqueued")
    unmatched = sorted(set(clean.get("serials", [])) - {c.get("serial") for c in selected})
    batch_id = str(ObjectId())
    now = dbm.server_now(db)

    def save(session: ClientSession) -> Doc:
        items = []
        for cert in selected:
            job = enqueue(db, certificates.ISSUE_JOB_KIND, {
                "certificate_id": cert["_id"], "reason": REASON, "batch_id": batch_id},
                dedupe_key=certificates.dedupe_key(cert["_id"]),
                project_id=cert["project_id"], session=session, publish=False)
            already = (job.get("payload") or {}).get("batch_id") != batch_id
            items.append({"certificate_id": cert["_id"], "job_id": str(job["_id"]),
                          "already_queued": already})
            audit.record(db, session, actor=actor, action="certificate.renew_requested",
                         target=f"certificate:{cert['_id']}",
                         project_id=cert["project_id"],
                         details={"batch_id": batch_id, "job_id": str(job["_id"]),
                                  "reason": REASON, "already_queued": already})
        batch = {"_id": batch_id, "project_id": project_id, "selector": clean,
                 "reason": REASON, "state": "active", "created_at": now,
                 "created_by": actor.id, "total": len(items), "items": items,
                 "unmatched_serials": unmatched}
        if request_key is not None:
            batch["request_key"] = request_key
        db[COLLECTION].insert_one(batch, session=session)
        audit.record(db, session, actor=actor, action="renewal_batch.create",
                     target=f"renewal_batch:{batch_id}", project_id=project_id,
                     details={"selector": _described(clean),
                              "total": len(items), "unmatched_serials": len(unmatched)})
        return batch

    batch = dbm.transaction(db, save, what="start renewal batch")
    for item in batch["items"]:
        if not item["already_queued"]:
            publish_wakeup(item["job_id"])
    return progress(db, batch)


def made_under(db: Database[Doc], request_key: str, *, project_id: str | None) -> Doc | None:
    """The batch (with its progress) that a request with this idempotency reservation
    already started in this scope, or None: a retry that took over the key of a request
    whose process died after its commit answers with it instead of renewing the
    selection a second time (its jobs may have finished already, so the active-job
    dedupe would not stop a second order each)."""
    doc = dbm.retry(lambda: dbm.primary(db)[COLLECTION].find_one(
        {"project_id": project_id, "request_key": request_key}), what="read renewal batch")
    return None if doc is None else progress(db, doc)


def get_batch(db: Database[Doc], batch_id: str, *, project_id: str | None = None) -> Doc:
    doc = None
    if isinstance(batch_id, str) and _BATCH_ID_RE.match(batch_id):
        doc = dbm.retry(lambda: db[COLLECTION].find_one({"_id": batch_id}),
                        what="read renewal batch")
    if doc is None or (project_id is not None and doc.get("project_id") != project_id):
        raise NotFound(f"renewal batch {batch_id!r} not found")
    return progress(db, doc)


def progress(db: Database[Doc], batch: Doc) -> Doc:
    """The batch with its counts, read from its jobs."""
    job_ids = [i["job_id"] for i in batch.get("items") or []]
    states: dict[str, int] = {}
    for row in dbm.retry(lambda: list(db[dbm.JOBS].aggregate([
            {"$match": {"_id": {"$in": job_ids}}},
            {"$group": {"_id": "$state", "n": {"$sum": 1}}}])), what="count batch jobs"):
        states[str(row["_id"])] = int(row["n"])
    counts = {"total": int(batch.get("total") or len(job_ids)),
              "queued": states.get("queued", 0) + states.get("running", 0),
              "running": states.get("running", 0),
              "done": states.get("succeeded", 0), "failed": states.get("dead", 0),
              "cancelled": states.get("cancelled", 0)}
    out = {k: v for k, v in batch.items() if k not in ("items", "request_key")}
    out["counts"] = counts
    out["finished"] = counts["queued"] == 0
    out["certificates"] = [i["certificate_id"] for i in batch.get("items") or []]
    return out


def cancel_batch(db: Database[Doc], batch_id: str, actor: audit.Actor, *,
                 project_id: str | None = None) -> Doc:
    """Cancel the batch's jobs that are still queued (running ones finish); audited once."""
    batch = get_batch(db, batch_id, project_id=project_id)
    doc = db[COLLECTION].find_one({"_id": batch_id}) or {}
    job_ids = [i["job_id"] for i in doc.get("items") or [] if not i.get("already_queued")]
    now = dbm.server_now(db)

    def save(session: ClientSession) -> int:
        cancelled = jobs.cancel_queued(db, job_ids, actor=actor, session=session, now=now,
                                       reason=f"renewal batch {batch_id} cancelled")
        db[COLLECTION].update_one({"_id": batch_id}, {"$set": {
            "state": "cancelled", "cancelled_at": now, "cancelled_by": actor.id}},
            session=session)
        audit.record(db, session, actor=actor, action="renewal_batch.cancel",
                     target=f"renewal_batch:{batch_id}", project_id=batch.get("project_id"),
                     details={"jobs_cancelled": cancelled})
        return cancelled

    dbm.transaction(db, save, what="cancel renewal batch")
    return get_batch(db, batch_id, project_id=project_id)
