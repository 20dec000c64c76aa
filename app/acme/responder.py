"""The HTTP-01 responder: ``GET /.well-known/acme-challenge/<token>``.

Served by every api replica from the ``challenges`` collection, so whichever replica the
CA's validation request reaches answers it. A plain Flask blueprint, outside the /api
resources: no authentication (the CA calls it), no JSON envelope. The token must be in
the base64url alphabet; anything else, or an unknown token, is a plain 404.
"""

from __future__ import annotations

from flask import Blueprint, Response

from app import db as dbm
from app.acme.solvers import TOKEN_RE

bp = Blueprint("acme_http01", __name__)


def _not_found() -> Response:
    return Response("not found\n", status=404, mimetype="text/plain")


@bp.get("/.well-known/acme-challenge/<token>")
def http01(token: str) -> Response:
    """Answer an ACME HTTP-01 validation request with the stored key authorization."""
    if not TOKEN_RE.match(token):
        return _not_found()
    from app import current_db

    db = dbm.primary(current_db())
    doc = dbm.retry(lambda: db[dbm.CHALLENGES].find_one({"_id": token},
                                                        {"key_authorization": 1}),
                    what="read http-01 challenge", attempts=3)
    if doc is None or not doc.get("key_authorization"):
        return _not_found()
    response = Response(str(doc["key_authorization"]), status=200, mimetype="text/plain")
    response.headers["Cache-Control"] = "no-store"
    return response


def register(app: object) -> None:
    """Add the responder to a Flask app (called by ``create_app``)."""
    from flask import Flask

    assert isinstance(app, Flask)
    app.register_blueprint(bp)
