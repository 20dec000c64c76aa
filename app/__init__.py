"""CertAutoPilot: the core package and the Flask API."""

from __future__ import annotations

from typing import Any

from flask import Flask

from app.config import Settings, load_or_exit


def create_app(settings: Settings | None = None, config: dict[str, Any] | None = None) -> Flask:
    """The app factory: settings from the environment (validated), then overrides."""
    from app.api import register_api
    from app.config import configure_logging

    settings = settings or load_or_exit()
    configure_logging(settings)
    app = Flask(__name__)
    app.config.update(config or {})
    app.extensions["cap_settings"] = settings
    register_api(app)
    from app.acme.responder import register as register_http01_responder

    register_http01_responder(app)  # GET /.well-known/acme-challenge/<token>, outside /api
    from app.dashboard import register_dashboard

    register_dashboard(app)  # the ops dashboard under /dashboard
    return app


def current_db() -> Any:
    """The application database of the current Flask app (one client per process)."""
    from flask import current_app

    from app import db as dbm

    return dbm.get_db(current_app.extensions["cap_settings"])
