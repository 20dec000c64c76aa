"""Helpers for the durable-jobs tests: the environment, broker inspection, failpoints, and
leaving the worker's draining state between tests."""

from __future__ import annotations

import base64
import json
from typing import Any

from pymongo import MongoClient

from app.db.names import MESSAGES_COLLECTION
from app.jobs import broker, runner

JOB_ENV = {
    "CAP_EXTRA_HANDLER_MODULES": "tests.helpers.job_kinds",
    "CAP_JOB_LEASE_SECONDS": "3",
    "CAP_REAPER_REPUBLISH_SECONDS": "3",
    "CAP_JOB_GRACE_SECONDS": "2",
    "CAP_JOB_MAX_ATTEMPTS": "5",
}


def broker_messages(client: MongoClient[dict[str, Any]], broker_db: str) -> list[dict[str, Any]]:
    """The wake-ups waiting in kombu's collection, decoded: [{task, args, eta}]."""
    out = []
    for doc in client[broker_db][MESSAGES_COLLECTION].find({"queue": broker.QUEUE}):
        message = json.loads(doc["payload"])
        body = json.loads(base64.b64decode(message["body"]))
        out.append({"task": message["headers"]["task"], "args": body[0], "kwargs": body[1],
                    "eta": message["headers"].get("eta")})
    return out


def failpoint(client: MongoClient[dict[str, Any]], commands: list[str], *, times: int,
              error_code: int | None = None, close_connection: bool = False,
              app_name: str = "certautopilot") -> None:
    data: dict[str, Any] = {"failCommands": commands, "appName": app_name}
    if close_connection:
        data["closeConnection"] = True
    if error_code is not None:
        data["errorCode"] = error_code
    client.admin.command({"configureFailPoint": "failCommand", "mode": {"times": times},
                          "data": data})


def failpoint_off(client: MongoClient[dict[str, Any]]) -> None:
    client.admin.command({"configureFailPoint": "failCommand", "mode": "off"})


def reset_drain() -> None:
    """Leave the draining state ``runner.begin_drain`` entered (the process keeps running
    jobs in the next test): cancel its timers and clear the flag."""
    for name in ("_drain_timer", "_stuck_timer"):
        timer = getattr(runner, name)
        if timer is not None:
            timer.cancel()
            setattr(runner, name, None)
    runner._draining.clear()
