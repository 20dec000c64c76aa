"""The one task: a wake-up for a durable job. Thin on purpose: the work is in
``app.jobs.runner`` (claim, heartbeat, handler, fenced completion)."""

from __future__ import annotations

from typing import Any

from app.jobs.broker import RUN_JOB_TASK
from app.jobs.runner import run_job as _run_job
from tasks.celery_app import app
from tasks.worker import install_drain_handler


@app.task(name=RUN_JOB_TASK, ignore_result=True, acks_late=False)
def run_job(job_id: Any = None, *args: Any, **kwargs: Any) -> str:
    """Claim and run the job ``job_id``; anything malformed is logged and dropped."""
    install_drain_handler()
    return _run_job(job_id)
