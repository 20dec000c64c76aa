from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from celery import Celery

from app.config import Settings, load_or_exit


def broker_url(settings: Settings) -> str:
    """CAP_MONGO_URI with its database replaced by CAP_BROKER_DB (same cluster)."""
    parts = urlsplit(settings.require_mongo_uri())
    return urlunsplit((parts.scheme, parts.netloc, "/" + settings.broker_db, parts.query, ""))


def make_app(settings: Settings | None = None) -> Celery:
    settings = settings or load_or_exit()
    celery = Celery("certautopilot", broker=broker_url(settings))
    celery.conf.update(
        # Event and control queues of dead consumers expire (celery#1047).
        broker_transport_options={"ttl": True},
        broker_connection_retry_on_startup=True,
        worker_prefetch_multiplier=1,
        task_acks_late=False,
        task_ignore_result=True,
        result_backend=None,
        worker_hijack_root_logger=False,
        task_default_queue="certautopilot",
        timezone="UTC",
        enable_utc=True,
    )
    return celery


app = make_app()
