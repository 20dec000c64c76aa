"""The ops dashboard, served by every api replica under ``/dashboard``.

Server-rendered Jinja pages (``templates/``) and vendored front-end libraries
(``static/vendor/``: htmx for live refresh, uPlot for the jobs chart; see its README).
Sign-in exchanges an API token for a server-side session (``sessions``); every page
reads through ``queries`` and every action calls the same domain and job functions as
the API's views, with the token's own ``Principal``, so it is authorized, scoped to the
token's project and audited exactly as the API's.
"""

from __future__ import annotations

from flask import Flask


def register_dashboard(app: Flask) -> None:
    from app.dashboard.views import bp

    app.register_blueprint(bp)
