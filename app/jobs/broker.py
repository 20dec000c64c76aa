"""Wake-up messages: Celery on kombu's MongoDB transport, same cluster as the data.

A message carries only a job id and means "this job may be ready": the job document is
the truth (DESIGN.md, invariant 1). kombu's MongoDB transport deletes a message when a
worker fetches it, so a message can be lost with its worker; the reaper re-publishes
for queued jobs nobody claimed. Publishing therefore never raises: a failed publish
returns False and leaves the job to the reaper.

This module owns the broker settings so that ``tasks/`` (the worker) and ``app/``
(which must not import ``tasks``) publish and consume with the same configuration.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
from collections.abc import Iterable
from contextlib import nullcontext
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from celery import Celery

from app.config import Settings, load_settings
from app.db.names import MESSAGES_COLLECTION

log = logging.getLogger(__name__)

# The task a wake-up names, and the queue it goes to.
RUN_JOB_TASK = "certautopilot.run_job"
QUEUE = "certautopilot"
# pymongo appname of the broker's client: it tells the broker's traffic apart from the
# application's ("certautopilot") in server logs and failpoints.
BROKER_APPNAME = "certautopilot-broker"
# A wake-up for a job due further ahead than this is not published: the reaper publishes
# it when it becomes due (a Celery countdown is held in a worker's memory until then).
MAX_COUNTDOWN_SECONDS = 300.0


def broker_url(settings: Settings) -> str:
    """CAP_MONGO_URI with its database replaced by CAP_BROKER_DB (same cluster), plus a
    server-selection timeout and the broker's appname unless the URI sets them."""
    parts = urlsplit(settings.require_mongo_uri())
    query = parse_qsl(parts.query, keep_blank_values=True)
    names = {k.lower() for k, _ in query}
    if "appname" not in names:
        query.append(("appName", BROKER_APPNAME))
    if "serverselectiontimeoutms" not in names:
        query.append(("serverSelectionTimeoutMS", str(settings.mongo_timeout_ms)))
    return urlunsplit((parts.scheme, parts.netloc, "/" + settings.broker_db,
                       urlencode(query), ""))


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings shared by the worker app and the publishers."""
    return {
        "broker_url": broker_url(settings),
        # kombu's MongoDB transport, closing each channel's client (see kombu_mongo).
        "broker_transport": "app.jobs.kombu_mongo:Transport",
        # Event and control queues of dead consumers expire (celery#1047).
        "broker_transport_options": {"ttl": True},
        "broker_connection_retry_on_startup": True,
        # A worker holds at most one message beyond those it runs: a killed worker loses
        # little, and the reaper re-publishes what it lost.
        "worker_prefetch_multiplier": 1,
        "task_acks_late": False,
        # Results live on the job document: no result backend.
        "task_ignore_result": True,
        "result_backend": None,
        "worker_hijack_root_logger": False,
        "task_default_queue": QUEUE,
        "task_serializer": "json",
        "accept_content": ["json"],
        "timezone": "UTC",
        "enable_utc": True,
        # Don't let one wedged publish hold a request or a handler for long.
        "broker_connection_timeout": max(1.0, settings.mongo_timeout_ms / 1000),
    }


# One publisher per process and broker: a process that changes settings (tests do, per
# test database) must not keep publishing to the broker of its first settings.
_publishers: dict[tuple[int, str], Celery] = {}
_publisher_lock = threading.Lock()
_worker_app: Celery | None = None


def use_app(app: Celery) -> None:
    """The worker registers its own Celery app so its publishes share its connections."""
    global _worker_app
    _worker_app = app


def _publisher(settings: Settings | None = None) -> Celery:
    if _worker_app is not None:
        return _worker_app
    settings = settings or load_settings()
    key = (os.getpid(), broker_url(settings))
    with _publisher_lock:
        app = _publishers.get(key)
        if app is None:
            app = Celery("certautopilot-publisher", set_as_current=False)
            app.conf.update(celery_config(settings))
            if not _publishers:
                atexit.register(_close_at_exit)
            _publishers[key] = app
        return app


def publish_wakeup(job_id: str, countdown: float | None = None, *,
                   settings: Settings | None = None) -> bool:
    """Publish the wake-up of ``job_id`` (after ``countdown`` seconds, if given).

    Returns False, never raises, when the broker cannot take it: the job stays queued and
    the reaper re-publishes it. A countdown beyond MAX_COUNTDOWN_SECONDS is not sent
    either (False): the reaper publishes the job when it is due."""
    if countdown is not None and countdown > MAX_COUNTDOWN_SECONDS:
        return False
    try:
        _publisher(settings).send_task(
            RUN_JOB_TASK, args=[str(job_id)], queue=QUEUE,
            countdown=countdown if countdown and countdown > 0 else None,
            retry=True,
            retry_policy={"max_retries": 2, "interval_start": 0.1, "interval_step": 0.2,
                          "interval_max": 0.5},
        )
        return True
    except Exception as exc:  # noqa: BLE001 - a lost wake-up is the reaper's job
        log.warning("could not publish a job wake-up; the reaper will re-publish it",
                    extra={"job_id": str(job_id),
                           "error": f"{exc.__class__.__name__}: {exc}"[:300]})
        return False


def publish_wakeups(job_ids: Iterable[str], *, settings: Settings | None = None) -> int:
    """Publish the wake-ups of several jobs due now (no countdown), written to the broker
    together: with this project's transport (``app.jobs.kombu_mongo``) one insert for
    all of them instead of two commands per message.

    When the batch cannot be written, each wake-up is published on its own (a message
    of the batch that did get in then arrives twice: harmless, a wake-up only says "this
    job may be ready"). Returns how many were published; never raises: a job whose
    wake-up was not published stays queued and the reaper re-publishes it."""
    ids = [str(job_id) for job_id in job_ids]
    if len(ids) <= 1:
        return sum(publish_wakeup(job_id, settings=settings) for job_id in ids)
    app = _publisher(settings)
    try:
        with app.producer_or_acquire() as producer:
            buffered = getattr(producer.channel, "buffered_puts", None)
            with buffered() if buffered is not None else nullcontext():
                for job_id in ids:
                    app.send_task(
                        RUN_JOB_TASK, args=[job_id], queue=QUEUE, producer=producer,
                        retry=True,
                        retry_policy={"max_retries": 2, "interval_start": 0.1,
                                      "interval_step": 0.2, "interval_max": 0.5})
        return len(ids)
    except Exception as exc:  # noqa: BLE001 - retried one by one below
        log.warning("could not publish a batch of job wake-ups; publishing them one by one",
                    extra={"jobs": len(ids), "first_job_id": ids[0],
                           "error": f"{exc.__class__.__name__}: {exc}"[:300]})
    return sum(publish_wakeup(job_id, settings=settings) for job_id in ids)


def broker_backlog(settings: Settings | None = None) -> int | None:
    """Wake-ups waiting in the broker's queue (None when the broker cannot be read)."""
    from app import db as dbm

    settings = settings or load_settings()
    try:
        client = dbm.get_client(settings)
        return int(client[settings.broker_db][MESSAGES_COLLECTION].count_documents(
            {"queue": QUEUE}))
    except Exception as exc:  # noqa: BLE001 - the reaper then republishes every stale job
        log.warning("cannot read the broker backlog",
                    extra={"error": f"{exc.__class__.__name__}: {exc}"[:200]})
        return None


def _close_at_exit() -> None:
    """Close the publishers' broker connections at exit, waiting at most a second: with
    the database unreachable, closing a MongoClient waits for server selection (5 s
    here), and an exit must not."""
    closer = threading.Thread(target=close_publishers, name="close-publishers", daemon=True)
    closer.start()
    closer.join(1.0)


def close_publishers() -> None:
    """Close this process's publishers and their broker connections (at exit)."""
    with _publisher_lock:
        for app in _publishers.values():
            with contextlib.suppress(Exception):  # a broker already gone: nothing to close
                pool = app._pool  # Celery.close only forgets it: close its connections
                if pool is not None:
                    pool.force_close_all()
                app.close()
        _publishers.clear()
