"""The chart's worker scaling checked against live processes and a migrated database.

- prometheus-adapter variant: two real api processes (gunicorn) export /metrics; their
  series get the target labels Prometheus gives them through the chart's ServiceMonitor;
  the chart's adapter rule, instantiated as the adapter does for the chart's HPA, is
  evaluated over them (tests/helpers/promql.py): the HPA sees the queue depth, once.
- KEDA variant: the ScaledObject's mongodb query is the partial filter of the queue's
  index and counts the queued jobs.
"""

from __future__ import annotations

import json
import math
import re
from datetime import timedelta

import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

import tests.helpers.job_kinds  # noqa: F401 - registers the test.* job kinds here
from app import db as dbm
from app import jobs
from app.db.clock import server_now
from devstack.embedded import free_port
from tests.helpers import wait_for
from tests.helpers.chart import BASE, NAMESPACE, by_component, render
from tests.helpers.promql import Sample, evaluate

HPA_VALUES = {**BASE, "worker": {"autoscaling": {"mode": "hpa", "targetQueuedPerPod": 3}},
              "metrics": {"serviceMonitor": {"enabled": True}}}
METRIC = "certautopilot_jobs_queued"


def start_apis(procs, env, count):
    bases = []
    for _ in range(count):
        bind = f"127.0.0.1:{free_port()}"
        procs.api(env, bind, workers=1)
        bases.append(f"http://{bind}")

    def ready(base: str) -> bool:
        try:
            return requests.get(base + "/readyz", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    for base in bases:
        wait_for(lambda base=base: ready(base), timeout=120, message=f"{base}/readyz")
    return bases


def scrape(base: str) -> list[Sample]:
    text = requests.get(base + "/metrics", timeout=30).text
    return [({"__name__": s.name, **s.labels}, s.value)
            for family in text_string_to_metric_families(text) for s in family.samples]


def prom_name(label: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", label)


def as_prometheus_stores(samples: list[Sample], docs, pod: str, instance: str,
                         namespace: str = NAMESPACE, release: str | None = None
                         ) -> list[Sample]:
    """The target labels a ServiceMonitor scrape adds (namespace, service, job, pod,
    container, endpoint, instance, and the podTargetLabels copied from the pod, whose
    app.kubernetes.io/instance is ``release`` if given)."""
    monitor = docs["ServiceMonitor"][0]
    api = by_component(docs["Deployment"], "api")
    service = docs["Service"][0]["metadata"]["name"]
    pod_labels = dict(api["spec"]["template"]["metadata"]["labels"])
    if release is not None:
        pod_labels["app.kubernetes.io/instance"] = release
    target = {"namespace": namespace, "service": service, "job": service, "pod": pod,
              "container": "api", "endpoint": monitor["spec"]["endpoints"][0]["port"],
              "instance": instance}
    target |= {prom_name(k): pod_labels[k] for k in monitor["spec"]["podTargetLabels"]}
    return [({**labels, **target}, value) for labels, value in samples]


def adapter_query(docs) -> str:
    """The PromQL prometheus-adapter sends for the chart's HPA: <<.Series>> is the metric,
    <<.LabelMatchers>> the HPA's selector plus the HPA's namespace (namespace override)."""
    rules = yaml.safe_load(docs["ConfigMap"][0]["data"]["config.yaml"])["externalRules"]
    [rule] = rules
    hpa = docs["HorizontalPodAutoscaler"][0]
    metric = hpa["spec"]["metrics"][0]["external"]["metric"]
    assert rule["name"]["as"] == metric["name"]
    series = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", rule["seriesQuery"]).group(0)
    matchers = dict(metric["selector"]["matchLabels"])
    if rule["resources"]["overrides"].get("namespace") == {"resource": "namespace"}:
        matchers["namespace"] = NAMESPACE
    text = ",".join(f'{k}="{v}"' for k, v in sorted(matchers.items()))
    return rule["metricsQuery"].replace("<<.Series>>", series) \
        .replace("<<.LabelMatchers>>", text)


def hpa_replicas(docs, values: list[float]) -> int:
    """What the HPA does with an External AverageValue target: sum / target, rounded up,
    within min and max."""
    hpa = docs["HorizontalPodAutoscaler"][0]
    target = float(hpa["spec"]["metrics"][0]["external"]["target"]["averageValue"])
    wanted = math.ceil(sum(values) / target)
    return max(hpa["spec"]["minReplicas"], min(hpa["spec"]["maxReplicas"], wanted))


def enqueue_mix(db) -> int:
    for kind, count in (("test.noop", 4), ("test.ledger", 2), ("test.permanent", 1)):
        for _ in range(count):
            jobs.enqueue(db, kind, {}, publish=False)
    # Delayed jobs are queued too (the metric and the KEDA query both count them).
    jobs.enqueue(db, "test.noop", {}, publish=False,
                 run_after=server_now(db) + timedelta(hours=1))
    return 8


def test_adapter_rule_gives_the_hpa_the_queue_depth_once_over_two_live_api_replicas(
        jenv, migrated_db, procs) -> None:
    docs = render(HPA_VALUES)
    query = adapter_query(docs)
    depth = enqueue_mix(migrated_db)
    assert jobs.queue_depth(migrated_db)["queued"] == depth
    bases = start_apis(procs, jenv, 2)

    def stored() -> list[Sample]:
        series: list[Sample] = []
        for i, base in enumerate(bases):
            samples = [s for s in scrape(base) if s[0]["__name__"] == METRIC]
            series += as_prometheus_stores(samples, docs, f"rel-certautopilot-api-{i}",
                                           base.removeprefix("http://"))
            # Another release in the namespace and the same release name elsewhere:
            # the rule's selection must leave them out.
            other = [(labels, 100 * value) for labels, value in samples]
            series += as_prometheus_stores(other, docs, f"other-api-{i}", f"10.0.0.{i}:8000",
                                           release="other")
            series += as_prometheus_stores(samples, docs, f"rel-api-{i}", f"10.1.0.{i}:8000",
                                           namespace="elsewhere")
        return series

    series = stored()
    per_replica = [sum(v for labels, v in series
                       if labels["instance"] == base.removeprefix("http://")) for base in bases]
    assert per_replica == [depth, depth]  # each replica reports the whole queue
    result = evaluate(query, series)
    assert [value for _, value in result] == [depth]
    assert hpa_replicas(docs, [v for _, v in result]) == math.ceil(depth / 3)

    # The rule this chart used to ship: summed over replicas, no such label as release.
    old = evaluate('max(sum by (release) (certautopilot_jobs_queued{namespace="certs"}))',
                   series)
    assert [value for _, value in old] != [depth]

    # Queue drained: the api exports no series at all, and the HPA must see 0, not an
    # error (it then keeps minReplicas).
    dbm.primary(migrated_db)[dbm.JOBS].delete_many({"state": "queued"})
    series = stored()
    assert not [s for s in series if s[0]["__name__"] == METRIC]
    result = evaluate(query, series)
    assert [value for _, value in result] == [0.0]
    assert hpa_replicas(docs, [0.0]) == docs["HorizontalPodAutoscaler"][0]["spec"][
        "minReplicas"]


def test_keda_query_is_the_queues_partial_index_and_counts_the_queued_jobs(
        jenv, migrated_db) -> None:
    scaled = render(BASE)["ScaledObject"][0]
    meta = scaled["spec"]["triggers"][0]["metadata"]
    query = json.loads(meta["query"])
    assert meta["collection"] == dbm.JOBS
    indexes = dbm.primary(migrated_db)[dbm.JOBS].index_information()
    partial = {name: info.get("partialFilterExpression") for name, info in indexes.items()}
    assert partial["queued_run_after"] == query  # served from the queue's own index
    depth = enqueue_mix(migrated_db)
    jobs.enqueue(migrated_db, "test.noop", {}, publish=False, dedupe_key="once")
    dbm.primary(migrated_db)[dbm.JOBS].update_one({"dedupe_key": "once"},
                                                  {"$set": {"state": "running"}})
    assert dbm.primary(migrated_db)[dbm.JOBS].count_documents(query) == depth
    assert jobs.queue_depth(migrated_db)["queued"] == depth
