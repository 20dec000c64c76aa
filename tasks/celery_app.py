"""The Celery app (``celery -A tasks worker``) on kombu's MongoDB transport.

Celery messages only wake workers (DESIGN.md, invariant 1): each carries a job id, the
job document in MongoDB is the truth, and there is no result backend. The broker
settings live in ``app.jobs.broker`` so that ``app/`` publishes with the same ones.
"""

from __future__ import annotations

from celery import Celery

from app.config import Settings, load_or_exit
from app.jobs import broker


def broker_url(settings: Settings) -> str:
    """CAP_MONGO_URI with its database replaced by CAP_BROKER_DB (same cluster)."""
    return broker.broker_url(settings)


def make_app(settings: Settings | None = None) -> Celery:
    settings = settings or load_or_exit()
    celery = Celery("certautopilot")
    celery.conf.update(broker.celery_config(settings))
    broker.use_app(celery)
    return celery


app = make_app()

# The task and the worker's lifecycle hooks (imported for their registrations).
from tasks import jobs as _jobs  # noqa: E402,F401
from tasks import worker as _worker  # noqa: E402,F401
