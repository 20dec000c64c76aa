"""Alert rules, alerts and their delivery.

**Rules** (evaluated by ``alerts.evaluate``, which the scheduler leader enqueues every
30 s; every worker also checks the scheduler-leader rule itself, since a missing leader
enqueues nothing):

- ``certificate_expiry`` (threshold: each of ``CAP_ALERT_EXPIRY_DAYS``): an issued
  certificate is N days or less from expiry.
- ``renewal_failures`` (threshold ``CAP_ALERT_RENEWAL_FAILURES``): K failed issuances
  in a row, with the CA's problem.
- ``drift`` (threshold: stale / foreign): an endpoint serves an older or a foreign
  certificate; ``endpoint_unreachable``: an endpoint failed two scans in a row.
- ``renewal_not_verified``: a renewal's endpoints still do not serve it after every
  verification attempt.
- ``dead_job``: a durable job went ``dead``.
- ``scheduler_leader``: no scheduler held the lease for
  ``CAP_ALERT_LEADER_MISSING_SECONDS``.
- ``audit_sink``: an audit sink is ``failing`` or ``stalled``.
- ``kek_rotation_blocked``: a KEK rotation is blocked (missing or wrong KEK).

**Once per rule, threshold and subject**: an alert is a document in ``alerts`` whose
``key`` (``rule|threshold|subject``) is unique among open alerts (a partial unique index),
so any number of evaluators (3 api replicas, 20 workers) open it once; when its condition
is gone it is resolved (once: a conditional update) and a resolved message follows. For
expiry only the tightest threshold crossed opens (a certificate first seen at 13 days
gets the 14-day alert, not 30 and 14 at once).

**Delivery**: opening or resolving writes, in the same transaction (with its audit
entry), one message per matching channel in ``alert_deliveries`` with a per-channel
sequence number; a durable job ``alerts.deliver`` per channel (one active at a time)
sends them in sequence order, each marked sent (and audited, ``alert.sent``) in a
transaction fenced by the job's lease. A channel that fails keeps its backlog: the job
waits ``CAP_ALERT_RETRY_BASE_SECONDS`` doubling up to ``CAP_ALERT_RETRY_MAX_SECONDS``
(without spending attempts) and goes on from the first unsent message when the channel
is back. Delivery is at least once: a worker killed between the send and its commit
sends that one message again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from bson import ObjectId
from pymongo import ASCENDING, DESCENDING, ReturnDocument
from pymongo.client_session import ClientSession
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError

from app import audit
from app import db as dbm
from app.config import Settings
from app.config.watch import WatchSettings, watch_settings
from app.db import Doc
from app.domain import drift
from app.errors import CertAutoPilotError
from app.ops.alerts import channels, senders

log = logging.getLogger(__name__)

EVALUATE_JOB_KIND = "alerts.evaluate"
DELIVER_JOB_KIND = "alerts.deliver"

RULES = ("certificate_expiry", "renewal_failures", "drift", "endpoint_unreachable",
         "renewal_not_verified", "dead_job", "scheduler_leader", "audit_sink",
         "kek_rotation_blocked")
OPEN, RESOLVED = "open", "resolved"
PENDING, SENT = "pending", "sent"
UNREACHABLE_AFTER = 2  # consecutive failed scans before an endpoint alert
DEAD_JOBS_LIMIT = 500
# Kept this long for the record (TTL on ``expire_at``, m0011); the audit log keeps more.
SENT_RETENTION = timedelta(days=30)
RESOLVED_RETENTION = timedelta(days=90)


class ChannelSendFailed(CertAutoPilotError):
    status, code = 502, "channel_send_failed"


@dataclass
class Condition:
    rule: str
    threshold: str
    subject: str
    project_id: str | None
    summary: str
    details: Doc = field(default_factory=dict)
    opens: bool = True

    @property
    def key(self) -> str:
        return f"{self.rule}|{self.threshold}|{self.subject}"


# ------------------------------------------------------------------ rules
def _aware(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    return None


def _label(cert: Doc) -> str:
    return f"{cert.get('name') or ','.join(cert.get('names') or [])} ({cert['_id']})"


def _expiry(db: Database[Doc], now: datetime, watch: WatchSettings) -> list[Condition]:
    days = sorted(watch.alert_expiry_days, reverse=True)
    horizon = now + timedelta(days=days[0])
    found = []
    for cert in db[dbm.CERTIFICATES].find(
            {"deleted_at": None, "status": "issued", "not_after": {"$lte": horizon}},
            {"name": 1, "names": 1, "project_id": 1, "not_after": 1, "serial": 1,
             "next_renewal_at": 1, "failure": 1}):
        not_after = _aware(cert.get("not_after"))
        if not_after is None:
            continue
        left = (not_after - now).total_seconds() / 86400
        crossed = [d for d in days if left <= d]
        for threshold in crossed:
            when = "has expired" if left <= 0 else f"expires in {left:.1f} days"
            found.append(Condition(
                "certificate_expiry", str(threshold), f"certificate:{cert['_id']}",
                cert.get("project_id"),
                f"certificate {_label(cert)} {when} and is not renewed (threshold "
                f"{threshold} days)",
                {"not_after": not_after, "serial": cert.get("serial"),
                 "next_renewal_at": cert.get("next_renewal_at"),
                 "last_failure": (cert.get("failure") or {}).get("last_error")},
                opens=threshold == crossed[-1]))
    return found


def _renewal_failures(db: Database[Doc], now: datetime,
                      watch: WatchSettings) -> list[Condition]:
    k = watch.alert_renewal_failures
    found = []
    for cert in db[dbm.CERTIFICATES].find({"deleted_at": None, "failure.count": {"$gte": k}},
                                          {"name": 1, "names": 1, "project_id": 1,
                                           "failure": 1}):
        failure = cert.get("failure") or {}
        problem = failure.get("last_error") or {}
        found.append(Condition(
            "renewal_failures", str(k), f"certificate:{cert['_id']}", cert.get("project_id"),
            f"issuance of certificate {_label(cert)} failed {failure.get('count')} times in "
            f"a row: {problem.get('type') or problem.get('problem_type') or '?'}: "
            f"{str(problem.get('detail') or '')[:300]}",
            {"failures": failure.get("count"), "problem": problem,
             "next_attempt_at": failure.get("next_attempt_at")}))
    return found


def _drift(db: Database[Doc], now: datetime, watch: WatchSettings) -> list[Condition]:
    found = []
    for scan in db[dbm.ENDPOINT_SCANS].find(
            {"state": {"$in": [drift.STALE, drift.FOREIGN, drift.UNREACHABLE]}}):
        state = scan["state"]
        what = f"endpoint {scan.get('key')} of certificate {scan['certificate_id']}"
        served = scan.get("served") or {}
        if state == drift.UNREACHABLE:
            if int(scan.get("consecutive_failures") or 0) < UNREACHABLE_AFTER:
                continue
            found.append(Condition("endpoint_unreachable", "", f"endpoint:{scan['_id']}",
                                   scan.get("project_id"),
                                   f"{what} is unreachable: {scan.get('error')}",
                                   {"error": scan.get("error"),
                                    "scanned_at": scan.get("scanned_at")}))
            continue
        found.append(Condition(
            "drift", state, f"endpoint:{scan['_id']}", scan.get("project_id"),
            f"{what} serves {'an older' if state == drift.STALE else 'a foreign'} "
            f"certificate (serial {served.get('serial')}, issuer {served.get('issuer')})",
            {"served": served, "expected_fingerprint_sha256": scan.get("compared_with"),
             "scanned_at": scan.get("scanned_at")}))
    return found


def _not_verified(db: Database[Doc], now: datetime, watch: WatchSettings) -> list[Condition]:
    found = []
    for cert in db[dbm.CERTIFICATES].find(
            {"deleted_at": None, "verification.state": "unverified"},
            {"name": 1, "names": 1, "project_id": 1, "verification": 1}):
        verification = cert["verification"]
        failing = verification.get("failing") or []
        found.append(Condition(
            "renewal_not_verified", "",
            f"certificate:{cert['_id']}@{str(verification.get('fingerprint_sha256'))[:16]}",
            cert.get("project_id"),
            f"the renewal of certificate {_label(cert)} is not served by "
            f"{len(failing)} endpoint(s): "
            + ", ".join(f"{f.get('endpoint')} ({f.get('state')})" for f in failing[:5]),
            {"failing": failing, "attempts": verification.get("attempts"),
             "serial": verification.get("serial")}))
    return found


def _dead_jobs(db: Database[Doc], now: datetime, watch: WatchSettings) -> list[Condition]:
    return [Condition("dead_job", "", f"job:{job['_id']}", job.get("project_id"),
                      f"job {job['_id']} ({job.get('kind')}) is dead after "
                      f"{job.get('attempts')} attempts: {str(job.get('last_error'))[:300]}",
                      {"kind": job.get("kind"), "attempts": job.get("attempts"),
                       "last_error": str(job.get("last_error") or "")[:1000]})
            for job in db[dbm.JOBS].find({"state": "dead"},
                                         {"kind": 1, "attempts": 1, "last_error": 1,
                                          "project_id": 1},
                                         sort=[("_id", DESCENDING)], limit=DEAD_JOBS_LIMIT)]


def _leader(db: Database[Doc], now: datetime, watch: WatchSettings) -> list[Condition]:
    from app.db.schedule import lease_status

    status = lease_status(db, now)
    if status["state"] not in ("expired", "released"):
        return []  # held, or never taken (a new install: nothing to miss yet)
    since = _aware(status.get("released_at")) if status["state"] == "released" else None
    since = since or _aware(status.get("expires_at"))
    if since is None or (now - since).total_seconds() < watch.alert_leader_missing_seconds:
        return []
    return [Condition("scheduler_leader", "", "scheduler", None,
                      f"no scheduler has held the leader lease for "
                      f"{(now - since).total_seconds():.0f} s (last holder "
                      f"{status.get('holder')}): no renewals or timed work are enqueued",
                      {"since": since, "last_holder": status.get("holder"),
                       "term": status.get("term")})]


def _audit_sinks(db: Database[Doc], now: datetime, watch: WatchSettings) -> list[Condition]:
    from app.audit.status import sink_status

    return [Condition("audit_sink", "", f"sink:{row['name']}", None,
                      f"audit sink {row['name']} ({row['target']}) is {row['status']}: "
                      + str(row.get("last_error") or f"{row['lag']} entries waiting"),
                      {"status": row["status"], "lag": row["lag"],
                       "last_error": row.get("last_error")})
            for row in sink_status(db) if row["status"] in ("failing", "stalled")]


def _kek(db: Database[Doc], now: datetime, watch: WatchSettings) -> list[Condition]:
    from app.keys.rotation import running_rotation

    rotation = running_rotation(db)
    if rotation is None or not int(rotation.get("error_count") or 0) \
            or not rotation.get("last_error"):
        return []
    return [Condition("kek_rotation_blocked", "", f"kek_rotation:{rotation['_id']}", None,
                      f"KEK rotation to v{rotation.get('target_version')} is blocked: "
                      f"{rotation.get('last_error')}",
                      {"target_version": rotation.get("target_version"),
                       "error_count": rotation.get("error_count")})]


Collector = Callable[[Database[Doc], datetime, WatchSettings], list[Condition]]
COLLECTORS: dict[str, Collector] = {
    "certificate_expiry": _expiry, "renewal_failures": _renewal_failures, "drift": _drift,
    "endpoint_unreachable": _drift, "renewal_not_verified": _not_verified,
    "dead_job": _dead_jobs, "scheduler_leader": _leader, "audit_sink": _audit_sinks,
    "kek_rotation_blocked": _kek,
}


# ------------------------------------------------------------------ open / resolve
def _message(alert: Doc, event: str) -> Doc:
    return {"event": event, "alert_id": alert["_id"], "rule": alert["rule"],
            "threshold": alert["threshold"] or None, "subject": alert["subject"],
            "project_id": alert.get("project_id"), "summary": alert["summary"],
            "details": alert.get("details") or {}, "opened_at": alert.get("opened_at"),
            "resolved_at": alert.get("resolved_at")}


def _queue(db: Database[Doc], session: ClientSession, alert: Doc, event: str) -> list[str]:
    """One message per channel that takes this alert, in each channel's sequence."""
    scopes = [channels.GLOBAL] + ([alert["project_id"]] if alert.get("project_id") else [])
    targets = [c for c in db[dbm.ALERT_CHANNELS].find(
        {"scope": {"$in": scopes}, "enabled": True}, {"rules": 1, "name": 1},
        session=session) if not c.get("rules") or alert["rule"] in c["rules"]]
    now = datetime.now(UTC)
    for channel in targets:
        bumped = db[dbm.ALERT_CHANNELS].find_one_and_update(
            {"_id": channel["_id"]}, {"$inc": {"next_seq": 1}}, projection={"next_seq": 1},
            return_document=ReturnDocument.AFTER, session=session)
        seq = int((bumped or {}).get("next_seq") or 0)
        db[dbm.ALERT_DELIVERIES].insert_one({
            "_id": f"{channel['_id']}:{seq:012d}", "channel_id": channel["_id"], "seq": seq,
            "alert_id": alert["_id"], "event": event, "message": _message(alert, event),
            "state": PENDING, "created_at": now, "attempts": 0, "last_error": None,
            "sent_at": None}, session=session)
    return [str(c["_id"]) for c in targets]


def _wake(db: Database[Doc], channel_ids: list[str], settings: Settings) -> None:
    from app.jobs import enqueue

    for channel_id in channel_ids:
        try:
            enqueue(db, DELIVER_JOB_KIND, {"channel_id": channel_id},
                    dedupe_key=f"alerts.deliver:{channel_id}", settings=settings)
        except Exception as exc:  # noqa: BLE001 - the next evaluation sweeps pending ones
            log.warning("could not enqueue an alert delivery; the next evaluation will",
                        extra={"channel_id": channel_id, "error": str(exc)[:200]})


def open_alert(db: Database[Doc], cond: Condition, actor: audit.Actor,
               now: datetime) -> list[str] | None:
    """Open the alert unless it is open already; the channels it was queued for."""
    alert: Doc = {"_id": f"alr_{ObjectId()}", "key": cond.key, "rule": cond.rule,
                  "threshold": cond.threshold, "subject": cond.subject,
                  "project_id": cond.project_id,
                  "summary": cond.summary[:1000], "details": cond.details, "state": OPEN,
                  "opened_at": now, "resolved_at": None}
    def write(session: ClientSession) -> list[str]:
        db[dbm.ALERTS].insert_one(alert, session=session)
        queued = _queue(db, session, alert, "firing")
        audit.record(db, session, actor=actor, action="alert.open",
                     target=f"alert:{alert['_id']}", project_id=cond.project_id,
                     details={"rule": cond.rule, "threshold": cond.threshold,
                              "subject": cond.subject, "channels": queued})
        return queued

    try:
        return dbm.transaction(db, write, what="open alert")
    except DuplicateKeyError:
        return None  # another evaluator opened it first


def resolve_alert(db: Database[Doc], alert: Doc, actor: audit.Actor,
                  now: datetime) -> list[str] | None:
    def write(session: ClientSession) -> list[str] | None:
        done = db[dbm.ALERTS].find_one_and_update(
            {"_id": alert["_id"], "state": OPEN},
            {"$set": {"state": RESOLVED, "resolved_at": now,
                      "expire_at": now + RESOLVED_RETENTION}},
            return_document=ReturnDocument.AFTER, session=session)
        if done is None:
            return None  # resolved by another evaluator
        queued = _queue(db, session, done, "resolved")
        audit.record(db, session, actor=actor, action="alert.resolve",
                     target=f"alert:{alert['_id']}", project_id=alert.get("project_id"),
                     details={"rule": alert["rule"], "threshold": alert["threshold"],
                              "subject": alert["subject"], "channels": queued})
        return queued

    return dbm.transaction(db, write, what="resolve alert")


def evaluate(db: Database[Doc], *, settings: Settings, rules: tuple[str, ...] = RULES,
             actor: audit.Actor | None = None,
             check_lease: Callable[[], None] | None = None) -> Doc:
    """Open what fires and is not open yet, resolve what is open and no longer fires,
    and wake the delivery of every channel with messages waiting."""
    actor = actor or audit.system_actor("worker")
    watch = watch_settings(settings)
    now = dbm.server_now(db)
    conditions: dict[str, Condition] = {}
    for collector in dict.fromkeys(COLLECTORS[r] for r in rules):
        for cond in collector(db, now, watch):
            if cond.rule in rules:
                conditions[cond.key] = cond
    opened = resolved = 0
    wake: set[str] = set()
    open_now = {a["key"]: a for a in db[dbm.ALERTS].find({"state": OPEN,
                                                          "rule": {"$in": list(rules)}})}
    for key, alert in open_now.items():
        if key not in conditions:
            if check_lease is not None:
                check_lease()
            queued = resolve_alert(db, alert, actor, now)
            if queued is not None:
                resolved += 1
                wake.update(queued)
    for key, cond in conditions.items():
        if key in open_now or not cond.opens:
            continue
        if check_lease is not None:
            check_lease()
        queued = open_alert(db, cond, actor, now)
        if queued is not None:
            opened += 1
            wake.update(queued)
    # Messages queued while a channel's delivery job was finishing wait for a sweep.
    wake.update(str(c) for c in db[dbm.ALERT_DELIVERIES].distinct("channel_id",
                                                                  {"state": PENDING}))
    _wake(db, sorted(wake), settings)
    return {"opened": opened, "resolved": resolved, "open": len(open_now) + opened - resolved,
            "channels_woken": len(wake)}


# ------------------------------------------------------------------ delivery
class RetryChannel(Exception):  # noqa: N818 - control flow for the job handler
    def __init__(self, delay: float, reason: str) -> None:
        super().__init__(reason)
        self.delay = delay
        self.reason = reason


def _note_failure(db: Database[Doc], channel: Doc, delivery: Doc, error: str,
                  watch: WatchSettings) -> float:
    now = datetime.now(UTC)
    # The first failure of a streak starts it (``failure`` is null while the channel works).
    db[dbm.ALERT_CHANNELS].update_one({"_id": channel["_id"], "failure": None},
                                      {"$set": {"failure": {"count": 0, "since": now}}})
    updated = db[dbm.ALERT_CHANNELS].find_one_and_update(
        {"_id": channel["_id"]},
        {"$inc": {"failure.count": 1},
         "$set": {"failure.last_error": error[:500], "failure.last_failed_at": now}},
        return_document=ReturnDocument.AFTER) or {}
    failure = updated.get("failure") or {}
    db[dbm.ALERT_DELIVERIES].update_one({"_id": delivery["_id"]},
                                        {"$inc": {"attempts": 1},
                                         "$set": {"last_error": error[:500]}})
    count = int(failure.get("count") or 1)
    return min(watch.alert_retry_max_seconds,
               watch.alert_retry_base_seconds * 2 ** min(count - 1, 30))


def deliver(db: Database[Doc], channel_id: str, *, settings: Settings,
            run_txn: Callable[[Callable[[ClientSession], Any]], Any],
            check_lease: Callable[[], None]) -> Doc:
    """Send the channel's waiting messages in sequence order (see the module doc).
    Raises RetryChannel(delay, reason) when the channel does not take one."""
    watch = watch_settings(settings)
    channel = db[dbm.ALERT_CHANNELS].find_one({"_id": channel_id})
    if channel is None:
        return {"sent": 0, "why": "channel deleted"}
    if not channel.get("enabled", True):
        return {"sent": 0, "why": "channel disabled"}
    sent = 0
    actor = audit.system_actor("worker")
    while True:
        check_lease()
        delivery = dbm.primary(db)[dbm.ALERT_DELIVERIES].find_one(
            {"channel_id": channel_id, "state": PENDING}, sort=[("seq", ASCENDING)])
        if delivery is None:
            break
        message = {**delivery["message"], "delivery_id": delivery["_id"]}
        try:
            senders.send(db, channel, message, timeout=watch.alert_send_timeout_seconds)
        except (senders.SendError, CertAutoPilotError) as exc:
            error = exc.message if isinstance(exc, CertAutoPilotError) else str(exc)
            delay = _note_failure(db, channel, delivery, error, watch)
            log.warning("alert channel did not take a message; retrying later", extra={
                "channel_id": channel_id, "error": error[:300], "retry_in_s": delay,
                "event": "alert.send_failed"})
            raise RetryChannel(delay, f"channel {channel.get('name')}: {error}") from None

        def mark(session: ClientSession, d: Doc = delivery) -> None:
            now = datetime.now(UTC)
            db[dbm.ALERT_DELIVERIES].update_one(
                {"_id": d["_id"], "state": PENDING},
                {"$set": {"state": SENT, "sent_at": now, "expire_at": now + SENT_RETENTION},
                 "$inc": {"attempts": 1}},
                session=session)
            db[dbm.ALERT_CHANNELS].update_one(
                {"_id": channel_id}, {"$set": {"failure": None, "last_success_at": now}},
                session=session)
            audit.record(db, session, actor=actor, action="alert.sent",
                         target=f"alert:{d['alert_id']}",
                         project_id=d["message"].get("project_id"),
                         details={"channel_id": channel_id, "channel": channel.get("name"),
                                  "event": d["event"], "delivery_id": d["_id"],
                                  "rule": d["message"].get("rule"),
                                  "target": channel.get("target")})

        run_txn(mark)
        sent += 1
    return {"sent": sent}


def send_test(db: Database[Doc], channel: Doc, actor: audit.Actor, *,
              settings: Settings) -> Doc:
    """Send a test message to ``channel`` now (not queued); audited when it arrived."""
    watch = watch_settings(settings)
    now = datetime.now(UTC)
    message: Doc = {"event": "test", "alert_id": None, "rule": "test", "threshold": None,
               "subject": f"alert_channel:{channel['_id']}",
               "project_id": channel.get("project_id"),
               "summary": f"test message for alert channel {channel['name']} "
                          f"({channel.get('target')})", "details": {}, "opened_at": now,
               "resolved_at": None, "delivery_id": f"test-{now.timestamp():.0f}"}
    try:
        senders.send(db, channel, message, timeout=watch.alert_send_timeout_seconds)
    except (senders.SendError, CertAutoPilotError) as exc:
        error = exc.message if isinstance(exc, CertAutoPilotError) else str(exc)
        raise ChannelSendFailed(f"test message not delivered: {error}") from None

    def record(session: ClientSession) -> None:
        audit.record(db, session, actor=actor, action="alert.test_sent",
                     target=f"alert_channel:{channel['_id']}",
                     project_id=channel.get("project_id"),
                     details={"channel": channel["name"], "target": channel.get("target")})

    dbm.transaction(db, record, what="audit test alert")
    return {"channel": channel["name"], "target": channel.get("target"), "sent": True}


def list_alerts(db: Database[Doc], *, project_id: str | None = None,
                state: str | None = OPEN, limit: int = 100) -> list[Doc]:
    query: Doc = {}
    if state:
        query["state"] = state
    if project_id is not None:
        query["project_id"] = project_id
    return list(db[dbm.ALERTS].find(query).sort("opened_at", DESCENDING).limit(
        max(1, min(limit, 1000))))


def alert_metrics(db: Any) -> Any:
    from prometheus_client.core import GaugeMetricFamily

    gauge = GaugeMetricFamily("certautopilot_alerts_open", "Open alerts, by rule.",
                              labels=["rule"])
    counts = dict.fromkeys(RULES, 0)
    for row in db[dbm.ALERTS].aggregate([{"$match": {"state": OPEN}},
                                         {"$group": {"_id": "$rule", "n": {"$sum": 1}}}]):
        counts[str(row["_id"])] = int(row["n"])
    for rule, n in counts.items():
        gauge.add_metric([rule], float(n))
    pending = GaugeMetricFamily("certautopilot_alert_messages_pending",
                                "Alert messages not yet taken by their channel.")
    pending.add_metric([], float(db[dbm.ALERT_DELIVERIES].count_documents(
        {"state": PENDING})))
    yield gauge
    yield pending
