"""The dashboard's routes: pages (GET), actions (POST, CSRF-checked, write scope) and
the jobs chart's data. Pages and actions are thin: reads go through ``queries``, actions
through the domain and job functions the API's views call."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from functools import wraps
from typing import Any, TypeVar
from urllib.parse import urlencode, urlsplit

from flask import (
    Blueprint,
    Response,
    current_app,
    g,
    jsonify,
    redirect,
    render_template,
    request,
    url_for,
)
from pymongo.errors import PyMongoError
from werkzeug.exceptions import HTTPException

from app import db as dbm
from app.api.common import current_db, paginate
from app.api.windows import seq_page
from app.dashboard import queries, sessions, snapshot
from app.db import Doc
from app.domain import budget, certificates, drift, revocation
from app.domain.tokens import WRITE, Principal
from app.errors import CertAutoPilotError, Conflict, Forbidden, NotFound, Unauthorized

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

bp = Blueprint("dashboard", __name__, url_prefix="/dashboard", template_folder="templates",
               static_folder="static", static_url_path="/static")

PAGE_SIZE = 50
# No inline script or style anywhere: every script and stylesheet is a file of ours.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
OPEN_ENDPOINTS = {"dashboard.signin", "dashboard.static"}
MESSAGES = {
    "issue": "Issuance requested: a job is queued (or the active one was kept).",
    "renew": "Renewal requested: a job is queued (or the active one was kept).",
    "revoke": "The certificate was revoked at its CA.",
    "retry": "The job is queued again with a fresh attempt budget.",
    "cancel": "The job was cancelled.",
}
REVOCATION_REASONS = {0: "unspecified", 1: "keyCompromise", 3: "affiliationChanged",
                      4: "superseded", 5: "cessationOfOperation", 9: "privilegeWithdrawn"}


def caller() -> Principal:
    found = g.get("principal")
    assert isinstance(found, Principal)
    return found


def _is_htmx() -> bool:
    return request.headers.get("HX-Request") == "true"


def _safe_next(value: str | None) -> str:
    """Only a path inside the dashboard (no open redirect)."""
    if value and value.startswith("/dashboard") and not value.startswith("//"):
        return value
    return url_for("dashboard.overview")


def _same_origin() -> bool:
    """A browser's POST names the page it came from in ``Origin``: another site's form
    (e.g. one signing the victim in with the attacker's token) is refused. Host only:
    behind a TLS-terminating proxy the scheme seen here differs."""
    origin = request.headers.get("Origin")
    return origin is None or urlsplit(origin).netloc == request.host


@bp.before_request
def authenticate() -> Response | None:
    """Every route but sign-in and static files needs a live session; every POST needs
    the session's CSRF token (and no other site's Origin)."""
    if request.method == "POST" and not _same_origin():
        raise Forbidden("cross-site form post refused")
    if request.endpoint in OPEN_ENDPOINTS:
        return None
    found = sessions.load(current_db(), request.cookies.get(sessions.COOKIE_NAME))
    if found is None:
        target = url_for("dashboard.signin", next=request.full_path.rstrip("?"))
        if _is_htmx():
            response = Response(status=204)
            response.headers["HX-Redirect"] = target
            return response
        if request.method == "POST" or request.path.endswith(".json"):
            raise Unauthorized("sign in first: your dashboard session is missing or expired")
        return redirect(target)  # type: ignore[return-value]
    g.principal, g.csrf = found
    # This process keeps the fleet figures if it holds (or takes) their lease.
    snapshot.ensure_running(current_db(), current_app.extensions.get("cap_settings"))
    if request.method == "POST" and not sessions.csrf_matches(
            g.csrf, request.form.get("csrf_token") or request.headers.get("X-CSRF-Token")):
        raise Forbidden("missing or invalid CSRF token: reload the page and try again")
    return None


@bp.after_request
def security_headers(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    if request.endpoint != "dashboard.static":
        response.headers["Cache-Control"] = "no-store"
    return response


def _error_page(status: int, message: str) -> tuple[str, int]:
    return render_template("error.html", status=status, message=message), status


@bp.errorhandler(CertAutoPilotError)
def domain_error(exc: CertAutoPilotError) -> Any:
    if request.path.endswith(".json"):
        return jsonify({"code": exc.code, "status": exc.status, "message": exc.message,
                        "errors": exc.errors}), exc.status
    return _error_page(exc.status, exc.message)


@bp.errorhandler(HTTPException)
def http_error(exc: HTTPException) -> Any:
    return _error_page(exc.code or 500, exc.description or exc.name)


@bp.errorhandler(PyMongoError)
def database_error(exc: PyMongoError) -> Any:
    log.warning("database error on a dashboard page", extra={"error": str(exc)[:200]})
    return _error_page(503, "the database is unavailable; retry later")


@bp.app_template_filter("when")
def when(value: Any) -> str:
    if not isinstance(value, datetime):
        return "—"
    return value.strftime("%Y-%m-%d %H:%M:%S UTC")


@bp.app_template_filter("age")
def age(seconds: Any) -> str:
    """A duration for people: 42 s, 5 min, 3 h 10 min, 4 d."""
    if not isinstance(seconds, (int, float)):
        return "—"
    value, sign = abs(float(seconds)), "-" if seconds < 0 else ""
    if value < 90:
        return f"{sign}{value:.0f} s"
    if value < 5400:
        return f"{sign}{value / 60:.0f} min"
    if value < 172800:
        return f"{sign}{int(value // 3600)} h {int(value % 3600 // 60)} min"
    return f"{sign}{value / 86400:.0f} d"


@bp.context_processor
def page_context() -> dict[str, Any]:
    principal = g.get("principal")
    return {"caller": principal, "csrf_token": g.get("csrf", ""),
            "can_write": principal is not None and principal.has(WRITE),
            "message": MESSAGES.get(request.args.get("done", "")), "now": g.get("now")}


def writer(fn: F) -> F:
    """An action: the token needs the write scope (a read-only token is refused)."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not caller().has(WRITE):
            raise Forbidden("this token is read-only: it lacks the 'write' scope")
        return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _now() -> datetime:
    g.now = dbm.server_now(current_db())
    return g.now


def _args(*names: str) -> dict[str, str]:
    return {n: request.args.get(n, "").strip()[:200] for n in names if request.args.get(n)}


def _page(collection: str, query: Doc, **kwargs: Any) -> dict[str, Any]:
    return paginate(current_db()[collection], query, limit=PAGE_SIZE,
                    cursor=request.args.get("cursor") or None, **kwargs)


def _list(collection: str, query: Doc, window: queries.Window | None,
          projection: Doc) -> dict[str, Any]:
    """A page: through windows on the window's key when no clause is selective, else
    one indexed lookup sorted after (newest first, the API's cursor order)."""
    if window is not None:
        return queries.windowed_page(current_db()[collection], query, window,
                                     limit=PAGE_SIZE,
                                     cursor=request.args.get("cursor") or None,
                                     projection=projection)
    return _page(collection, query, projection=projection, descending=True)


def _next_url(endpoint: str, filters: dict[str, str], cursor: str | None) -> str | None:
    if not cursor:
        return None
    return url_for(endpoint) + "?" + urlencode({**filters, "cursor": cursor})


def _project_names(rows: list[Doc]) -> dict[str, str]:
    """Names of the projects of a page's rows, in one query."""
    ids = sorted({str(r["project_id"]) for r in rows if r.get("project_id")})
    if not ids:
        return {}
    return {str(p["_id"]): str(p.get("name", p["_id"])) for p in dbm.retry(
        lambda: list(current_db()[dbm.PROJECTS].find({"_id": {"$in": ids}}, {"name": 1})),
        what="read project names")}


def _visible(doc: Doc | None, what: str, ident: str) -> Doc:
    """The object if the caller's project owns it (admins: any); else 404, as the API."""
    if doc is None or not caller().can_see(doc.get("project_id")):
        raise NotFound(f"{what} {ident!r} not found")
    return doc


# -- sign-in -------------------------------------------------------------------------

@bp.route("/signin", methods=["GET", "POST"])
def signin() -> Any:
    next_url = _safe_next(request.values.get("next"))
    if request.method == "GET":
        return render_template("signin.html", next_url=next_url, error=None)
    try:
        session_id, _ = sessions.sign_in(current_db(), request.form.get("token", "")[:200])
    except Unauthorized as exc:
        return render_template("signin.html", next_url=next_url, error=exc.message), 401
    response = redirect(next_url)
    response.set_cookie(sessions.COOKIE_NAME, session_id,
                        max_age=int(sessions.SESSION_LIFETIME.total_seconds()),
                        path="/dashboard", httponly=True, secure=request.is_secure,
                        samesite="Strict")
    return response


@bp.post("/signout")
def signout() -> Any:
    sessions.sign_out(current_db(), request.cookies.get(sessions.COOKIE_NAME, ""), caller())
    response = redirect(url_for("dashboard.signin"))
    response.delete_cookie(sessions.COOKIE_NAME, path="/dashboard", httponly=True,
                           secure=request.is_secure, samesite="Strict")
    return response


# -- overview ------------------------------------------------------------------------

def _figures() -> tuple[Doc | None, Doc | None]:
    """The snapshot's ``all`` document and the caller's scope's (the same for admins)."""
    principal = caller()
    return snapshot.read(current_db(), None if principal.is_admin else principal.project_id)


@bp.get("/")
def overview() -> str:
    db = current_db()
    now = _now()
    principal = caller()
    every, scoped = _figures()
    return render_template(
        "overview.html", certs=snapshot.certificate_view(every, scoped),
        failing=(scoped or {}).get("failing", []), figures_at=(every or {}).get("at"),
        workers=queries.workers(db, now, snapshot.host_counts(every))["online"],
        queue=snapshot.queue_view(every, now), scheduler=queries.scheduler(db),
        kek=(every or {}).get("kek") if principal.is_admin else None,
        audit=queries.audit_head(db) if principal.is_admin else None,
        budgets=budget.levels(db, limit=BUDGET_ROWS) if principal.is_admin else None)


# The overview lists the CA budget buckets up to this many (CLI/API: every one).
BUDGET_ROWS = 30


def _queue(now: datetime) -> Doc:
    return snapshot.queue_view(snapshot.read(current_db(), None)[0], now)


@bp.get("/throughput.json")
def throughput() -> Response:
    return jsonify(snapshot.chart_view(snapshot.read(current_db(), None)[0]))


# -- certificates ----------------------------------------------------------------------

CERT_LIST_FIELDS = {"name": 1, "names": 1, "project_id": 1, "status": 1, "not_after": 1,
                    "next_renewal_at": 1, "renewal_source": 1, "issuer": 1, "created_at": 1,
                    "failure.count": 1}


@bp.get("/certificates")
def certificate_list() -> str:
    filters = _args("name", "project", "state", "expiring_before")
    _now()
    query, window = queries.certificate_query(caller(), filters)
    page = _list(dbm.CERTIFICATES, query, window, projection=CERT_LIST_FIELDS)
    return render_template("certificates.html", page=page, filters=filters,
                           by_expiry=window is not None and window.key == "not_after",
                           states=queries.CERT_STATES,
                           projects=_project_names(page["items"]),
                           next_url=_next_url("dashboard.certificate_list", filters,
                                              page["next_cursor"]))


def _load_certificate(certificate_id: str) -> Doc:
    doc = None
    if len(certificate_id) <= 100:
        doc = dbm.retry(lambda: current_db()[dbm.CERTIFICATES].find_one(
            {"_id": certificate_id, "deleted_at": None}), what="read certificate")
    return _visible(doc, "certificate", certificate_id)


@bp.get("/certificates/<certificate_id>")
def certificate_page(certificate_id: str) -> str:
    cert = _load_certificate(certificate_id)
    _now()
    return render_template("certificate.html", cert=cert,
                           related=queries.certificate_related(current_db(), cert),
                           endpoints=drift.endpoint_status(current_db(), cert),
                           projects=_project_names([cert]), reasons=REVOCATION_REASONS)


def _back_to_certificate(certificate_id: str, done: str) -> Any:
    return redirect(url_for("dashboard.certificate_page", certificate_id=certificate_id,
                            done=done))


def _request_issuance(certificate_id: str, reason: str) -> None:
    """As the API's issue and renew (``app.api.certificates.resources._request``): a
    renewal asked for here is "renew_now", which the CA's ARI window does not postpone."""
    current = _load_certificate(certificate_id)
    if current.get("status") == certificates.STATUS_REVOKED and reason == "renew_now":
        raise Conflict("a revoked certificate is not renewed; use issue to get a new one")
    certificates.request_issuance(current_db(), certificate_id, caller().actor, reason,
                                  project_id=current["project_id"])


@bp.post("/certificates/<certificate_id>/issue")
@writer
def certificate_issue(certificate_id: str) -> Any:
    _request_issuance(certificate_id, "manual")
    return _back_to_certificate(certificate_id, "issue")


@bp.post("/certificates/<certificate_id>/renew")
@writer
def certificate_renew(certificate_id: str) -> Any:
    _request_issuance(certificate_id, "renew_now")
    return _back_to_certificate(certificate_id, "renew")


@bp.post("/certificates/<certificate_id>/revoke")
@writer
def certificate_revoke(certificate_id: str) -> Any:
    current = _load_certificate(certificate_id)
    try:
        reason_code = int(request.form.get("reason_code", "0"))
    except ValueError:
        reason_code = -1  # refused by the domain's check, with its message
    revocation.revoke_certificate(current_db(), certificate_id, caller().actor,
                                  reason_code, project_id=current["project_id"])
    return _back_to_certificate(certificate_id, "revoke")


# -- jobs ------------------------------------------------------------------------------

JOB_LIST_FIELDS = {"kind": 1, "state": 1, "project_id": 1, "attempts": 1, "max_attempts": 1,
                   "created_at": 1, "finished_at": 1, "run_after": 1, "last_error": 1,
                   "lease.owner": 1}


@bp.get("/jobs")
def job_list() -> str:
    from app.jobs import STATES

    filters = _args("state", "kind", "project")
    now = _now()
    page = _list(dbm.JOBS, queries.job_query(caller(), filters), queries.JOBS_WINDOW,
                 projection=JOB_LIST_FIELDS)
    return render_template("jobs.html", page=page, filters=filters, states=STATES,
                           queue=_queue(now),
                           projects=_project_names(page["items"]),
                           next_url=_next_url("dashboard.job_list", filters,
                                              page["next_cursor"]))


def _load_job(job_id: str) -> Doc:
    from app.jobs.lifecycle import valid_job_id

    doc = None
    if valid_job_id(job_id):
        doc = dbm.retry(lambda: current_db()[dbm.JOBS].find_one({"_id": job_id},
                                                                {"lease.token": 0}),
                        what="read job")
    return _visible(doc, "job", job_id)


@bp.get("/jobs/<job_id>")
def job_page(job_id: str) -> str:
    job = _load_job(job_id)
    _now()
    return render_template("job.html", job=job, projects=_project_names([job]))


@bp.post("/jobs/<job_id>/retry")
@writer
def job_retry(job_id: str) -> Any:
    from app.jobs.actions import retry_dead

    _load_job(job_id)
    retry_dead(current_db(), job_id, actor=caller().actor)
    return redirect(url_for("dashboard.job_page", job_id=job_id, done="retry"))


@bp.post("/jobs/<job_id>/cancel")
@writer
def job_cancel(job_id: str) -> Any:
    from app.jobs.actions import cancel

    _load_job(job_id)
    cancel(current_db(), job_id, actor=caller().actor,
           reason=request.form.get("reason", "")[:500])
    return redirect(url_for("dashboard.job_page", job_id=job_id, done="cancel"))


# -- workers, scheduler, audit -----------------------------------------------------------

@bp.get("/workers")
def workers() -> str:
    db = current_db()
    now = _now()
    every = snapshot.read(db, None)[0]
    return render_template("workers.html",
                           workers=queries.workers(db, now, snapshot.host_counts(every)),
                           queue=snapshot.queue_view(every, now))


@bp.get("/scheduler")
def scheduler() -> str:
    _now()
    return render_template("scheduler.html", scheduler=queries.scheduler(current_db(),
                                                                         fires=20))


@bp.get("/audit")
def audit() -> str:
    filters = _args("actor", "action", "target", "since", "until", "project")
    _now()
    query, windowed = queries.audit_query(caller(), filters)
    projection = {"_id": 0, "prev_hash": 0}
    cursor = request.args.get("cursor") or None
    if windowed:
        page = seq_page(current_db()[dbm.AUDIT], query, limit=PAGE_SIZE, cursor=cursor,
                        descending=True, projection=projection)
    else:
        page = _page(dbm.AUDIT, query, keys=("seq",), descending=True,
                     projection=projection)
    return render_template("audit.html", page=page, filters=filters,
                           next_url=_next_url("dashboard.audit", filters, page["next_cursor"]))
