"""The Celery app (``celery -A tasks worker``) on kombu's MongoDB transport.

Celery messages only wake workers (DESIGN.md, invariant 1): the job document in MongoDB
is the truth, so there is no result backend.
"""

from tasks.celery_app import app, broker_url

__all__ = ["app", "broker_url"]
