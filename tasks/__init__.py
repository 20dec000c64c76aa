"""The Celery app (``celery -A tasks worker``) on kombu's MongoDB transport.

Celery messages only wake workers (DESIGN.md, invariant 1): the job document in MongoDB
is the truth, so there is no result backend.
"""

# First: a worker serving its own metrics needs prometheus_client's multiprocess mode,
# chosen when prometheus_client is first imported (tasks/metrics.py).
from tasks import metrics as _metrics

_metrics.prepare()

from tasks.celery_app import app, broker_url  # noqa: E402

__all__ = ["app", "broker_url"]
