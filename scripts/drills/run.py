#!/usr/bin/env python
"""HA drills: measure the availability promises of the spec (HIGH-AVAILABILITY.md).

    .venv/bin/python scripts/drills/run.py [--drill NAME ...] [--certificates N] [--quick]

Starts the whole stack as local processes (``stack.py``: embedded database, Pebble, 3 api
behind HAProxy, 3 workers, 2 schedulers), issues N certificates (default 200; 20 with
``--quick``), then runs each drill while a probe (``probe.py``) sends API requests
through HAProxy at a fixed rate. In every drill all N certificates are made due for
renewal and the disturbance happens while they renew:

- ``rolling_restart``: migrations, then each api (the next once the new one is ready
  behind HAProxy), each worker (SIGTERM, a grace), the schedulers last (leader first:
  it steps down); a third of the certificates becomes due as each role starts rolling.
  Pass: 0 failed renewal jobs, all renewed, 0 duplicate orders, probe success >= 99.95 %.
- ``worker_loss``: kill -9 of a random worker every 10 s from when renewals run until
  all are renewed or 5 minutes have passed (it is restarted at once, as a supervisor
  would). Pass: all renewed, 0 duplicate orders, converged within 5 minutes.
- ``scheduler_loss``: kill -9 of the leader (restarted), later SIGSTOP of the new leader
  past its lease, then SIGCONT. Half the certificates become due before the kill, half
  after it. Pass: promotion <= 30 s each time, 0 slots enqueued twice, all renewed.
- ``database_faults``: replSetStepDown for 10 s, failpoints dropping connections and
  answering NotWritablePrimary on claims, completions and audit writes, then kill -9 of
  the database and a restart on the same data directory. Pass: no acknowledged job or
  probe write lost, no 500 answered, all renewed within 5 minutes of the database's
  return.
- ``api_loss``: kill -9 of one api process (restarted after a while). Pass: probe
  success >= 99.95 %.

Every drill ends with ``certautopilot audit verify`` and ``certautopilot health``, which
must both succeed. Duplicate orders are counted from Pebble's log ("Added order" lines
beyond one per issuance). Prints a readable report, then one JSON object on its last line:
``{"<drill>": {"failed_renewal_jobs", "renewed", "duplicate_orders",
"probe_success_ratio", "probe_requests", "lost_jobs", "converged_s", ..., "passed"}}``.
Exit status 0 only when every drill passed. Every process is stopped at the end, also
after a failure, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from probe import Probe, Tally, utc_clock  # noqa: E402
from stack import SCAN_ENTRY, DrillError, Proc, Stack, log, wait_until  # noqa: E402

from app import db as dbm  # noqa: E402
from app.db.names import FIRES  # noqa: E402

DRILLS = ["rolling_restart", "worker_loss", "scheduler_loss", "database_faults", "api_loss"]
ISSUE = "certificates.issue"
CONVERGE_S = 300.0  # "background jobs eventually consistent within 5 minutes"
API_TARGET = 0.9995
PROMOTION_S = 30.0
WAIT_S = 600.0  # longest wait for the renewals, after the disturbance
POLL_S = 2.0  # how often the harness counts renewed certificates (converged_s: +- 2 s)


@dataclass
class Baseline:
    started: float
    issue_counts: dict[str, int]
    pebble_orders: int
    probe: Tally
    renewal_jobs: set[Any]


@dataclass
class Ctx:
    stack: Stack
    ids: list[str]
    probe: Probe
    quick: bool
    profile_ms: int | None = None
    observed_jobs: set[Any] = field(default_factory=set)
    stop_monitor: threading.Event = field(default_factory=threading.Event)

    @property
    def db(self) -> Any:
        return self.stack.db

    # --- state read from the database and Pebble --------------------------------------

    def issue_counts(self) -> dict[str, int]:
        return {d["_id"]: d.get("issue_count", 0) for d in dbm.primary(self.db)[
            dbm.CERTIFICATES].find({"_id": {"$in": self.ids}}, {"issue_count": 1})}

    def pebble_orders(self) -> int:
        assert self.stack.pebble is not None
        return self.stack.pebble.log().count("Added order")

    def renewal_job_ids(self) -> set[Any]:
        return {j["_id"] for j in dbm.primary(self.db)[dbm.JOBS].find(
            {"kind": ISSUE, "payload.reason": "renewal"}, {"_id": 1})}

    def monitor(self) -> None:
        """Every job the database acknowledged (seen by a read) is remembered; at the end
        of a drill each one must still exist. After the first read, each read takes only
        the jobs written since the previous one (``updated_at`` index, 10 s of overlap):
        the harness's own load on the database must not grow with the run."""
        since = None
        while not self.stop_monitor.wait(1.0):
            try:
                now = dbm.server_now(self.db)
                query: dict[str, Any] = {"kind": ISSUE, "payload.reason": "renewal"}
                if since is not None:
                    query["updated_at"] = {"$gte": since}
                self.observed_jobs |= {j["_id"] for j in dbm.primary(self.db)[dbm.JOBS].find(
                    query, {"_id": 1})}
                since = now - timedelta(seconds=10)
            except Exception:  # noqa: BLE001 - the database is down in one drill
                pass

    def running_issues(self) -> int:
        return dbm.primary(self.db)[dbm.JOBS].count_documents({"kind": ISSUE,
                                                               "state": "running"})

    # --- drill skeleton ---------------------------------------------------------------

    def begin(self) -> Baseline:
        if self.profile_ms is not None:  # (again: the database restarts in one drill)
            self.db.command("profile", 1, slowms=self.profile_ms)
        return Baseline(time.time(), self.issue_counts(), self.pebble_orders(),
                        self.probe.snapshot(), self.renewal_job_ids())

    def make_due(self, ids: list[str]) -> None:
        now = dbm.server_now(self.db)
        dbm.primary(self.db)[dbm.CERTIFICATES].update_many(
            {"_id": {"$in": ids}}, {"$set": {"next_renewal_at": now - timedelta(seconds=1)}})

    def renewed(self, base: Baseline) -> int:
        counts = self.issue_counts()
        return sum(counts.get(i, 0) > base.issue_counts.get(i, 0) for i in self.ids)

    def wait_renewed(self, base: Baseline, timeout: float) -> float | None:
        """Seconds from the drill's start until every certificate was renewed, or None
        after ``timeout`` more seconds (the pass conditions compare it with 5 minutes)."""
        try:
            wait_until(lambda: self.renewed(base) == len(self.ids), timeout,
                       "every certificate renewed", interval=POLL_S)
        except DrillError as exc:
            log(f"not converged: {exc}; renewed {self.renewed(base)} of {len(self.ids)}")
            return None
        return round(time.time() - base.started, 1)

    def finish(self, base: Baseline, extra: dict[str, Any]) -> dict[str, Any]:
        # Let the last completions land before counting.
        try:
            wait_until(lambda: self.running_issues() == 0, 60, "no issuance running")
        except DrillError as exc:
            log(str(exc))
        probe = self.probe.snapshot().minus(base.probe)
        counts = self.issue_counts()
        issuances = sum(max(0, counts.get(i, 0) - base.issue_counts.get(i, 0))
                        for i in self.ids)
        jobs = list(dbm.primary(self.db)[dbm.JOBS].find(
            {"kind": ISSUE, "payload.reason": "renewal", "_id": {"$nin": list(
                base.renewal_jobs)}}))
        failed = [j["_id"] for j in jobs if j["state"] == "dead" or any(
            h.get("event") in ("failed", "dead") for h in j.get("history", []))]
        existing = {j["_id"] for j in dbm.primary(self.db)[dbm.JOBS].find(
            {"_id": {"$in": list(self.observed_jobs)}}, {"_id": 1})}
        lost_jobs = len(self.observed_jobs - existing)
        acknowledged = list(self.probe.acknowledged_projects)
        found = dbm.primary(self.db)[dbm.PROJECTS].count_documents(
            {"_id": {"$in": acknowledged}})
        verify_rc, verify_out = self.stack.cli("audit", "verify")
        # Health is a moment's view: a leader that just lost its lease (a slow fire) is
        # replaced within the promised promotion time, so health gets that long (30 s) to
        # turn green; how long it took is reported.
        health_started = time.monotonic()
        health_rc, health_out = self.stack.cli("health")
        while health_rc and time.monotonic() - health_started < PROMOTION_S:
            time.sleep(2)
            health_rc, health_out = self.stack.cli("health")
        health_after = round(time.monotonic() - health_started, 1)
        if verify_rc or health_rc:
            log(f"audit verify ({verify_rc}): {verify_out[-600:]}")
            log(f"health ({health_rc}): {health_out[-600:]}")
        result: dict[str, Any] = {
            "failed_renewal_jobs": len(failed),
            "renewed": sum(counts.get(i, 0) > base.issue_counts.get(i, 0) for i in self.ids),
            "certificates": len(self.ids),
            "duplicate_orders": self.pebble_orders() - base.pebble_orders - issuances,
            "issuances": issuances,
            "renewal_jobs": len(jobs),
            "lost_jobs": lost_jobs,
            "lost_writes": len(acknowledged) - found,
            **probe.summary(),
            "converged_s": extra.pop("converged_s", None),
            **extra,
            "audit_verify_ok": verify_rc == 0,
            "health_ok": health_rc == 0,
            "health_green_after_s": health_after if health_rc == 0 else None,
            "duration_s": round(time.time() - base.started, 1),
        }
        if failed:
            result["failed_job_ids"] = [str(j) for j in failed[:10]]
        if self.profile_ms is not None:
            result["slow_ops"] = self.slow_ops(base)
        return result

    def slow_ops(self, base: Baseline, top: int = 8) -> list[dict[str, Any]]:
        """The database commands slower than ``--profile-slow-ms`` during the drill, by
        shape (command, collection, filter keys or pipeline stages), most time first."""
        since = datetime.fromtimestamp(base.started, UTC)
        totals: dict[str, list[int]] = {}
        for entry in self.db["system.profile"].find({"ts": {"$gte": since}},
                                                    {"command": 1, "millis": 1}):
            shape = op_shape(entry.get("command") or {})
            totals.setdefault(shape, []).append(int(entry.get("millis") or 0))
        ranked = sorted(totals.items(), key=lambda kv: -sum(kv[1]))[:top]
        return [{"op": shape, "count": len(ms), "total_s": round(sum(ms) / 1000, 1),
                 "max_ms": max(ms)} for shape, ms in ranked]

    def restart_dead_roles(self) -> list[str]:
        """What a supervisor does between drills: replace a role process that died."""
        restarted = []
        stack = self.stack
        for index, proc in enumerate(stack.apis):
            if not proc.alive():
                stack.apis[index] = stack.start_api(index)
                restarted.append(f"api{index}")
        for group, start in ((stack.workers, stack.start_worker),
                             (stack.schedulers, stack.start_scheduler)):
            for index, proc in enumerate(group):
                if not proc.alive():
                    group[index] = start()
                    restarted.append(proc.name)
        return restarted


def op_shape(command: dict[str, Any]) -> str:
    """``find certificates {_id,state}``: a profiled command without its values."""
    if not command:
        return "?"
    name = next(iter(command))
    target = command.get(name)
    shape: Any = ""
    if name == "find":
        shape = sorted(command.get("filter") or {})
    elif name == "aggregate":
        shape = [next(iter(stage)) for stage in command.get("pipeline") or [] if stage]
    elif name in ("update", "delete"):
        ops = command.get("updates") or command.get("deletes") or [{}]
        shape = sorted(ops[0].get("q") or {})
    elif name in ("findAndModify", "findandmodify", "count"):
        shape = sorted(command.get("query") or {})
    return f"{name} {target if isinstance(target, str) else ''} {shape or ''}".strip()


# --- the drills ---------------------------------------------------------------------------

def _booted(api: Proc) -> bool:
    return api.log().count("Booting worker") >= 2


def _heartbeating(db: Any, worker: Proc) -> bool:
    return dbm.primary(db)[dbm.WORKERS].find_one({"pid": worker.pid, "state": "running"}) \
        is not None


def rolling_restart(ctx: Ctx) -> dict[str, Any]:
    stack = ctx.stack
    base = ctx.begin()
    # A third of the certificates becomes due as each role starts rolling, so each roll
    # happens while renewals run (the schedulers': while the scan enqueues them).
    thirds = [ctx.ids[i::3] for i in range(3)]
    ctx.make_due(thirds[0])
    wait_until(ctx.running_issues, 120, "renewals running")
    steps: list[str] = []
    stack.migrate()
    steps.append("migrate")
    for index in range(len(stack.apis)):
        old, new = stack.apis[index], stack.start_api(index)
        wait_until(partial(_booted, new), 120, f"replacement api{index} up")
        time.sleep(1)
        old.terminate()
        old.popen.wait(90)
        stack.apis[index] = new
        stack.wait_ready_behind_haproxy(index)
        steps.append(f"api{index}")
    rolled_while_running = 0
    ctx.make_due(thirds[1])
    wait_until(ctx.running_issues, 120, "renewals running")
    for index in range(len(stack.workers)):
        old, new = stack.workers[index], stack.start_worker()
        wait_until(partial(_heartbeating, ctx.db, new), 120, "replacement worker heartbeating")
        rolled_while_running += bool(ctx.running_issues())
        old.terminate()
        old.popen.wait(120)
        stack.workers[index] = new
        steps.append(f"worker{index}")
    ctx.make_due(thirds[2])
    leader = stack.leader()
    stack.schedulers.sort(key=lambda p: p is not leader)  # the leader steps down first
    for index in range(len(stack.schedulers)):
        old, new = stack.schedulers[index], stack.start_scheduler()
        time.sleep(3)  # its start-up, before the old one goes
        old.terminate()
        old.popen.wait(60)
        stack.schedulers[index] = new
        steps.append("scheduler (leader)" if old is leader else "scheduler")
    converged = ctx.wait_renewed(base, WAIT_S)
    released = [j for j in dbm.primary(ctx.db)[dbm.JOBS].find(
        {"kind": ISSUE, "history.event": "released",
         "_id": {"$nin": list(base.renewal_jobs)}}, {"_id": 1})]
    result = ctx.finish(base, {"converged_s": converged, "rolled": steps,
                               "workers_rolled_with_jobs_running": rolled_while_running,
                               "jobs_released_mid_order": len(released)})
    result["passed"] = bool(
        result["failed_renewal_jobs"] == 0 and result["renewed"] == len(ctx.ids)
        and result["duplicate_orders"] == 0
        and (result["probe_success_ratio"] or 0) >= API_TARGET)
    return result


def worker_loss(ctx: Ctx) -> dict[str, Any]:
    stack = ctx.stack
    base = ctx.begin()
    ctx.make_due(ctx.ids)
    kills = 0
    every = 10.0
    wait_until(ctx.running_issues, 120, "renewals running")
    while ctx.renewed(base) < len(ctx.ids) and time.time() - base.started < CONVERGE_S:
        if kills:
            deadline = time.monotonic() + every
            while time.monotonic() < deadline and ctx.renewed(base) < len(ctx.ids):
                time.sleep(POLL_S)
            if ctx.renewed(base) >= len(ctx.ids):
                break
        index = stack.random_worker()
        stack.workers[index].kill9()
        stack.workers[index] = stack.start_worker()  # the supervisor restarts it
        kills += 1
        log(f"worker_loss: kill -9 #{kills}; renewed {ctx.renewed(base)}/{len(ctx.ids)}")
    converged = ctx.wait_renewed(base, WAIT_S)
    result = ctx.finish(base, {"converged_s": converged, "workers_killed": kills})
    result["passed"] = bool(
        result["renewed"] == len(ctx.ids) and result["duplicate_orders"] == 0
        and converged is not None and converged <= CONVERGE_S)
    return result


def _fires_since(ctx: Ctx, since: float) -> list[dict[str, Any]]:
    return [f for f in dbm.primary(ctx.db)[FIRES].find({"entry": SCAN_ENTRY}).sort(
        "fired_at", 1) if f["fired_at"].timestamp() > since]


def _promotion(ctx: Ctx, old_holder: str, since: float) -> dict[str, Any]:
    def first() -> dict[str, Any] | None:
        fires = [f for f in _fires_since(ctx, since) if f["holder"] != old_holder]
        return fires[0] if fires else None

    fire = wait_until(first, 120, "the standby's first enqueue", interval=0.1)
    return fire


def scheduler_loss(ctx: Ctx) -> dict[str, Any]:
    stack = ctx.stack
    base = ctx.begin()
    half = len(ctx.ids) // 2
    ctx.make_due(ctx.ids[:half])
    leader = wait_until(stack.leader, 60, "a scheduler leading")
    holder = stack.lease()["holder"]
    wait_until(lambda: _fires_since(ctx, time.time() - 5), 60, "the leader enqueuing")
    promotions = []

    killed_at = time.time()
    leader.kill9()
    stack.schedulers[stack.schedulers.index(leader)] = stack.start_scheduler()
    fire = _promotion(ctx, holder, killed_at)
    promotions.append(round(fire["fired_at"].timestamp() - killed_at, 2))
    log(f"scheduler_loss: kill -9 of the leader; promotion after {promotions[-1]} s")
    ctx.make_due(ctx.ids[half:])  # enqueued by the new leader

    time.sleep(3)
    paused = wait_until(stack.leader, 60, "the new leader")
    paused_holder, paused_term = stack.lease()["holder"], stack.lease()["term"]
    stopped_at = time.time()
    paused.signal(signal.SIGSTOP)
    try:
        fire = _promotion(ctx, paused_holder, stopped_at)
        promotions.append(round(fire["fired_at"].timestamp() - stopped_at, 2))
        log(f"scheduler_loss: SIGSTOP of the leader; promotion after {promotions[-1]} s")
        time.sleep(max(0.0, stopped_at + stack.scheduler_lease_s + 5 - time.time()))
    finally:
        paused.signal(signal.SIGCONT)
    takeover_at = fire["fired_at"]
    time.sleep(5)  # the woken former leader must not enqueue under its old term
    late = [f for f in _fires_since(ctx, stopped_at)
            if f["holder"] == paused_holder and f["term"] == paused_term
            and f["fired_at"] > takeover_at]
    converged = ctx.wait_renewed(base, WAIT_S)
    fires = _fires_since(ctx, base.started)
    slots = Counter(f["slot"] for f in fires)
    keys = Counter(j["dedupe_key"] for j in dbm.primary(ctx.db)[dbm.JOBS].find(
        {"dedupe_key": {"$regex": f"^{SCAN_ENTRY}@"}}, {"dedupe_key": 1}))
    duplicates = sum(n - 1 for n in slots.values() if n > 1) + \
        sum(n - 1 for n in keys.values() if n > 1) + len(late)
    result = ctx.finish(base, {"converged_s": converged, "promotions_s": promotions,
                               "duplicate_enqueues": duplicates, "fired_slots": len(fires),
                               "scheduler_lease_s": stack.scheduler_lease_s,
                               "paused_leader_alive": paused.alive()})
    result["passed"] = bool(
        len(promotions) == 2 and max(promotions) <= PROMOTION_S and duplicates == 0
        and result["renewed"] == len(ctx.ids))
    return result


def database_faults(ctx: Ctx) -> dict[str, Any]:
    stack = ctx.stack
    admin = stack.db.client.admin
    base = ctx.begin()
    ctx.make_due(ctx.ids)
    wait_until(ctx.running_issues, 120, "renewals running")
    window = 3.0 if ctx.quick else 8.0
    phases: list[dict[str, Any]] = []

    def writable() -> bool:
        dbm.primary(ctx.db)["drill_probe"].insert_one({"at": time.time()})
        return True

    started = time.time()
    try:
        admin.command("replSetStepDown", 10, force=True)
    except Exception as exc:  # noqa: BLE001 - the server may drop our connection too
        log(f"replSetStepDown: {exc!r}")
    time.sleep(10)
    wait_until(writable, 120, "a writable primary after the step-down")
    phases.append({"fault": "replSetStepDown 10 s", "s": round(time.time() - started, 1)})

    commands = ["findAndModify", "update", "insert", "commitTransaction"]
    for name, data in (("closeConnection", {"closeConnection": True}),
                       ("NotWritablePrimary", {"errorCode": 10107,
                                               "errmsg": "drill: not writable primary"})):
        started = time.time()
        admin.command("configureFailPoint", "failCommand", mode="alwaysOn",
                      data={"failCommands": commands, **data})
        try:
            time.sleep(window)
        finally:
            admin.command("configureFailPoint", "failCommand", mode="off")
        phases.append({"fault": f"failCommand {name} on {'/'.join(commands)}",
                       "s": round(time.time() - started, 1)})

    down = 5.0 if ctx.quick else 15.0
    started = time.time()
    assert stack.db_proc is not None
    stack.db_proc.kill9()
    time.sleep(down)
    stack.start_database()
    returned_at = time.time()
    phases.append({"fault": "kill -9 of the database, restart on the same directory",
                   "s": round(returned_at - started, 1)})
    log(f"database_faults: the database is back after {phases[-1]['s']} s")
    wait_until(writable, 120, "the restarted database writable")
    converged = ctx.wait_renewed(base, WAIT_S)
    after_return = round(base.started + converged - returned_at, 1) if converged else None
    result = ctx.finish(base, {"converged_s": converged,
                               "renewed_after_db_return_s": after_return,
                               "phases": phases})
    result["passed"] = bool(
        result["lost_jobs"] == 0 and result["lost_writes"] == 0 and result["probe_500"] == 0
        and result["renewed"] == len(ctx.ids) and after_return is not None
        and after_return <= CONVERGE_S)
    return result


def api_loss(ctx: Ctx) -> dict[str, Any]:
    stack = ctx.stack
    base = ctx.begin()
    ctx.make_due(ctx.ids)
    time.sleep(5)
    index = random.randrange(len(stack.apis))
    stack.apis[index].kill9()
    killed_at = time.time()
    killed_utc = utc_clock()
    log(f"api_loss: kill -9 of api{index} at {killed_utc}")
    wait_until(lambda: stack.haproxy_status().get(("be_live", f"api{index}")) != "UP", 30,
               "haproxy taking the killed api out")
    taken_out = round(time.time() - killed_at, 1)
    time.sleep(5 if ctx.quick else 20)
    stack.apis[index] = stack.start_api(index)  # the supervisor restarts it
    stack.wait_ready_behind_haproxy(index)
    back = round(time.time() - killed_at, 1)
    time.sleep(5)
    converged = ctx.wait_renewed(base, WAIT_S)
    result = ctx.finish(base, {"converged_s": converged, "killed": f"api{index}",
                               "killed_at": killed_utc, "taken_out_after_s": taken_out,
                               "back_after_s": back})
    result["passed"] = bool((result["probe_success_ratio"] or 0) >= API_TARGET
                            and result["renewed"] == len(ctx.ids))
    return result


RUNNERS: dict[str, Callable[[Ctx], dict[str, Any]]] = {
    "rolling_restart": rolling_restart, "worker_loss": worker_loss,
    "scheduler_loss": scheduler_loss, "database_faults": database_faults,
    "api_loss": api_loss,
}


# --- setup, report, main ------------------------------------------------------------------

def setup(stack: Stack, count: int) -> tuple[list[str], str]:
    from app.audit import system_actor
    from app.domain import accounts, certificates, projects, tokens

    actor = system_actor("cli")
    project_id = projects.create_project(stack.db, name="drills", actor=actor)["_id"]
    accounts.create_account(stack.db, project_id, {"contact": ["ops@example.test"],
                                                   "terms_agreed": True}, actor,
                            register=False, settings=stack.settings)
    _, admin_token = tokens.create_token(stack.db, project_id=None, scopes=["admin"],
                                         actor=actor, name="drill-probe")
    log(f"creating {count} certificates; the leader's renewal scan enqueues their issuance")
    ids = [certificates.create_certificate(stack.db, project_id, {
        "names": [f"d{i}.drills.test"], "key_type": "ec256"}, actor,
        settings=stack.settings)["_id"] for i in range(count)]
    started = time.time()
    wait_until(lambda: dbm.primary(stack.db)[dbm.CERTIFICATES].count_documents(
        {"_id": {"$in": ids}, "status": "issued"}) == count, 120 + count * 3,
        f"{count} certificates issued", interval=1)
    log(f"{count} certificates issued in {time.time() - started:.0f} s")
    return ids, admin_token


def report(name: str, result: dict[str, Any]) -> None:
    verdict = "PASS" if result.get("passed") else "FAIL"
    print(f"\n== {name}: {verdict}")
    keys = ["renewed", "certificates", "failed_renewal_jobs", "duplicate_orders",
            "lost_jobs", "lost_writes", "converged_s", "probe_requests",
            "probe_success_ratio", "probe_500", "probe_503_retry_after", "probe_non_2xx",
            "probe_transport_errors", "probe_p50_s", "probe_p99_s", "probe_max_s",
            "audit_verify_ok", "health_ok"]
    for key in keys + sorted(k for k in result if k not in keys and k != "passed"):
        print(f"   {key:<34} {result.get(key)}")
    sys.stdout.flush()


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--drill", action="append", choices=DRILLS,
                        help="run only this drill (repeatable); default: all, in order")
    parser.add_argument("--certificates", type=int, default=None,
                        help="certificates renewed in each drill (default 200; --quick 20)")
    parser.add_argument("--quick", action="store_true",
                        help="20 certificates, shorter leases and waits (the CI test)")
    parser.add_argument("--rate", type=float, default=None,
                        help="probe dispatches per second (default 10; --quick 5)")
    parser.add_argument("--profile-slow-ms", type=int, default=None,
                        help="profile database commands slower than this (ms) and report "
                             "the slowest shapes per drill (slow_ops)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where logs and data go (default: a new temporary directory)")
    args = parser.parse_args()
    count = args.certificates or (20 if args.quick else 200)
    rate = args.rate or (5.0 if args.quick else 10.0)
    drills = args.drill or DRILLS
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="drills-"))
    workdir.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    log(f"drills {drills} with {count} certificates, probe {rate}/s; logs in {workdir}")
    results: dict[str, Any] = {}
    stack = Stack(workdir, quick=args.quick)
    ctx: Ctx | None = None
    monitor: threading.Thread | None = None
    try:
        stack.start()
        ids, admin_token = setup(stack, count)
        probe = Probe(stack.api_url(), admin_token, ids, rate)
        ctx = Ctx(stack, ids, probe, args.quick, profile_ms=args.profile_slow_ms)
        monitor = threading.Thread(target=ctx.monitor, daemon=True)
        monitor.start()
        probe.start()
        for name in drills:
            log(f"drill {name}: start")
            try:
                results[name] = RUNNERS[name](ctx)
                # Every drill ends with `audit verify` and `health` green (the issue's rule
                # for all of them), on top of the drill's own conditions.
                results[name]["passed"] = bool(
                    results[name].get("passed") and results[name].get("audit_verify_ok")
                    and results[name].get("health_ok"))
            except Exception as exc:  # noqa: BLE001 - report it, stop nothing, go on
                log(f"drill {name} failed: {traceback.format_exc()}")
                results[name] = {"passed": False, "error": repr(exc)}
            report(name, results[name])
            restarted = ctx.restart_dead_roles()
            if restarted:
                log(f"restarted after {name}: {restarted}")
                time.sleep(10)
    except KeyboardInterrupt:
        log("interrupted")
        results["interrupted"] = True
    finally:
        if ctx is not None:
            ctx.stop_monitor.set()
            ctx.probe.stop()
        if monitor is not None:
            monitor.join(5)
        stack.close()
    passed = bool(results) and all(
        r.get("passed") for k, r in results.items() if k in DRILLS) \
        and "interrupted" not in results
    print(f"\n{'all drills passed' if passed else 'SOME DRILLS FAILED'} "
          f"({count} certificates; logs in {workdir})")
    print(json.dumps(results, default=str))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
