"""Queue depth as Prometheus gauges, computed from the database at scrape time.

- ``certautopilot_jobs_queued{kind}``: queued jobs (delayed ones included) per kind.
- ``certautopilot_jobs_oldest_queued_age_seconds``: how long the oldest due queued job
  has waited (0 when none waits): the signal to scale workers on.

Listed with the API's other scrape-time metrics in ``app/api/metrics/resources.py``;
``QueueDepthCollector`` serves any other registry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


def queue_depth_metrics(db: Any) -> Iterator[Metric]:
    from app.jobs.stats import queue_depth

    depth = queue_depth(db)
    queued = GaugeMetricFamily("certautopilot_jobs_queued",
                               "Queued jobs (waiting for a worker, delayed ones included), "
                               "by kind.", labels=["kind"])
    for kind, count in sorted(depth["by_kind"].items()):
        queued.add_metric([kind], float(count))
    oldest = GaugeMetricFamily("certautopilot_jobs_oldest_queued_age_seconds",
                               "Seconds the oldest due queued job has waited for a worker.")
    oldest.add_metric([], float(depth["oldest_queued_age_seconds"]))
    yield queued
    yield oldest


class QueueDepthCollector(Collector):
    def __init__(self, get_db: Callable[[], Any]) -> None:
        self._get_db = get_db

    def collect(self) -> Iterator[Metric]:
        yield from queue_depth_metrics(self._get_db())

    def describe(self) -> Iterator[Metric]:
        return iter(())

