"""The Helm chart, rendered and linted with Helm's own Go SDK (helm-python-sdk), and every
manifest validated against the Kubernetes schemas offline (kubernetes-validate)."""

import json
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml

from tests.helpers.chart import (
    BASE,
    CHART,
    by_component,
    container,
    hook_events,
    hook_violations,
    notes,
    pod_spec,
    render,
    render_list,
)

pytestmark = pytest.mark.unit

EXISTING = {"mongo": {"existingSecret": "cap-mongo", "existingSecretKey": "uri"},
            "kek": {"existingSecret": "cap-kek"}}
HPA = {**BASE, "worker": {"autoscaling": {"mode": "hpa"}},
       "metrics": {"serviceMonitor": {"enabled": True}}}
# Every switch of the chart on at least once.
VARIANTS = {
    "default": BASE,
    "existing-secret": EXISTING,
    "hpa-servicemonitor": HPA,
    "full": {**EXISTING,
             "imagePullSecrets": [{"name": "registry"}],
             "api": {"hpa": {"enabled": True}, "ingress": {
                 "enabled": True, "hosts": ["certs.example.com"], "dashboard": True,
                 "tls": [{"secretName": "certs-tls", "hosts": ["certs.example.com"]}]}},
             "worker": {"autoscaling": {"mode": "hpa"}},
             "metrics": {"serviceMonitor": {"enabled": True}},
             "networkPolicy": {"enabled": True},
             "serviceAccount": {"create": False, "name": "cap"},
             "topologySpread": {"whenUnsatisfiable": "ScheduleAnyway"},
             "hostAntiAffinity": "required"},
    "fixed-workers": {**BASE, "worker": {"autoscaling": {"mode": "none"}, "metricsPort": 0},
                      "metrics": {"podAnnotations": False}, "networkPolicy": {"enabled": True},
                      "topologySpread": {"enabled": False}, "hostAntiAffinity": "none"},
}
# Custom resources the offline Kubernetes schemas do not know; checked field by field below.
CRD_GROUPS = ("keda.sh/", "monitoring.coreos.com/")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_lint_is_clean_in_strict_mode(variant: str) -> None:
    result = helm_python.lint(str(CHART), values=VARIANTS[variant], strict=True)
    assert result["errors"] == [], result
    assert all(m["severity"] <= 1 for m in result["messages"]), result  # info at most


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_manifest_is_valid_kubernetes(variant: str) -> None:
    docs = render_list(VARIANTS[variant])
    checked = 0
    for doc in docs:
        if doc["apiVersion"].startswith(CRD_GROUPS):
            continue
        kubernetes_validate.validate(doc, "1.30.0", strict=True)
        checked += 1
    assert checked >= 10


# ------------------------------------------------------------------ first install


@pytest.mark.parametrize("variant", ["default", "existing-secret", "full"])
def test_every_object_a_hook_needs_exists_before_it(variant: str) -> None:
    values = VARIANTS[variant]
    docs = render_list(values)
    job = next(d for d in docs if d["kind"] == "Job")
    assert hook_events(job) == {"pre-install", "pre-upgrade"}
    assert hook_violations(docs, values) == []


def test_the_hook_rule_catches_a_job_on_the_releases_ordinary_objects() -> None:
    # The first-install hang of issue 14: the Job on the chart's own (non-hook) objects.
    docs = render_list(BASE)
    for doc in docs:
        if doc["kind"] in ("ServiceAccount", "Secret"):
            doc["metadata"].pop("annotations", None)
    problems = hook_violations(docs, BASE)
    assert any("ServiceAccount rel-certautopilot-migrate" in p for p in problems)
    assert any("Secret rel-certautopilot-migrate-mongo" in p for p in problems)


def test_the_migration_job_reads_the_existing_secret_and_makes_no_copy() -> None:
    docs = render_list(EXISTING)
    job = next(d for d in docs if d["kind"] == "Job")
    env = {e["name"]: e for e in container(job)["env"]}
    assert env["CAP_MONGO_URI"]["valueFrom"]["secretKeyRef"] == {"name": "cap-mongo",
                                                                 "key": "uri"}
    assert not [d for d in docs if d["kind"] == "Secret"]


def test_hook_copies_are_deleted_once_the_hooks_succeed() -> None:
    for doc in render_list(BASE):
        if hook_events(doc):
            policy = doc["metadata"]["annotations"]["helm.sh/hook-delete-policy"]
            assert "hook-succeeded" in policy and "before-hook-creation" in policy


# ------------------------------------------------------------------ roles


def test_roles_replicas_pdbs_and_commands_follow_the_availability_spec() -> None:
    docs = render(BASE)
    api = by_component(docs["Deployment"], "api")
    worker = by_component(docs["Deployment"], "worker")
    scheduler = by_component(docs["Deployment"], "scheduler")
    assert api["spec"]["replicas"] >= 3
    assert scheduler["spec"]["replicas"] == 2
    assert container(scheduler)["command"][:6] == [
        "celery", "-A", "tasks", "beat", "-S", "scheduler.MongoLeaseScheduler"]
    assert container(worker)["command"][:4] == ["celery", "-A", "tasks", "worker"]
    assert {p["spec"]["maxUnavailable"] for p in docs["PodDisruptionBudget"]} == {1}
    assert len(docs["PodDisruptionBudget"]) == 3


def test_every_role_has_probes() -> None:
    docs = render(BASE)
    api = container(by_component(docs["Deployment"], "api"))
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for role in ("worker", "scheduler"):
        box = container(by_component(docs["Deployment"], role))
        for kind in ("livenessProbe", "readinessProbe", "startupProbe"):
            probe = box[kind]
            assert probe["exec"]["command"][:3] == ["certautopilot", "probe", role], kind
            assert probe["timeoutSeconds"] >= 5
        # Liveness tolerates a longer database outage than readiness before a restart.
        assert box["livenessProbe"]["exec"]["command"][3:] == ["--max-age", "120"]
        # The state the probe reads lives on the container's writable /tmp.
        assert {"name": "tmp", "mountPath": "/tmp"} in box["volumeMounts"]


def test_migrations_run_as_a_pre_upgrade_hook_that_can_be_switched_off() -> None:
    job = render(BASE)["Job"][0]
    assert "pre-upgrade" in job["metadata"]["annotations"]["helm.sh/hook"]
    assert container(job)["command"] == ["certautopilot", "migrate"]
    off = render({**BASE, "migrations": {"enabled": False}})
    assert "Job" not in off
    assert all(not hook_events(d) for kind in off.values() for d in kind)


def test_config_change_rolls_the_pods() -> None:
    def checksum(uri: str) -> str:
        docs = render({**BASE, "mongo": {"uri": uri}})
        return by_component(docs["Deployment"], "api")["spec"]["template"]["metadata"][
            "annotations"]["checksum/config"]

    assert checksum("mongodb://a/x?replicaSet=rs0") != checksum("mongodb://b/x?replicaSet=rs0")


def test_kek_is_mounted_from_a_secret_and_never_in_the_database_uri() -> None:
    api = by_component(render(BASE)["Deployment"], "api")
    env = {e["name"]: e for e in container(api)["env"]}
    assert env["CAP_KEK_DIR"]["value"] == "/var/run/certautopilot/kek"
    assert "secretKeyRef" in env["CAP_MONGO_URI"]["valueFrom"]
    assert env["CAP_MONGO_DB"]["value"] == "certautopilot"


# ------------------------------------------------------------------ worker scaling


@pytest.mark.parametrize("variant", ["default", "existing-secret"])
def test_keda_scales_workers_on_the_queued_jobs_by_default(variant: str) -> None:
    docs = render(VARIANTS[variant])
    assert "HorizontalPodAutoscaler" not in docs
    worker = by_component(docs["Deployment"], "worker")
    assert "replicas" not in worker["spec"]  # KEDA's HPA owns it
    scaled = docs["ScaledObject"][0]
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["spec"]["scaleTargetRef"]["name"] == worker["metadata"]["name"]
    assert (scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]) == (2, 20)
    trigger = scaled["spec"]["triggers"][0]
    assert trigger["type"] == "mongodb"
    meta = trigger["metadata"]
    env = {e["name"]: e for e in container(worker)["env"]}
    assert meta["dbName"] == env["CAP_MONGO_DB"]["value"]
    assert meta["collection"] == "jobs"
    # The queue's partial index (m0002 queued_run_after); tests/e2e/test_chart_live.py
    # checks it against a migrated database.
    assert json.loads(meta["query"]) == {"state": "queued"}
    assert meta["queryValue"] == "20"
    # Credentials: the Secret the pods read, through a TriggerAuthentication.
    auth = docs["TriggerAuthentication"][0]
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    [ref] = auth["spec"]["secretTargetRef"]
    assert ref["parameter"] == "connectionString"
    pods_secret = env["CAP_MONGO_URI"]["valueFrom"]["secretKeyRef"]
    assert {"name": ref["name"], "key": ref["key"]} == pods_secret


def test_adapter_hpa_variant_reads_the_queue_depth_once_by_labels_the_series_carry() -> None:
    docs = render(HPA)
    assert "ScaledObject" not in docs and "TriggerAuthentication" not in docs
    worker = by_component(docs["Deployment"], "worker")
    assert "replicas" not in worker["spec"]
    hpa = docs["HorizontalPodAutoscaler"][0]
    assert hpa["spec"]["scaleTargetRef"]["name"] == worker["metadata"]["name"]
    metric = hpa["spec"]["metrics"][0]["external"]
    assert metric["metric"]["name"] == "certautopilot_jobs_queued"
    selector = metric["metric"]["selector"]["matchLabels"]
    assert selector == {"app_kubernetes_io_instance": "rel"}
    assert metric["target"] == {"type": "AverageValue", "averageValue": "20"}
    # The ServiceMonitor puts that label on the series (pod label, sanitised by Prometheus).
    monitor = docs["ServiceMonitor"][0]
    assert "app.kubernetes.io/instance" in monitor["spec"]["podTargetLabels"]
    assert monitor["spec"]["endpoints"][0]["port"] == "http"
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert docs["PodMonitor"][0]["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    rules = yaml.safe_load(docs["ConfigMap"][0]["data"]["config.yaml"])["externalRules"]
    [rule] = rules
    assert rule["name"]["as"] == "certautopilot_jobs_queued"
    assert rule["resources"]["overrides"]["namespace"] == {"resource": "namespace"}
    assert "sum by" not in rule["metricsQuery"]  # never summed over the api replicas


def test_api_pods_carry_scrape_annotations_unless_switched_off() -> None:
    api = by_component(render(HPA)["Deployment"], "api")["spec"]["template"]["metadata"]
    assert api["annotations"]["prometheus.io/scrape"] == "true"
    assert api["annotations"]["prometheus.io/port"] == "8000"
    assert api["labels"]["app.kubernetes.io/instance"] == "rel"
    off = render({**BASE, "metrics": {"podAnnotations": False}})
    for role in ("api", "worker"):
        meta = by_component(off["Deployment"], role)["spec"]["template"]["metadata"]
        assert "prometheus.io/scrape" not in meta["annotations"]
    assert "ServiceMonitor" not in render(BASE)


def test_fixed_worker_count_when_autoscaling_is_off() -> None:
    docs = render({**BASE, "worker": {"replicas": 5, "autoscaling": {"mode": "none"}}})
    assert by_component(docs["Deployment"], "worker")["spec"]["replicas"] == 5
    assert "ScaledObject" not in docs and "HorizontalPodAutoscaler" not in docs


def test_worker_pods_serve_their_metrics_on_a_named_port_unless_switched_off() -> None:
    worker = by_component(render(BASE)["Deployment"], "worker")["spec"]["template"]
    box = worker["spec"]["containers"][0]
    assert {"name": "CAP_WORKER_METRICS_PORT", "value": "9809"} in box["env"]
    assert box["ports"] == [{"name": "metrics", "containerPort": 9809}]
    assert worker["metadata"]["annotations"]["prometheus.io/port"] == "9809"
    off = by_component(render({**BASE, "worker": {"metricsPort": 0}})["Deployment"],
                       "worker")["spec"]["template"]
    assert "ports" not in off["spec"]["containers"][0]
    assert all(e["name"] != "CAP_WORKER_METRICS_PORT" for e in off["spec"]["containers"][0]["env"])


# ------------------------------------------------------------------ /metrics stays private

PUBLIC = {("/api", "Prefix"), ("/docs", "Prefix"), ("/openapi.json", "Exact"),
          ("/.well-known/acme-challenge/", "Prefix")}


def _routed(path: str, rules: list[tuple[str, str]]) -> bool:
    return any(path == p if kind == "Exact" else
               path == p.rstrip("/") or path.startswith(p.rstrip("/") + "/")
               for p, kind in rules)


@pytest.mark.parametrize("dashboard", [False, True])
def test_ingress_routes_only_the_public_paths(dashboard: bool) -> None:
    values = {**BASE, "api": {"ingress": {"enabled": True, "dashboard": dashboard,
                                          "hosts": ["a.example.com", "b.example.com"]}}}
    ingress = render(values)["Ingress"][0]
    assert [r["host"] for r in ingress["spec"]["rules"]] == ["a.example.com", "b.example.com"]
    for rule in ingress["spec"]["rules"]:
        paths = [(p["path"], p["pathType"]) for p in rule["http"]["paths"]]
        expected = PUBLIC | ({("/dashboard", "Prefix")} if dashboard else set())
        assert set(paths) == expected
        for private in ("/metrics", "/healthz", "/readyz", "/", "/metricsx"):
            assert not _routed(private, paths), private
        for public in ("/api/v1/certificates", "/.well-known/acme-challenge/tok",
                       "/openapi.json", "/docs"):
            assert _routed(public, paths), public


def test_network_policy_is_off_by_default_and_fences_every_role() -> None:
    assert "NetworkPolicy" not in render(BASE)
    docs = render({**BASE, "networkPolicy": {"enabled": True}})
    policies = {p["metadata"]["name"].removeprefix("rel-certautopilot-"): p["spec"]
                for p in docs["NetworkPolicy"]}
    assert set(policies) == {"egress", "api", "worker", "deny-ingress"}
    api = policies["api"]
    assert api["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "api"
    [rule] = api["ingress"]
    assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]
    selectors = [peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
                 for peer in rule["from"]]
    assert selectors == ["ingress-nginx", "monitoring"]
    [worker_rule] = policies["worker"]["ingress"]
    assert worker_rule["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    assert len(worker_rule["from"]) == 1
    deny = policies["deny-ingress"]
    assert deny["ingress"] == [] and deny["policyTypes"] == ["Ingress"]
    assert deny["podSelector"]["matchExpressions"][0]["values"] == ["scheduler", "migrations"]
    egress = policies["egress"]
    ports = {(p["port"], p["protocol"]) for rule in egress["egress"] for p in rule["ports"]}
    assert ports == {(53, "UDP"), (53, "TCP"), (27017, "TCP"), (443, "TCP")}
    quiet = render({**BASE, "worker": {"metricsPort": 0}, "networkPolicy": {"enabled": True}})
    worker = next(p for p in quiet["NetworkPolicy"] if p["metadata"]["name"].endswith("-worker"))
    assert worker["spec"]["ingress"] == []


def test_tls_alpn_responder_is_off_unless_a_port_is_set() -> None:
    docs = render(BASE)
    api = container(by_component(docs["Deployment"], "api"))
    assert all(e["name"] != "CAP_TLS_ALPN_PORT" for e in api["env"])
    assert [p["name"] for p in by_component(docs["Service"], "api")["spec"]["ports"]] == \
        ["http"]
    docs = render({**BASE, "api": {"tlsAlpnPort": 8443}, "networkPolicy": {"enabled": True}})
    api = container(by_component(docs["Deployment"], "api"))
    assert {"name": "CAP_TLS_ALPN_PORT", "value": "8443"} in api["env"]
    assert {"name": "tls-alpn", "containerPort": 8443} in api["ports"]
    assert {"name": "tls-alpn", "port": 443, "targetPort": "tls-alpn"} in \
        by_component(docs["Service"], "api")["spec"]["ports"]
    # the CA validates from the internet: the responder's port is open to any source
    policy = next(p for p in docs["NetworkPolicy"] if p["metadata"]["name"].endswith("-api"))
    assert {"ports": [{"port": "tls-alpn", "protocol": "TCP"}]} in policy["spec"]["ingress"]


def test_network_policy_egress_destinations_come_from_the_values() -> None:
    mongo = [{"ipBlock": {"cidr": "10.20.0.0/16"}}]
    extra = [{"ports": [{"port": 6514, "protocol": "TCP"}]}]
    docs = render({**BASE, "networkPolicy": {"enabled": True, "egress": {
        "mongo": {"to": mongo, "port": 27018}, "extra": extra}}})
    egress = next(p for p in docs["NetworkPolicy"] if p["metadata"]["name"].endswith("-egress"))
    rules = egress["spec"]["egress"]
    assert {"ports": [{"port": 27018, "protocol": "TCP"}], "to": mongo} in rules
    assert extra[0] in rules


# ------------------------------------------------------------------ zones and hosts


def _spread(docs: dict[str, list[dict[str, Any]]], role: str) -> dict[str, Any]:
    return pod_spec(by_component(docs["Deployment"], role))


def test_api_and_schedulers_never_crowd_one_zone() -> None:
    docs = render(BASE)
    for role, mode in (("api", "DoNotSchedule"), ("scheduler", "DoNotSchedule"),
                       ("worker", "ScheduleAnyway")):
        [constraint] = _spread(docs, role)["topologySpreadConstraints"]
        assert constraint["topologyKey"] == "topology.kubernetes.io/zone"
        assert constraint["whenUnsatisfiable"] == mode, role
        assert constraint["maxSkew"] == 1
        assert constraint["labelSelector"]["matchLabels"][
            "app.kubernetes.io/component"] == role
        anti = _spread(docs, role)["affinity"]["podAntiAffinity"]
        [term] = anti["preferredDuringSchedulingIgnoredDuringExecution"]
        assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"


def test_zone_and_host_rules_can_be_relaxed_or_hardened() -> None:
    relaxed = render({**BASE, "topologySpread": {"whenUnsatisfiable": "ScheduleAnyway"}})
    for role in ("api", "scheduler"):
        [constraint] = _spread(relaxed, role)["topologySpreadConstraints"]
        assert constraint["whenUnsatisfiable"] == "ScheduleAnyway"
    off = render({**BASE, "topologySpread": {"enabled": False}, "hostAntiAffinity": "none"})
    assert "topologySpreadConstraints" not in _spread(off, "api")
    assert "affinity" not in _spread(off, "api")
    assert "affinity" in _spread(off, "worker")  # workers keep the preferred form
    hard = render({**BASE, "hostAntiAffinity": "required"})
    for role in ("api", "scheduler"):
        [term] = _spread(hard, role)["affinity"]["podAntiAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"]
        assert term["topologyKey"] == "kubernetes.io/hostname"


# ------------------------------------------------------------------ values and schema


@pytest.mark.parametrize(("values", "message"), [
    ({"kek": {"existingSecret": "k"}}, "mongo.uri or mongo.existingSecret is required"),
    ({"mongo": BASE["mongo"]}, "kek.existingSecret or kek.command is required"),
    ({**BASE, "kek": {"existingSecret": "k", "command": "vault read"}}, "only one of"),
    ({**BASE, "worker": {"autoscaling": {"minReplicas": 5, "maxReplicas": 3}}},
     "worker.autoscaling.minReplicas must not exceed"),
])
def test_invalid_combinations_fail_with_a_clear_message(values, message) -> None:
    with pytest.raises(helm_python.HelmError) as info:
        render(values)
    assert message in str(info.value)


@pytest.mark.parametrize(("values", "path"), [
    ({"scheduler": {"replicas": "two"}}, "/scheduler/replicas"),
    ({"scheduler": {"replicas": 4}}, "/scheduler/replicas"),
    ({"api": {"port": 70000}}, "/api/port"),
    ({"api": {"replica": 3}}, "/api"),  # a typo is refused, not ignored
    ({"api": {"ingress": {"enabled": True}}}, "/api/ingress/hosts"),
    ({"api": {"livenessProbe": {"periodSeconds": 0, "httpGet": {"port": "http"}}}},
     "/api/livenessProbe/periodSeconds"),
    ({"worker": {"autoscaling": {"mode": "prometheus"}}}, "/worker/autoscaling/mode"),
    ({"worker": {"autoscaling": {"targetQueuedPerPod": 0}}},
     "/worker/autoscaling/targetQueuedPerPod"),
    ({"worker": {"readinessProbe": {"exec": {"command": []}}}},
     "/worker/readinessProbe/exec/command"),
    ({"worker": {"resources": {"requests": {"cpu": "lots"}}}}, "/worker/resources/requests/cpu"),
    ({"mongo": {"uri": "postgres://db"}}, "/mongo/uri"),
    ({"mongo": {"database": "cap.prod"}}, "/mongo/database"),
    ({"env": {"LOG_LEVEL": "DEBUG"}}, "/env"),
    ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    ({"metrics": {"serviceMonitor": {"interval": "often"}}}, "/metrics/serviceMonitor/interval"),
    ({"networkPolicy": {"egress": {"mongo": {"port": 0}}}}, "/networkPolicy/egress/mongo/port"),
    ({"topologySpread": {"whenUnsatisfiable": "Never"}}, "/topologySpread/whenUnsatisfiable"),
    ({"hostAntiAffinity": "always"}, "/hostAntiAffinity"),
    ({"worker": {"autoscaling": {"mode": "hpa"}}, "metrics": {"podAnnotations": False}},
     "/metrics/podAnnotations"),
])
def test_schema_refuses_bad_values_naming_the_value(values, path) -> None:
    merged = {**BASE, **values}
    with pytest.raises(helm_python.HelmError) as info:
        render(merged)
    message = str(info.value)
    assert "schema" in message
    assert f"'{path}'" in message, message


def _schema_node(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = schema["definitions"][node["$ref"].split("/")[-1]]
    return node


def _undescribed(schema: dict[str, Any], node: dict[str, Any], value: Any,
                 path: str) -> list[str]:
    node = _schema_node(schema, node)
    missing = []
    if "description" not in node and "type" not in node and "enum" not in node \
            and "oneOf" not in node:
        missing.append(path)
    if isinstance(value, dict) and "properties" in node:
        for key, item in value.items():
            if key not in node["properties"]:
                missing.append(f"{path}/{key}")
            else:
                missing += _undescribed(schema, node["properties"][key], item, f"{path}/{key}")
    return missing


def test_the_schema_describes_every_value() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert _undescribed(schema, schema, values, "") == []
    # Every described object refuses unknown keys, unless it is a free-form map.
    def closed(node: dict[str, Any], path: str) -> list[str]:
        node = _schema_node(schema, node)
        out = []
        if "properties" in node:
            if node.get("additionalProperties") is not False:
                out.append(path)
            for key, child in node["properties"].items():
                out += closed(child, f"{path}/{key}")
        return out

    assert closed(schema, "") == []


# ------------------------------------------------------------------ NOTES.txt


def test_notes_tell_the_first_token_and_dr_steps() -> None:
    text = notes(BASE)
    assert "exec deploy/rel-certautopilot-api -- certautopilot tokens create --admin" in text
    assert "certautopilot audit verify" in text and "certautopilot health" in text
    assert "KEK" in text and "Secret cap-kek" in text
    assert "port-forward svc/rel-certautopilot-api" in text
    assert "scaledobject rel-certautopilot-worker" in text
    public = notes({**HPA, "api": {"ingress": {"enabled": True, "hosts": ["c.example.com"]}}})
    assert "https://c.example.com/api/v1" in public and "/metrics stays inside" in public
    assert "external.metrics.k8s.io" in public


def test_metrics_certificate_series_reaches_every_role_and_is_validated() -> None:
    def series(values: dict[str, Any], component: str) -> str:
        pod = by_component(render(values)["Deployment"], component)["spec"]["template"]
        env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
        return str(env["CAP_METRICS_CERTIFICATE_SERIES"])

    assert series(BASE, "api") == "per-certificate"
    aggregate = {**BASE, "metrics": {"certificateSeries": "aggregate"}}
    # The api serves the snapshot the worker builds: both get the same switch.
    assert series(aggregate, "api") == series(aggregate, "worker") == "aggregate"
    with pytest.raises(helm_python.HelmError) as info:
        render({**BASE, "metrics": {"certificateSeries": "some"}})
    assert "certificateSeries" in str(info.value)
