"""CertAutoPilot: the core package and the Flask API."""

from __future__ import annotations

from typing import Any

from flask import Flask

from app.config import Settings, load_or_exit


def create_app(settings: Settings | None = None, config: dict[str, Any] | None = None) -> Flask:
    """The app factory: settings from the environment (validated), then overrides."""
    from app.api import register_api
    from app.config import configure_logging
    from app.dashboard import register_dashboard

    settings = settings or load_or_exit()
    configure_logging(settings)
    app = Flask(__name__)
    app.config.update(config or {})
    app.extensions["cap_settings"] = settings
    register_api(app)
    register_dashboard(app)  # the ops dashboard under /dashboard
    from app import db as dbm
    from app.acme.responder import register as register_http01_responder
    from app.domain.challenges import key_authorization

    # GET /.well-known/acme-challenge/<token>, outside /api
    register_http01_responder(app, lambda token: key_authorization(dbm.get_db(settings), token))
    return app


def start_tls_alpn_responder(settings: Settings) -> Any:
    """The api role's TLS-ALPN-01 responder on CAP_API_BIND's host and CAP_TLS_ALPN_PORT
    (None when the port is 0): answers from the shared challenge records."""
    if not settings.tls_alpn_port:
        return None
    from app import db as dbm
    from app.acme.tlsalpn import serve
    from app.domain.challenges import tls_alpn_key_authorization

    host = settings.api_bind.rpartition(":")[0].strip("[]") or "0.0.0.0"
    return serve(host, settings.tls_alpn_port,
                 lambda name: tls_alpn_key_authorization(dbm.get_db(settings), name))
