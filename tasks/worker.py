"""Worker lifecycle: handler modules, heartbeats, and graceful shutdown.

- At start (``worker_init``): logging, then every handler module is imported
  (``app.handlers.HANDLERS`` + ``CAP_EXTRA_HANDLER_MODULES``); a module that fails to import
  stops the worker with its name.
- Ready (``worker_ready``): with ``CAP_WORKER_METRICS_PORT``, the pool's merged
  Prometheus metrics are served on that port (tasks/metrics.py); a heartbeat thread
  keeps this worker's document in ``workers`` (host, pid, version, running jobs, last
  seen) and runs the reaper now and then.
- SIGTERM: Celery stops consuming (warm shutdown); every process that runs jobs (the
  pool's children, or the main process for the solo/threads pools) starts draining:
  running jobs get CAP_JOB_GRACE_SECONDS to finish, then their leases are released so a
  peer re-claims them at once. The worker stops fetching wake-ups at once; those it had
  prefetched but not started are restored to the broker by kombu when it closes its
  channel (and, should that fail, re-published by the reaper).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType
from typing import Any

from celery import signals

from app.config import configure_logging, load_or_exit
from app.handlers import load_handlers
from app.jobs import broker, runner
from app.jobs.workers import WorkerHeartbeat

log = logging.getLogger("certautopilot.worker")

_heartbeat: WorkerHeartbeat | None = None


@signals.setup_logging.connect
def _setup_logging(**_: Any) -> None:
    configure_logging(load_or_exit())


@signals.worker_init.connect
def _worker_init(**_: Any) -> None:
    settings = load_or_exit()
    kinds = load_handlers(settings.extra_handler_modules)
    log.info("job handlers loaded", extra={"kinds": kinds})


_in_pool_child = False


def _drain_on_sigterm(signum: int, frame: FrameType | None) -> None:
    # A pool process does not exit by itself (see app.jobs.runner): the pool stops it.
    runner.begin_drain(load_or_exit().job_grace_seconds, exit_after=False)


@signals.worker_process_init.connect
def _pool_process_init(**_: Any) -> None:
    global _in_pool_child
    _in_pool_child = True
    load_handlers(load_or_exit().extra_handler_modules)


def install_drain_handler() -> None:
    """In a prefork child, make SIGTERM drain instead of exit.

    billiard installs its own SIGTERM handler in each child *after* the
    ``worker_process_init`` hooks ran (it raises SystemExit wherever the child is, which
    would abandon a running job without releasing its lease), so the task installs ours
    when it starts. The parent forwards SIGTERM to its children at shutdown; a child
    that never ran a job keeps billiard's handler and simply exits. The solo and threads
    pools run jobs in the main process, where Celery's own handler starts the warm
    shutdown and ``worker_shutting_down`` drains."""
    if _in_pool_child and signal.getsignal(signal.SIGTERM) is not _drain_on_sigterm \
            and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _drain_on_sigterm)


# Pool processes seen running a task (so they installed the drain handler).
_job_pool_pids: set[int] = set()


def _running_job_ids() -> list[str]:
    from celery.worker import state

    ids = list(runner.running_jobs())
    for _ in range(3):
        try:
            requests = list(state.active_requests)
            ids.extend(str(req.args[0]) for req in requests
                       if req.name == broker.RUN_JOB_TASK and req.args)
            _job_pool_pids.update(int(req.worker_pid) for req in requests
                                  if getattr(req, "worker_pid", None))
            break
        except RuntimeError:  # the set changed while we copied it
            continue
    return sorted(set(ids))


_consumer: Any = None


@signals.worker_ready.connect
def _worker_ready(sender: Any = None, **_: Any) -> None:
    global _heartbeat, _consumer
    _consumer = sender
    from app import db as dbm

    settings = load_or_exit()
    controller = getattr(sender, "controller", None)
    pool = getattr(getattr(controller, "pool", None), "__class__", type(None)).__module__
    if settings.worker_metrics_port:
        from tasks import metrics

        metrics.serve(settings.worker_metrics_port)
    _heartbeat = WorkerHeartbeat(
        lambda: dbm.get_db(settings), settings,
        node=str(getattr(sender, "hostname", None) or runner.worker_identity()),
        pool=pool.rsplit(".", 1)[-1], concurrency=int(getattr(controller, "concurrency", 0)
                                                      or 0),
        running=_running_job_ids, owners=lambda: _lease_owners(controller)).start()
    # No leader enqueues alerts.evaluate while there is none: workers watch for that.
    from app.ops.alerts.watchdog import LeaderWatch

    LeaderWatch(lambda: dbm.get_db(settings), settings).start()


def _stop_consuming() -> None:
    """Stop fetching wake-ups. Celery's warm shutdown keeps its event loop (and so the
    broker polling) running until the pool is idle; a draining worker must not take
    messages its peers could run."""
    if _consumer is None:
        return
    try:
        _consumer.cancel_task_queue(broker.QUEUE)
    except Exception as exc:  # noqa: BLE001 - the worker then defers what it still gets
        log.warning("could not stop consuming", extra={"error": str(exc)[:200]})


def _lease_owners(controller: Any) -> list[str]:
    """The job-lease owners of this worker (``runner.worker_identity()`` of the main
    process and of each pool process): what a peer takes back if this worker is lost."""
    pids = {os.getpid(), *_job_pool_pids}
    try:
        info = getattr(getattr(controller, "pool", None), "info", None) or {}
        pids.update(int(pid) for pid in info.get("processes") or () if pid)
    except Exception:  # noqa: BLE001 - a pool between states: the pids seen so far
        pass
    return [runner.worker_identity(pid) for pid in sorted(pids)]


def _job_running_pool_pids() -> set[int]:
    """Pool processes that ran a task (they installed the drain handler when it
    started): those running one now, and those the heartbeat saw running one."""
    _running_job_ids()  # records the pool processes of the running tasks
    return set(_job_pool_pids)


def _stop_replacing_pool_processes() -> None:
    """From now on a pool process that exits is not replaced. billiard's supervisor
    would otherwise fork replacements during the warm shutdown for the pool processes
    that exit on SIGTERM, and a replacement killed while it waits on the pool's queue
    (holding its lock) makes the main process hang at exit. Wake-ups still queued in
    the pool then go unrun here; the reaper re-publishes their jobs."""
    pool = getattr(getattr(getattr(_consumer, "controller", None), "pool", None), "_pool",
                   None)
    supervisor = getattr(pool, "_worker_handler", None)
    if supervisor is not None and hasattr(supervisor, "close"):
        supervisor.close()
        log.info("shutting down: pool processes that exit are not replaced")


@signals.worker_shutting_down.connect
def _worker_shutting_down(**_: Any) -> None:
    settings = load_or_exit()
    # We are inside the SIGTERM handler: let the event loop cancel the consumer.
    hub = getattr(_consumer, "hub", None)
    if hub is not None:
        hub.call_soon(_stop_consuming)
    else:
        _stop_consuming()
    if _heartbeat is not None:
        threading.Thread(target=_heartbeat.draining, daemon=True).start()
    _stop_replacing_pool_processes()
    # Jobs run in this process (solo/threads pools) drain here ...
    runner.begin_drain(settings.job_grace_seconds)
    # ... and the prefork pool processes that ran a job drain on the SIGTERM forwarded to
    # them (they installed the drain handler when their first job started). The others
    # get none: they still have billiard's handler and would exit, and a pool process
    # that dies on a signal while it waits on the pool's queue can leave the queue's
    # lock held, which hangs this process at exit. The pool stops them when it closes.
    for pid in _job_running_pool_pids():
        if pid != os.getpid():
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


@signals.worker_process_shutdown.connect
def _pool_process_shutdown(pid: int | None = None, **_: Any) -> None:
    from app.metrics import mark_process_dead

    mark_process_dead(pid or os.getpid())


@signals.worker_shutdown.connect
def _worker_shutdown(**_: Any) -> None:
    if _heartbeat is not None:
        _heartbeat.stop()
    from tasks import metrics

    metrics.cleanup()
