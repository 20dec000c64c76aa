"""``certautopilot dr-test``: prove a restored cluster works, step by step.

It runs where an operator runs ``certautopilot`` (a shell with the cluster's CAP_*
settings, e.g. ``kubectl exec`` into an api pod or a one-off Job of the image) against the
restored database AND the service deployed on it: the quarterly drill is meant to prove
that the restored deployment (api reachable by the CA for HTTP-01, workers, broker,
KEK mounted) issues certificates, which a DR command that started its own roles would
not prove. So the issuance goes through the running api (``--api-url``, default
``http://CAP_API_BIND``) with a token for the fixture project, which dr-test mints for
the run (read, write; expires in a day) and revokes at the end, unless ``--token-env``
names a variable holding one.

Steps, each timed:

1. ``audit``: the whole chain verifies, and the entry at the backup's chain head (from
   the manifest recorded by ``certautopilot restore``, or ``--manifest``) carries the
   manifest's hash;
2. ``kek``: the keyring loads and opens each version's canary; one stored private key of
   each KEK version in use is decrypted and parsed (its material is never printed);
3. ``health``: every readiness check (``app.health.CHECKS``, what /readyz runs and what
   ``certautopilot health`` starts with). Not the cluster-wide checks that
   ``app.ops.health.operator_health`` adds: right after the roles start, jobs restored
   from a day-old backup are all overdue (``queue_age`` fails until the workers drained
   them), and the ``issue`` step proves a worker, the broker and the CA work anyway;
4. ``issue``: a new certificate for the fixture names in the fixture project, through
   API -> job -> worker -> ACME (the given directory) -> stored, HTTP-01 answered by the
   api; the leaf is checked against the names and the stored key;
5. ``revoke``: the test certificate is revoked at the CA through the API.

Steps 1-3 only read and always all run (the report shows every problem at once); 4-5
run only when 1-3 passed. Exit 0 only when every step passed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests
from pymongo.database import Database

from app import audit
from app import db as dbm
from app.config import Settings
from app.db import Doc
from app.errors import CertAutoPilotError

KEK_HINT = ("the KEK is never in the database backup: supply the copy kept apart from it "
            "(CAP_KEK_DIR with its v<N>.key files, or CAP_KEK_FILE, or CAP_KEK_COMMAND) to "
            "this command and to every api and worker pod; see docs/operations.md")
DEFAULT_PROJECT = "dr-fixture"
ACCOUNT_NAME = "dr-test"


class StepFailed(Exception):
    def __init__(self, message: str, detail: Doc | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail or {}


@dataclass
class Step:
    name: str
    ok: bool
    seconds: float
    message: str
    detail: Doc = field(default_factory=dict)
    skipped: bool = False

    def as_dict(self) -> Doc:
        return {"name": self.name, "ok": self.ok, "skipped": self.skipped,
                "seconds": round(self.seconds, 3), "message": self.message,
                "detail": self.detail}


@dataclass
class DrOptions:
    directory: str
    project: str = DEFAULT_PROJECT
    names: list[str] = field(default_factory=list)
    api_url: str | None = None
    token: str | None = None
    manifest: Path | None = None
    timeout: float = 300.0


def _run(name: str, fn: Callable[[], tuple[str, Doc]]) -> Step:
    started = time.monotonic()
    try:
        message, detail = fn()
        return Step(name, True, time.monotonic() - started, message, detail)
    except StepFailed as exc:
        return Step(name, False, time.monotonic() - started, exc.message, exc.detail)
    except CertAutoPilotError as exc:
        return Step(name, False, time.monotonic() - started, exc.message)
    except Exception as exc:  # noqa: BLE001 - a drill reports every failure as a step
        return Step(name, False, time.monotonic() - started,
                    f"{exc.__class__.__name__}: {str(exc)[:300]}")


# ------------------------------------------------------------------ 1. audit
def backup_head(db: Database[Doc], manifest: Path | None) -> tuple[Doc | None, str]:
    """The chain head the backup recorded, and where it came from."""
    if manifest is not None:
        data = json.loads(manifest.read_text(encoding="utf-8"))
        return data.get("audit_head"), str(manifest)
    record = dbm.primary(db)[dbm.RESTORES].find_one(
        {"state": "complete"}, sort=[("finished_at", -1)])
    if record is None:
        return None, "no restore recorded in this database"
    return (record.get("manifest") or {}).get("audit_head"), f"restore {record['_id']}"


def step_audit(db: Database[Doc], manifest: Path | None) -> tuple[str, Doc]:
    from app.audit.verify import verify_chain

    result = verify_chain(db)
    detail: Doc = {"checked": result.checked, "head_seq": result.head_seq}
    if not result.intact:
        assert result.problem is not None
        raise StepFailed(f"audit chain BROKEN at seq {result.problem.seq}: "
                         f"{result.problem.kind}: {result.problem.message}",
                         {**detail, "problem": result.problem.as_dict()})
    head, source = backup_head(db, manifest)
    detail["manifest_source"] = source
    if head is None:
        return (f"chain intact ({result.checked} entries); not compared with a backup "
                f"manifest ({source}; pass --manifest)", detail)
    seq = int(head.get("seq", 0))
    detail["manifest_head"] = head
    if seq == 0:
        return f"chain intact ({result.checked} entries); the backup's chain was empty", detail
    entry = dbm.primary(db)[dbm.AUDIT].find_one({"seq": seq}, {"hash": 1})
    if entry is None or entry.get("hash") != head.get("hash"):
        raise StepFailed(f"the chain does not contain the backup's chain head (seq {seq}, "
                         f"hash {str(head.get('hash'))[:16]}...) from {source}: this database "
                         "is not the restored backup", detail)
    return (f"chain intact ({result.checked} entries); the backup's head seq {seq} is in it "
            f"with the manifest's hash", detail)


# ------------------------------------------------------------------ 2. kek
def step_kek(db: Database[Doc], settings: Settings) -> tuple[str, Doc]:
    from app.keys import get_keyring, load_private_key, open_private_key
    from app.keys.errors import KeyUnavailable
    from app.keys.health import kek_check

    try:
        keyring = get_keyring(settings, max_age=0)
    except KeyUnavailable as exc:
        raise StepFailed(f"{exc.message}; {KEK_HINT}") from None
    ok, info = kek_check(db)
    if not ok:
        raise StepFailed(f"{info.get('error')}; {KEK_HINT}", info)
    keys = dbm.primary(db)[dbm.KEYS]
    in_use = sorted(int(v) for v in keys.distinct("kek_version"))
    opened: Doc = {}
    for version in in_use:
        record = keys.find_one({"kek_version": version}, {"_id": 1, "project_id": 1})
        assert record is not None
        try:
            pem = open_private_key(db, record["_id"], project_id=record["project_id"],
                                   keyring=keyring)
            load_private_key(pem)
        except KeyUnavailable as exc:
            raise StepFailed(f"key {record['_id']} (KEK v{version}): {exc.message}; "
                             f"{KEK_HINT}", {"opened": opened}) from None
        del pem
        opened[f"v{version}"] = {"key_id": record["_id"],
                                 "keys": keys.count_documents({"kek_version": version})}
    if not in_use:
        return "keyring loads and its canaries open; no stored key to decrypt", info
    return (f"decrypted one stored key of each KEK version in use "
            f"({', '.join(opened)}) with {keyring.source}", {"versions": opened, **info})


# ------------------------------------------------------------------ 3. health
def step_health(db: Database[Doc]) -> tuple[str, Doc]:
    from app.health import readiness

    ready, detail = readiness(db)
    if not ready:
        failed = {k: v.get("error", "failed") for k, v in detail.items() if not v.get("ok")}
        hint = f"; {KEK_HINT}" if "kek" in failed else ""
        raise StepFailed("readiness checks failing: " + "; ".join(
            f"{k}: {v}" for k, v in failed.items()) + hint, detail)
    return f"every readiness check passes ({', '.join(detail)})", detail


# ------------------------------------------------------------------ 4-5. issue, revoke
class Api:
    def __init__(self, base: str, token: str, timeout: float = 30.0) -> None:
        self.base = base.rstrip("/") + "/api/v1"
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"
        self.timeout = timeout

    def call(self, method: str, path: str, body: Doc | None = None,
             params: Doc | None = None) -> Any:
        try:
            answer = self.session.request(method, self.base + path, json=body, params=params,
                                          timeout=self.timeout)
        except requests.RequestException as exc:
            raise StepFailed(f"the api at {self.base} cannot be reached: "
                             f"{exc.__class__.__name__}") from None
        if answer.status_code >= 400:
            try:
                message = answer.json().get("message")
            except ValueError:
                message = answer.text[:200]
            raise StepFailed(f"{method} {path} answered {answer.status_code}: {message}")
        if answer.headers.get("Content-Type", "").startswith("application/json"):
            return answer.json()
        return answer.text

    def close(self) -> None:
        self.session.close()


def fixture_names(db: Database[Doc], project_id: str) -> list[str]:
    doc = dbm.primary(db)[dbm.CERTIFICATES].find_one(
        {"project_id": project_id, "challenge.type": "http-01",
         "certificate_pem": {"$ne": None}, "status": {"$in": ["issued", "revoked"]}},
        sort=[("issued_at", -1)])
    if doc is None:
        raise StepFailed("the fixture project has no issued http-01 certificate to take the "
                         "names from: pass --name (a DNS name the CA resolves to this "
                         "cluster's api)")
    return list(doc["names"])


def _account(api: Api, project_id: str, directory: str) -> str:
    page = api.call("GET", "/acme-accounts", params={"project_id": project_id, "limit": 200})
    for item in page.get("items", []):
        if item.get("directory_url") == directory and item.get("status") != "deactivated":
            return str(item["id"])
    created = api.call("POST", "/acme-accounts", {
        "project_id": project_id, "name": ACCOUNT_NAME, "directory_url": directory,
        "terms_agreed": True, "register": False})
    return str(created["id"])


def step_issue(db: Database[Doc], api: Api, project_id: str, options: DrOptions,
               state: Doc) -> tuple[str, Doc]:
    from cryptography import x509

    from app.keys import load_private_key, open_private_key
    from app.keys.keygen import public_key_sha256

    names = options.names or fixture_names(db, project_id)
    account_id = _account(api, project_id, options.directory)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    cert = api.call("POST", "/certificates", {
        "project_id": project_id, "name": f"dr-test {stamp}", "names": names,
        "account_id": account_id, "challenge": {"type": "http-01"}})
    cert_id = str(cert["id"])
    state["certificate_id"] = cert_id
    deadline = time.monotonic() + options.timeout
    delay = 0.2
    while True:
        current = api.call("GET", f"/certificates/{cert_id}")
        if current.get("status") == "issued":
            break
        failure = current.get("failure") or {}
        if current.get("status") == "failed" or failure.get("last_error"):
            raise StepFailed(f"certificate {cert_id} failed: {failure.get('last_error')}",
                             {"certificate_id": cert_id})
        if time.monotonic() > deadline:
            jobs = [{k: j.get(k) for k in ("_id", "state", "attempts", "last_error")}
                    for j in dbm.primary(db)[dbm.JOBS].find(
                        {"payload.certificate_id": cert_id})]
            raise StepFailed(f"certificate {cert_id} not issued within {options.timeout:g} s "
                             f"(status {current.get('status')}; jobs {jobs}): are the "
                             "workers running and is the api reachable by the CA for "
                             "HTTP-01?", {"certificate_id": cert_id})
        time.sleep(delay)
        delay = min(delay * 1.5, 2.0)
    pem = api.call("GET", f"/certificates/{cert_id}/fullchain.pem")
    leaf = x509.load_pem_x509_certificate(pem.encode())
    sans = sorted(leaf.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName))
    if sans != sorted(names):
        raise StepFailed(f"issued certificate names {sans} differ from {sorted(names)}")
    stored = dbm.primary(db)[dbm.CERTIFICATES].find_one({"_id": cert_id}) or {}
    key = load_private_key(open_private_key(db, stored["key_id"], project_id=project_id))
    if public_key_sha256(key) != public_key_sha256_of_cert(leaf):
        raise StepFailed("the stored private key does not match the issued certificate")
    del key
    job = dbm.primary(db)[dbm.JOBS].find_one({"payload.certificate_id": cert_id,
                                              "kind": "certificates.issue"}) or {}
    workers = [h.get("worker") for h in job.get("history", []) if h.get("event") == "claimed"]
    return (f"certificate {cert_id} for {', '.join(names)} issued by {leaf.issuer.rfc4514_string()}"
            f" (serial {stored.get('serial')}) through job {job.get('_id')} on "
            f"{workers[-1] if workers else 'a worker'}",
            {"certificate_id": cert_id, "names": names, "account_id": account_id,
             "serial": stored.get("serial"), "job_id": str(job.get("_id")),
             "worker": workers[-1] if workers else None,
             "not_after": leaf.not_valid_after_utc.isoformat()})


def public_key_sha256_of_cert(cert: Any) -> str:
    import hashlib

    from cryptography.hazmat.primitives import serialization

    der = cert.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def step_revoke(api: Api, state: Doc) -> tuple[str, Doc]:
    cert_id = state.get("certificate_id")
    if not cert_id:
        raise StepFailed("no test certificate to revoke")
    done = api.call("POST", f"/certificates/{cert_id}/revoke", {"reason_code": 0})
    if done.get("status") != "revoked":
        raise StepFailed(f"certificate {cert_id} is {done.get('status')} after revoking")
    return f"certificate {cert_id} revoked at the CA", {"certificate_id": cert_id}


# ------------------------------------------------------------------ the drill
def run_dr_test(db: Database[Doc], settings: Settings, options: DrOptions,
                on_step: Callable[[Step], None] | None = None) -> Doc:
    from app.domain import projects, tokens

    steps: list[Step] = []

    def add(step: Step) -> None:
        steps.append(step)
        if on_step:
            on_step(step)

    add(_run("audit", lambda: step_audit(db, options.manifest)))
    add(_run("kek", lambda: step_kek(db, settings)))
    add(_run("health", lambda: step_health(db)))
    if all(s.ok for s in steps):
        actor = audit.system_actor("dr-test")
        minted: str | None = None
        state: Doc = {}
        api: Api | None = None
        try:
            project = projects.find_project(db, options.project)
            token = options.token
            if token is None:
                doc, token = tokens.create_token(db, project_id=project["_id"],
                                                 scopes=["read", "write"], actor=actor,
                                                 name="dr-test", expires_in_days=1)
                minted = str(doc["_id"])
            api = Api(options.api_url or f"http://{settings.api_bind}", token)
            add(_run("issue", lambda: step_issue(db, api, project["_id"], options, state)))
            add(_run("revoke", lambda: step_revoke(api, state)))
        except CertAutoPilotError as exc:
            add(Step("issue", False, 0.0, f"fixture project {options.project!r}: "
                                          f"{exc.message}"))
        finally:
            if api is not None:
                api.close()
            if minted:
                tokens.revoke_token(db, minted, actor=actor)
    else:
        for name in ("issue", "revoke"):
            add(Step(name, False, 0.0, "skipped: an earlier step failed", skipped=True))
    failed = next((s for s in steps if not s.ok), None)
    return {"ok": failed is None, "failed_step": failed.name if failed else None,
            "directory": options.directory, "project": options.project,
            "steps": [s.as_dict() for s in steps],
            "seconds": round(sum(s.seconds for s in steps), 3)}
