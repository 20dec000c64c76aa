"""The HTTP-01 responder: ``GET /.well-known/acme-challenge/<token>``.

Served by every api replica from the shared challenge records (the lookup given to
``register``: ``app.domain.challenges.key_authorization``), so whichever replica the
CA's validation request reaches answers it. A plain Flask blueprint, outside the /api
resources: no authentication (the CA calls it), no JSON envelope. The token must be in
the base64url alphabet; anything else, or an unknown token, is a plain 404.

A CA validates from several vantage points at once (Pebble and Let's Encrypt: three
requests for the same token within milliseconds). Concurrent requests for one token in a
process share one database read, and a found answer is kept for 10 s: a token is
random and single-use, so its key authorization never changes. "Not found" is never
kept: the record may be written a moment later.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from flask import Blueprint, Flask, Response, current_app

from app.acme.solvers import TOKEN_RE

bp = Blueprint("acme_http01", __name__)

Lookup = Callable[[str], "str | None"]
_EXTENSION = "cap_http01_lookup"

CACHE_SECONDS = 10.0
CACHE_ENTRIES = 4096

_lock = threading.Lock()
_found: OrderedDict[str, tuple[str, float]] = OrderedDict()
_inflight: dict[str, threading.Event] = {}


def _not_found() -> Response:
    return Response("not found\n", status=404, mimetype="text/plain")


def key_authorization(token: str, read: Lookup) -> str | None:
    """The stored key authorization of ``token`` (single-flight, positive cache)."""
    while True:
        with _lock:
            hit = _found.get(token)
            if hit is not None and hit[1] > time.monotonic():
                return hit[0]
            waiting = _inflight.get(token)
            if waiting is None:
                mine = _inflight[token] = threading.Event()
                break
        waiting.wait(5.0)  # another request reads it; then look again
    try:
        value = read(token)
        if value is not None:
            with _lock:
                _found[token] = (value, time.monotonic() + CACHE_SECONDS)
                _found.move_to_end(token)
                while len(_found) > CACHE_ENTRIES:
                    _found.popitem(last=False)
        return value
    finally:
        with _lock:
            _inflight.pop(token, None)
        mine.set()


@bp.get("/.well-known/acme-challenge/<token>")
def http01(token: str) -> Response:
    """Answer an ACME HTTP-01 validation request with the stored key authorization."""
    if not TOKEN_RE.match(token):
        return _not_found()
    value = key_authorization(token, current_app.extensions[_EXTENSION])
    if value is None:
        return _not_found()
    response = Response(value, status=200, mimetype="text/plain")
    response.headers["Cache-Control"] = "no-store"
    return response


def register(app: Flask, lookup: Lookup) -> None:
    """Add the responder to a Flask app (called by ``create_app``); ``lookup(token)``
    returns the stored key authorization, or None."""
    app.extensions[_EXTENSION] = lookup
    app.register_blueprint(bp)
