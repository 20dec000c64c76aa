"""A steady mix of API requests through HAProxy at a fixed rate, counting every answer.

Open loop: request k is due at ``start + k / rate`` whatever happened to the earlier
ones (a slow or failed answer does not lower the offered load). The mix, per 10 requests:
5 ``GET /api/v1/certificates/{id}``, 3 ``GET /api/v1/certificates?limit=20`` and 2
``POST /api/v1/projects`` with an ``Idempotency-Key`` (every second POST repeats the
previous one: the answer must be the replay of the first). A success is a 2xx answer;
everything else is counted by status (500s apart, and 503s with and without
``Retry-After``), and transport errors (no answer within the client's 30 s timeout,
HAProxy's own server timeout being 60 s) apart; latencies of answers are kept. Projects
whose creation was acknowledged (2xx) are remembered, so a drill can check none was lost.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import requests


@dataclass
class Tally:
    requests: int = 0
    ok: int = 0
    status: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    replay_mismatch: int = 0
    latencies: list[float] = field(default_factory=list)  # seconds, answered requests
    # Each failed request (not a 2xx): when it was sent (UTC), what, and the status or
    # the transport error, to match against the drill's disturbances in the logs.
    failures: list[dict[str, str]] = field(default_factory=list)

    def minus(self, other: Tally) -> Tally:
        return Tally(self.requests - other.requests, self.ok - other.ok,
                     self.status - other.status, self.errors - other.errors,
                     self.replay_mismatch - other.replay_mismatch,
                     self.latencies[len(other.latencies):],
                     self.failures[len(other.failures):])

    def copy(self) -> Tally:
        return Tally(self.requests, self.ok, Counter(self.status), Counter(self.errors),
                     self.replay_mismatch, list(self.latencies), list(self.failures))

    def latency(self, q: float) -> float | None:
        ordered = sorted(self.latencies)
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3) \
            if ordered else None

    def summary(self) -> dict[str, Any]:
        return {
            "probe_requests": self.requests,
            "probe_success_ratio": round(self.ok / self.requests, 6) if self.requests else None,
            "probe_failed": self.requests - self.ok,
            "probe_500": sum(n for s, n in self.status.items() if s == "500"),
            "probe_503_retry_after": self.status.get("503+retry-after", 0),
            "probe_503_bare": self.status.get("503", 0),
            "probe_non_2xx": {s: n for s, n in sorted(self.status.items())
                              if not s.startswith("2")},
            "probe_transport_errors": dict(self.errors),
            "probe_replay_mismatch": self.replay_mismatch,
            "probe_p50_s": self.latency(0.5), "probe_p99_s": self.latency(0.99),
            "probe_max_s": self.latency(1.0),
            "probe_slower_than_5s": sum(t > 5 for t in self.latencies),
            "probe_failure_samples": self.failures[:5] + self.failures[-5:]
            if len(self.failures) > 10 else list(self.failures),
        }


class Probe:
    def __init__(self, base_url: str, admin_token: str, certificate_ids: list[str],
                 rate: float, timeout: float = 30.0) -> None:
        self.base = base_url.rstrip("/") + "/api/v1"
        self.headers = {"Authorization": f"Bearer {admin_token}"}
        self.ids = certificate_ids
        self.rate = rate
        self.timeout = timeout
        self.tally = Tally()
        self.acknowledged_projects: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(max_workers=max(8, int(rate * 2)),
                                        thread_name_prefix="probe")
        self._thread = threading.Thread(target=self._dispatch, name="probe", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._pool.shutdown(wait=True, cancel_futures=True)

    def snapshot(self) -> Tally:
        with self._lock:
            return self.tally.copy()

    def _dispatch(self) -> None:
        started = time.monotonic()
        k = 0
        while not self._stop.is_set():
            due = started + k / self.rate
            delay = due - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)
                continue
            self._pool.submit(self._one, k)
            k += 1

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            session.headers.update(self.headers)
        return session

    def _one(self, k: int) -> None:
        kind = k % 10
        sent = utc_clock()
        try:
            if kind < 5:
                self._count(self._session().get(
                    f"{self.base}/certificates/{random.choice(self.ids)}",
                    timeout=self.timeout), sent)
            elif kind < 8:
                self._count(self._session().get(f"{self.base}/certificates",
                                                params={"limit": 20}, timeout=self.timeout),
                            sent)
            else:
                self._post_twice()
        except requests.RequestException as exc:
            what = f"{exc.request.method} {exc.request.url}" if exc.request else "?"
            with self._lock:
                self.tally.requests += 1
                self.tally.errors[type(exc).__name__] += 1
                self.tally.failures.append({"sent": sent, "request": what,
                                            "error": f"{type(exc).__name__}: {exc}"[:300]})

    def _post_twice(self) -> None:
        key = uuid.uuid4().hex
        body = {"name": f"probe-{key[:20]}", "description": "drill probe"}
        headers = {"Idempotency-Key": key}
        sent = utc_clock()
        first = self._session().post(f"{self.base}/projects", json=body, headers=headers,
                                     timeout=self.timeout)
        self._count(first, sent)
        if first.ok:
            with self._lock:
                self.acknowledged_projects.append(first.json()["id"])
        sent = utc_clock()
        second = self._session().post(f"{self.base}/projects", json=body, headers=headers,
                                      timeout=self.timeout)
        self._count(second, sent)
        if first.ok and second.ok and second.json().get("id") != first.json()["id"]:
            with self._lock:
                self.tally.replay_mismatch += 1
        elif second.ok and not first.ok:
            with self._lock:
                self.acknowledged_projects.append(second.json()["id"])

    def _count(self, answer: requests.Response, sent: str) -> None:
        label = str(answer.status_code)
        if answer.status_code == 503 and answer.headers.get("Retry-After"):
            label = "503+retry-after"
        ok = 200 <= answer.status_code < 300
        with self._lock:
            self.tally.requests += 1
            self.tally.ok += ok
            self.tally.status[label] += 1
            self.tally.latencies.append(answer.elapsed.total_seconds())
            if not ok:
                self.tally.failures.append({
                    "sent": sent, "request": f"{answer.request.method} "
                    f"{answer.request.path_url}", "error": label})


def utc_clock() -> str:
    """Now, UTC, as HH:MM:SS.mmm (the drill log's clock, to the millisecond)."""
    return datetime.now(UTC).strftime("%H:%M:%S.%f")[:-3]
