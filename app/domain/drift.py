"""Drift: is the certificate we issued the one actually served?

A certificate may list endpoints (``host:port``, an optional SNI name, an optional
``starttls`` of ``smtp``, ``imap`` or ``postgres``). Each endpoint has a document in
``endpoint_scans`` (created and removed with the certificate's endpoint list, in the same
transaction) with its own ``next_scan_at``: the first one is the endpoint's hash-derived
offset inside ``CAP_DRIFT_SCAN_INTERVAL_SECONDS``, so 10,000 endpoints spread over the hour
instead of firing at once. The scheduler leader enqueues ``certificates.drift_scan`` every
minute; a scan probes the endpoints that are due, a batch at a time, in parallel threads.

A probe connects (TCP, then the STARTTLS exchange when one is named, then TLS with a
timeout) and reads the served leaf certificate without any trust decision: it records what
is served (SHA-256 fingerprint of the leaf's DER, serial, not-after, issuer, when) and one
state: ``ok`` (the certificate's current one), ``stale`` (an older certificate CertAutoPilot
issued for it), ``foreign`` (anything else), ``unreachable`` (with the error), ``pending``
(not scanned yet); plus the flag ``expiring`` when the served not-after is within the
largest alert threshold (``CAP_ALERT_EXPIRY_DAYS``).

After a renewal (``schedule_verification``, called in the renewal's transaction) a
``certificates.verify_served`` job is enqueued ``CAP_DRIFT_VERIFY_DELAY_SECONDS`` later; it
scans that certificate's endpoints and marks the renewal ``verified`` only when every
endpoint serves the new certificate, else retries (the same delay apart, up to
``CAP_DRIFT_VERIFY_ATTEMPTS`` attempts in all) and then flags it ``unverified`` (an
alert). A later regular scan that finds every endpoint right settles it as ``verified``.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import logging
import re
import socket
import ssl
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509
from pymongo import ASCENDING, UpdateOne
from pymongo.client_session import ClientSession
from pymongo.database import Database

from app import audit
from app import db as dbm
from app.config import Settings
from app.config.watch import WatchSettings, watch_settings
from app.db import Doc
from app.errors import ValidationFailed

log = logging.getLogger(__name__)

SCAN_JOB_KIND = "certificates.drift_scan"
VERIFY_JOB_KIND = "certificates.verify_served"

STARTTLS_KINDS = ("smtp", "imap", "postgres")
MAX_ENDPOINTS = 50
OK, STALE, FOREIGN, UNREACHABLE, PENDING = "ok", "stale", "foreign", "unreachable", "pending"
STATES = (OK, STALE, FOREIGN, UNREACHABLE, PENDING)
EXPIRING = "expiring"
SCAN_BATCH = 100
PROBE_THREADS = 16

_HOST = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?\.)*"
                   r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?\.?$")


# ------------------------------------------------------------------ endpoints
@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    sni: str | None = None
    starttls: str | None = None

    @property
    def key(self) -> str:
        """Stable identity inside one certificate: host:port, /sni, +starttls."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}" + (f"/{self.sni}" if self.sni else "") + (
            f"+{self.starttls}" if self.starttls else "")

    def as_doc(self) -> Doc:
        return {"host": self.host, "port": self.port, "sni": self.sni,
                "starttls": self.starttls}

    @classmethod
    def from_doc(cls, doc: Doc) -> Endpoint:
        return cls(str(doc["host"]), int(doc["port"]), doc.get("sni"), doc.get("starttls"))


def _valid_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return bool(_HOST.fullmatch(host))


def parse_endpoint(value: Any) -> Endpoint:
    """An endpoint from ``"host:port"`` (``[v6]:port``) or ``{host, port, sni, starttls}``;
    ValueError says what is wrong."""
    if isinstance(value, str):
        text = value.strip()
        m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})", text) or \
            re.fullmatch(r"([^:\[\]/\s]+):(\d{1,5})", text)
        if not m:
            raise ValueError(f"{value!r}: expected host:port (IPv6 as [addr]:port)")
        value = {"host": m.group(1), "port": int(m.group(2))}
    if not isinstance(value, dict):
        raise ValueError("an endpoint is \"host:port\" or {host, port, sni, starttls}")
    unknown = set(value) - {"host", "port", "sni", "starttls"}
    if unknown:
        raise ValueError(f"unknown endpoint fields: {', '.join(sorted(unknown))}")
    host, port = value.get("host"), value.get("port")
    sni, starttls = value.get("sni"), value.get("starttls")
    if not isinstance(host, str) or not _valid_host(host.strip().lower()):
        raise ValueError(f"host {host!r}: a DNS name or an IP address")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"port {port!r}: an integer from 1 to 65535")
    if sni is not None and (not isinstance(sni, str) or not _HOST.fullmatch(sni)
                            or _is_ip(sni)):
        raise ValueError(f"sni {sni!r}: a DNS name")
    if starttls is not None and starttls not in STARTTLS_KINDS:
        raise ValueError(f"starttls {starttls!r}: one of {', '.join(STARTTLS_KINDS)}")
    return Endpoint(host.strip().lower().rstrip("."), port,
                    sni.lower().rstrip(".") if sni else None, starttls)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def validate_endpoints(value: Any) -> list[Doc]:
    """The normalised endpoint list of a certificate spec; ValidationFailed otherwise."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValidationFailed("endpoints: a list of \"host:port\" or {host, port, sni, "
                               "starttls}", errors={"endpoints": ["a list"]})
    if len(value) > MAX_ENDPOINTS:
        raise ValidationFailed(f"endpoints: at most {MAX_ENDPOINTS}",
                               errors={"endpoints": [f"at most {MAX_ENDPOINTS}"]})
    found: dict[str, Endpoint] = {}
    for index, item in enumerate(value):
        try:
            endpoint = parse_endpoint(item)
        except ValueError as exc:
            raise ValidationFailed(f"endpoints[{index}]: {exc}",
                                   errors={"endpoints": [f"[{index}]: {exc}"]}) from None
        if endpoint.key in found:
            message = f"[{index}]: {endpoint.key} is listed twice"
            raise ValidationFailed(f"endpoints{message}", errors={"endpoints": [message]})
        found[endpoint.key] = endpoint
    return [e.as_doc() for e in found.values()]


def scan_id(certificate_id: str, endpoint: Endpoint) -> str:
    return f"{certificate_id}|{endpoint.key}"


def _offset(key: str, interval: float) -> timedelta:
    digest = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return timedelta(seconds=(digest % max(1, int(interval * 1000))) / 1000)


def sync_endpoints(db: Database[Doc], session: ClientSession, certificate_id: str,
                   project_id: str, endpoints: Iterable[Doc] | None, *,
                   settings: Settings | None = None) -> None:
    """Make ``endpoint_scans`` match the certificate's endpoint list (in the caller's
    transaction): new endpoints are due at their offset in the interval, so a new
    certificate's endpoints do not all fire at the next scan; removed ones go."""
    from app.config import load_settings

    watch = watch_settings(settings or load_settings())
    wanted = {scan_id(certificate_id, Endpoint.from_doc(e)): Endpoint.from_doc(e)
              for e in endpoints or []}
    scans = db[dbm.ENDPOINT_SCANS]
    scans.delete_many({"certificate_id": certificate_id, "_id": {"$nin": list(wanted)}},
                      session=session)
    existing = {d["_id"] for d in scans.find({"certificate_id": certificate_id},
                                             {"_id": 1}, session=session)}
    now = datetime.now(UTC)
    for sid, endpoint in wanted.items():
        if sid in existing:
            continue
        scans.insert_one({
            "_id": sid, "certificate_id": certificate_id, "project_id": project_id,
            "endpoint": endpoint.as_doc(), "key": endpoint.key, "state": PENDING,
            "flags": [], "served": None, "error": None, "scanned_at": None,
            "consecutive_failures": 0,
            "next_scan_at": now + _offset(sid, watch.drift_scan_interval_seconds),
        }, session=session)


# ------------------------------------------------------------------ probing
@dataclass(frozen=True)
class Served:
    fingerprint_sha256: str
    serial: str
    not_before: datetime
    not_after: datetime
    issuer: str
    subject: str

    def as_doc(self) -> Doc:
        return {"fingerprint_sha256": self.fingerprint_sha256, "serial": self.serial,
                "not_before": self.not_before, "not_after": self.not_after,
                "issuer": self.issuer, "subject": self.subject}


class ProbeError(Exception):
    """The endpoint could not be read (the message is the recorded error)."""


def describe_der(der: bytes) -> Served:
    cert = x509.load_der_x509_certificate(der)
    return Served(hashlib.sha256(der).hexdigest(), format(cert.serial_number, "x"),
                  cert.not_valid_before_utc, cert.not_valid_after_utc,
                  cert.issuer.rfc4514_string(), cert.subject.rfc4514_string())


def _readline(sock: socket.socket, limit: int = 4096) -> bytes:
    data = bytearray()
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise ProbeError("connection closed during the STARTTLS exchange")
        data += chunk
        if len(data) > limit:
            raise ProbeError("STARTTLS: line too long")
    return bytes(data)


def _smtp_reply(sock: socket.socket) -> tuple[int, bytes]:
    while True:
        line = _readline(sock)
        if len(line) < 4 or not line[:3].isdigit():
            raise ProbeError(f"SMTP: unexpected reply {line[:60]!r}")
        if line[3:4] != b"-":
            return int(line[:3]), line


def _starttls(sock: socket.socket, kind: str) -> None:
    """Bring a plaintext connection to the point where the TLS handshake starts."""
    if kind == "smtp":
        code, line = _smtp_reply(sock)
        if code != 220:
            raise ProbeError(f"SMTP greeting {line[:60]!r}")
        sock.sendall(b"EHLO certautopilot.drift-scan\r\n")
        code, line = _smtp_reply(sock)
        if code != 250:
            raise ProbeError(f"SMTP EHLO refused: {line[:60]!r}")
        sock.sendall(b"STARTTLS\r\n")
        code, line = _smtp_reply(sock)
        if code != 220:
            raise ProbeError(f"SMTP STARTTLS refused: {line[:60]!r}")
    elif kind == "imap":
        line = _readline(sock)
        if not line.startswith(b"* OK"):
            raise ProbeError(f"IMAP greeting {line[:60]!r}")
        sock.sendall(b"cap1 STARTTLS\r\n")
        while True:
            line = _readline(sock)
            if line.startswith(b"cap1 "):
                if not line.startswith(b"cap1 OK"):
                    raise ProbeError(f"IMAP STARTTLS refused: {line[:60]!r}")
                return
    elif kind == "postgres":
        sock.sendall(struct.pack("!ii", 8, 80877103))  # SSLRequest
        answer = sock.recv(1)
        if answer != b"S":
            raise ProbeError(f"PostgreSQL refused SSL (answered {answer!r})")
    else:
        raise ProbeError(f"unknown starttls {kind!r}")


def probe(endpoint: Endpoint, timeout: float) -> Served:
    """Read the leaf certificate ``endpoint`` serves (no trust decision: expired,
    self-signed or mismatched certificates are read all the same)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    server_name = endpoint.sni or (None if _is_ip(endpoint.host) else endpoint.host)
    try:
        with socket.create_connection((endpoint.host, endpoint.port), timeout=timeout) as raw:
            raw.settimeout(timeout)
            if endpoint.starttls:
                _starttls(raw, endpoint.starttls)
            with context.wrap_socket(raw, server_hostname=server_name) as tls:
                der = tls.getpeercert(binary_form=True)
    except ProbeError:
        raise
    except (OSError, ssl.SSLError, ValueError) as exc:  # ValueError: e.g. IDNA of the name
        raise ProbeError(f"{exc.__class__.__name__}: {exc}"[:300]) from None
    if not der:
        raise ProbeError("the server sent no certificate")
    try:
        return describe_der(der)
    except ValueError as exc:
        raise ProbeError(f"unreadable certificate: {exc}"[:300]) from None


# ------------------------------------------------------------------ classification
def _ours(db: Database[Doc], serials: Iterable[str]) -> dict[str, str]:
    """serial -> certificate id, for serials CertAutoPilot issued (completed orders)."""
    wanted = sorted({s for s in serials if s})
    if not wanted:
        return {}
    return {str(o["serial"]): str(o.get("certificate_id")) for o in db[dbm.ORDERS].find(
        {"serial": {"$in": wanted}}, {"serial": 1, "certificate_id": 1})}


def classify(cert: Doc, served: Served | None, ours: dict[str, str], now: datetime,
             watch: WatchSettings) -> tuple[str, list[str]]:
    if served is None:
        return UNREACHABLE, []
    flags = []
    horizon = now + timedelta(days=max(watch.alert_expiry_days))
    if served.not_after <= horizon:
        flags.append(EXPIRING)
    if served.fingerprint_sha256 == cert.get("fingerprint_sha256"):
        return OK, flags
    if ours.get(served.serial) == cert["_id"]:
        return STALE, flags
    return FOREIGN, flags


@dataclass
class ScanResult:
    scan_id: str
    certificate_id: str
    endpoint: Endpoint
    state: str
    flags: list[str]
    served: Served | None
    error: str | None


def _probe_all(targets: list[tuple[str, Doc, Endpoint]], timeout: float
               ) -> list[tuple[str, Doc, Endpoint, Served | None, str | None]]:
    def one(item: tuple[str, Doc, Endpoint]
            ) -> tuple[str, Doc, Endpoint, Served | None, str | None]:
        sid, cert, endpoint = item
        try:
            return sid, cert, endpoint, probe(endpoint, timeout), None
        except ProbeError as exc:
            return sid, cert, endpoint, None, str(exc)

    if len(targets) <= 1:
        return [one(t) for t in targets]
    with ThreadPoolExecutor(max_workers=min(PROBE_THREADS, len(targets)),
                            thread_name_prefix="drift-probe") as pool:
        return list(pool.map(one, targets))


def _record(db: Database[Doc], probed: list[tuple[str, Doc, Endpoint, Served | None,
                                                  str | None]],
            watch: WatchSettings, now: datetime) -> list[ScanResult]:
    ours = _ours(db, [s.serial for _, _, _, s, _ in probed if s is not None])
    interval = timedelta(seconds=watch.drift_scan_interval_seconds)
    scans = dbm.primary(db)[dbm.ENDPOINT_SCANS]
    slots = {d["_id"]: d.get("next_scan_at") for d in scans.find(
        {"_id": {"$in": [p[0] for p in probed]}}, {"next_scan_at": 1})}
    results = []
    writes = []
    for sid, cert, endpoint, served, error in probed:
        state, flags = classify(cert, served, ours, now, watch)
        results.append(ScanResult(sid, cert["_id"], endpoint, state, flags, served, error))
        # Keep the endpoint's phase in the interval: the next slot after now.
        nxt = slots.get(sid) or now
        if nxt <= now:
            nxt += interval * (int((now - nxt) / interval) + 1)
        update: Doc = {"$set": {"state": state, "flags": flags, "error": error,
                                "scanned_at": now, "next_scan_at": nxt,
                                "compared_with": cert.get("fingerprint_sha256")}}
        if served is not None:
            update["$set"]["served"] = served.as_doc()
            update["$set"]["consecutive_failures"] = 0
        else:
            update["$inc"] = {"consecutive_failures": 1}
        # Observations, not changes anyone made: plain writes, never older over newer.
        writes.append(UpdateOne({"_id": sid, "scanned_at": {"$not": {"$gt": now}}}, update))
    if writes:
        dbm.retry(functools.partial(scans.bulk_write, writes, ordered=False),
                  what="record endpoint scans")
    return results


def scan_certificate(db: Database[Doc], cert: Doc, *,
                     settings: Settings) -> list[ScanResult]:
    """Probe every endpoint of ``cert`` now and record what each serves."""
    watch = watch_settings(settings)
    targets = [(scan_id(cert["_id"], Endpoint.from_doc(e)), cert, Endpoint.from_doc(e))
               for e in cert.get("endpoints") or []]
    now = dbm.server_now(db)
    return _record(db, _probe_all(targets, watch.drift_connect_timeout_seconds), watch, now)


def _due(db: Database[Doc], now: datetime, limit: int) -> list[Doc]:
    return list(dbm.primary(db)[dbm.ENDPOINT_SCANS].find(
        {"next_scan_at": {"$lte": now}}, {"certificate_id": 1, "endpoint": 1},
        sort=[("next_scan_at", ASCENDING)], limit=limit))


def scan_due(db: Database[Doc], *, settings: Settings, budget_seconds: float = 40.0,
             batch_size: int = SCAN_BATCH,
             check_lease: Callable[[], None] | None = None) -> Doc:
    """Probe the endpoints whose ``next_scan_at`` has come, a batch at a time, until
    none is due or the budget is spent (the next scan continues)."""
    watch = watch_settings(settings)
    deadline = time.monotonic() + budget_seconds
    counts = dict.fromkeys(STATES, 0)
    scanned = 0
    settled: set[str] = set()
    while time.monotonic() < deadline:
        if check_lease is not None:
            check_lease()
        now = dbm.server_now(db)
        due = dbm.retry(functools.partial(_due, db, now, batch_size), what="find due scans")
        if not due:
            break
        cert_ids = sorted({d["certificate_id"] for d in due})
        certs = {c["_id"]: c for c in db[dbm.CERTIFICATES].find(
            {"_id": {"$in": cert_ids}},
            {"fingerprint_sha256": 1, "deleted_at": 1, "project_id": 1, "verification": 1,
             "endpoints": 1})}
        targets = []
        for d in due:
            cert = certs.get(d["certificate_id"])
            if cert is None or cert.get("deleted_at") is not None:
                db[dbm.ENDPOINT_SCANS].delete_one({"_id": d["_id"]})
                continue
            targets.append((d["_id"], cert, Endpoint.from_doc(d["endpoint"])))
        for result in _record(db, _probe_all(targets, watch.drift_connect_timeout_seconds),
                              watch, now):
            counts[result.state] += 1
            scanned += 1
            settled.add(result.certificate_id)
        if len(due) < batch_size:
            break
    verified = settle_verifications(db, sorted(settled))
    return {"scanned": scanned, "states": {k: v for k, v in counts.items() if v},
            "verified": verified}


# ------------------------------------------------------------------ verification
def schedule_verification(db: Database[Doc], session: ClientSession, cert: Doc,
                          issued: Doc, *, settings: Settings | None = None) -> None:
    """In a renewal's transaction: the new certificate is to be checked on every
    endpoint after the configured delay (nothing to do without endpoints)."""
    if not cert.get("endpoints"):
        return
    from app.config import load_settings
    from app.jobs import enqueue

    watch = watch_settings(settings or load_settings())
    now = datetime.now(UTC)
    due = now + timedelta(seconds=watch.drift_verify_delay_seconds)
    db[dbm.CERTIFICATES].update_one({"_id": cert["_id"]}, {"$set": {"verification": {
        "state": PENDING, "fingerprint_sha256": issued["fingerprint_sha256"],
        "serial": issued["serial"], "requested_at": now, "due_at": due, "attempts": 0,
        "failing": [], "settled_at": None}}}, session=session)
    enqueue(db, VERIFY_JOB_KIND, {"certificate_id": cert["_id"]},
            dedupe_key=f"certificate:{cert['_id']}:verify", run_after=due,
            project_id=cert.get("project_id"), session=session, publish=False)


def _failing(results: list[ScanResult]) -> list[Doc]:
    return [{"endpoint": r.endpoint.key, "state": r.state, "error": r.error,
             "served_fingerprint_sha256": r.served.fingerprint_sha256 if r.served else None}
            for r in results if r.state != OK]


def _settle(db: Database[Doc], session: ClientSession, cert: Doc, state: str,
            failing: list[Doc], attempts: int) -> bool:
    verification = cert.get("verification") or {}
    now = datetime.now(UTC)
    done = db[dbm.CERTIFICATES].update_one(
        {"_id": cert["_id"], "verification.fingerprint_sha256":
         verification.get("fingerprint_sha256"), "verification.state": verification.get(
             "state")},
        {"$set": {"verification.state": state, "verification.failing": failing,
                  "verification.attempts": attempts, "verification.settled_at": now}},
        session=session).modified_count
    if done:
        audit.record(db, session, actor=audit.system_actor("worker"),
                     action="certificate.verified" if state == "verified"
                     else "certificate.unverified", target=f"certificate:{cert['_id']}",
                     project_id=cert.get("project_id"),
                     details={"fingerprint_sha256": verification.get("fingerprint_sha256"),
                              "attempts": attempts, "failing": failing[:20]})
    return bool(done)


def verify(db: Database[Doc], certificate_id: str, *, settings: Settings,
           run_txn: Callable[[Callable[[ClientSession], Any]], Any],
           check_lease: Callable[[], None] | None = None) -> Doc:
    """One verification attempt of the certificate's latest renewal. Returns
    ``{"outcome": verified|unverified|retry|nothing, ...}``; ``retry`` means the caller
    schedules another attempt after the delay (the attempt count is saved)."""
    watch = watch_settings(settings)
    cert = db[dbm.CERTIFICATES].find_one({"_id": certificate_id, "deleted_at": None})
    verification = (cert or {}).get("verification") or {}
    if cert is None or verification.get("state") != PENDING:
        return {"outcome": "nothing", "why": "no pending verification"}
    if verification.get("fingerprint_sha256") != cert.get("fingerprint_sha256"):
        # Renewed again since: verify what is current now.
        verification["fingerprint_sha256"] = cert.get("fingerprint_sha256")
    if check_lease is not None:
        check_lease()
    results = scan_certificate(db, cert, settings=settings)
    failing = _failing(results)
    attempts = int(verification.get("attempts") or 0) + 1
    if not failing:
        run_txn(lambda s: _settle(db, s, cert, "verified", [], attempts))
        return {"outcome": "verified", "endpoints": len(results), "attempts": attempts}
    if attempts < watch.drift_verify_attempts:
        db[dbm.CERTIFICATES].update_one(
            {"_id": certificate_id, "verification.state": PENDING},
            {"$set": {"verification.attempts": attempts, "verification.failing": failing}})
        return {"outcome": "retry", "attempts": attempts, "failing": failing,
                "delay": watch.drift_verify_delay_seconds}
    run_txn(lambda s: _settle(db, s, cert, "unverified", failing, attempts))
    return {"outcome": "unverified", "attempts": attempts, "failing": failing}


def _settle_verified(db: Database[Doc], cert: Doc, attempts: int,
                     session: ClientSession) -> bool:
    return _settle(db, session, cert, "verified", [], attempts)


def settle_verifications(db: Database[Doc], certificate_ids: list[str]) -> int:
    """After a regular scan: a renewal flagged ``unverified`` whose endpoints all serve
    it now is ``verified`` after all (its alert then resolves)."""
    if not certificate_ids:
        return 0
    settled = 0
    for cert in db[dbm.CERTIFICATES].find(
            {"_id": {"$in": certificate_ids}, "verification.state": "unverified",
             "deleted_at": None}):
        states = {d["state"] for d in db[dbm.ENDPOINT_SCANS].find(
            {"certificate_id": cert["_id"]}, {"state": 1, "compared_with": 1})
            if d.get("compared_with") == cert.get("fingerprint_sha256")}
        count = db[dbm.ENDPOINT_SCANS].count_documents({"certificate_id": cert["_id"]})
        if states == {OK} and count == len(cert.get("endpoints") or []):
            attempts = int((cert.get("verification") or {}).get("attempts") or 0)
            settle = functools.partial(_settle_verified, db, cert, attempts)
            if dbm.transaction(db, settle, what="settle verification"):
                settled += 1
    return settled


# ------------------------------------------------------------------ views and metrics
def endpoint_status(db: Database[Doc], cert: Doc) -> list[Doc]:
    """Each endpoint of ``cert`` with what was last seen there (for the API answer)."""
    endpoints = cert.get("endpoints") or []
    if not endpoints:
        return []
    scans = {d["_id"]: d for d in db[dbm.ENDPOINT_SCANS].find(
        {"certificate_id": cert["_id"]})}
    out = []
    for raw in endpoints:
        endpoint = Endpoint.from_doc(raw)
        doc = scans.get(scan_id(cert["_id"], endpoint)) or {}
        state = doc.get("state") or PENDING
        if state != PENDING and doc.get("compared_with") != cert.get("fingerprint_sha256") \
                and state in (OK, STALE, FOREIGN):
            # The certificate changed since this scan: what was current then is old now.
            served = doc.get("served") or {}
            if served.get("fingerprint_sha256") == cert.get("fingerprint_sha256"):
                state = OK
            elif state == OK:
                state = STALE
        out.append({"endpoint": endpoint.key, **endpoint.as_doc(), "state": state,
                    "flags": list(doc.get("flags") or []), "served": doc.get("served"),
                    "error": doc.get("error"), "scanned_at": doc.get("scanned_at"),
                    "next_scan_at": doc.get("next_scan_at")})
    return out


def endpoint_metrics(db: Any) -> Iterator[Any]:
    from prometheus_client.core import GaugeMetricFamily

    expiry = GaugeMetricFamily(
        "certautopilot_endpoint_served_expiration_timestamp_seconds",
        "notAfter of the certificate an endpoint served at its last scan (Unix time).",
        labels=["certificate", "project", "endpoint"])
    drift = GaugeMetricFamily(
        "certautopilot_endpoint_drift",
        "Endpoints by the state of their last scan (ok, stale, foreign, unreachable, "
        "pending; 'expiring' counts endpoints also flagged expiring).", labels=["state"])
    counts = dict.fromkeys((*STATES, EXPIRING), 0)
    for doc in db[dbm.ENDPOINT_SCANS].find({}, {"certificate_id": 1, "project_id": 1,
                                                "key": 1, "state": 1, "flags": 1,
                                                "served.not_after": 1}):
        counts[doc.get("state") or PENDING] = counts.get(doc.get("state") or PENDING, 0) + 1
        if EXPIRING in (doc.get("flags") or []):
            counts[EXPIRING] += 1
        not_after = (doc.get("served") or {}).get("not_after")
        if isinstance(not_after, datetime):
            if not_after.tzinfo is None:
                not_after = not_after.replace(tzinfo=UTC)
            expiry.add_metric([str(doc.get("certificate_id")), str(doc.get("project_id")),
                               str(doc.get("key"))], not_after.timestamp())
    for state, n in counts.items():
        drift.add_metric([state], float(n))
    yield expiry
    yield drift
