"""The Helm chart, rendered and linted with Helm's own Go SDK (helm-python-sdk), and every
manifest validated against the Kubernetes schemas offline (kubernetes-validate)."""

from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml

CHART = Path(__file__).resolve().parents[2] / "helm"
BASE = {"mongo": {"uri": "mongodb://m0,m1,m2/certautopilot?replicaSet=rs0&w=majority"},
        "kek": {"existingSecret": "cap-kek"}}

pytestmark = pytest.mark.unit


def render(values: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    rendered = helm_python.Chart.load(str(CHART)).render(values=values, name="rel",
                                                          namespace="certs")
    docs: dict[str, list[dict[str, Any]]] = {}
    for text in rendered.values():
        for doc in yaml.safe_load_all(text):
            if doc:
                docs.setdefault(doc["kind"], []).append(doc)
    return docs


def by_component(docs: list[dict[str, Any]], component: str) -> dict[str, Any]:
    return next(d for d in docs
                if d["metadata"]["labels"].get("app.kubernetes.io/component") == component)


def test_lint_is_clean_in_strict_mode() -> None:
    result = helm_python.lint(str(CHART), values=BASE, strict=True)
    assert result["errors"] == [], result


def test_every_manifest_is_valid_kubernetes() -> None:
    values = {**BASE, "api": {"hpa": {"enabled": True}, "ingress": {"enabled": True,
              "hosts": ["certs.example.com"]}}, "worker": {"hpa": {"enabled": True}},
              "metricsAdapter": {"enabled": True}}
    for docs in render(values).values():
        for doc in docs:
            kubernetes_validate.validate(doc, "1.30.0", strict=True)


def test_roles_replicas_pdbs_and_commands_follow_the_availability_spec() -> None:
    docs = render(BASE)
    api = by_component(docs["Deployment"], "api")
    worker = by_component(docs["Deployment"], "worker")
    scheduler = by_component(docs["Deployment"], "scheduler")
    assert api["spec"]["replicas"] >= 3
    assert scheduler["spec"]["replicas"] == 2
    assert scheduler["spec"]["template"]["spec"]["containers"][0]["command"][:6] == [
        "celery", "-A", "tasks", "beat", "-S", "scheduler.MongoLeaseScheduler"]
    assert worker["spec"]["template"]["spec"]["containers"][0]["command"][:4] == [
        "celery", "-A", "tasks", "worker"]
    assert {p["spec"]["maxUnavailable"] for p in docs["PodDisruptionBudget"]} == {1}
    assert len(docs["PodDisruptionBudget"]) == 3
    probe = api["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    assert probe["httpGet"]["path"] == "/readyz"


def test_migrations_run_as_a_pre_upgrade_hook_that_can_be_switched_off() -> None:
    job = render(BASE)["Job"][0]
    assert "pre-upgrade" in job["metadata"]["annotations"]["helm.sh/hook"]
    assert job["spec"]["template"]["spec"]["containers"][0]["command"] == [
        "certautopilot", "migrate"]
    assert "Job" not in render({**BASE, "migrations": {"enabled": False}})


def test_config_change_rolls_the_pods() -> None:
    def checksum(uri: str) -> str:
        docs = render({**BASE, "mongo": {"uri": uri}})
        return by_component(docs["Deployment"], "api")["spec"]["template"]["metadata"][
            "annotations"]["checksum/config"]

    assert checksum("mongodb://a/x?replicaSet=rs0") != checksum("mongodb://b/x?replicaSet=rs0")


def test_kek_is_mounted_from_a_secret_and_never_in_the_database_uri() -> None:
    api = by_component(render(BASE)["Deployment"], "api")
    env = {e["name"]: e for e in api["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["CAP_KEK_DIR"]["value"] == "/var/run/certautopilot/kek"
    assert "secretKeyRef" in env["CAP_MONGO_URI"]["valueFrom"]


def test_worker_hpa_scales_on_queue_depth() -> None:
    docs = render({**BASE, "worker": {"hpa": {"enabled": True}}})
    hpa = docs["HorizontalPodAutoscaler"][0]
    assert hpa["spec"]["metrics"][0]["external"]["metric"]["name"] == "certautopilot_jobs_queued"
    assert "replicas" not in by_component(docs["Deployment"], "worker")["spec"]


@pytest.mark.parametrize(("values", "message"), [
    ({"kek": {"existingSecret": "k"}}, "mongo.uri or mongo.existingSecret is required"),
    ({"mongo": BASE["mongo"]}, "kek.existingSecret or kek.command is required"),
    ({**BASE, "kek": {"existingSecret": "k", "command": "vault read"}}, "only one of"),
])
def test_invalid_combinations_fail_with_a_clear_message(values, message) -> None:
    with pytest.raises(helm_python.HelmError) as info:
        render(values)
    assert message in str(info.value)


def test_schema_rejects_a_bad_value() -> None:
    with pytest.raises(helm_python.HelmError) as info:
        render({**BASE, "scheduler": {"replicas": "two"}})
    assert "replicas" in str(info.value)


def test_worker_pods_serve_their_metrics_on_a_named_port_unless_switched_off() -> None:
    worker = by_component(render(BASE)["Deployment"], "worker")["spec"]["template"]
    container = worker["spec"]["containers"][0]
    assert {"name": "CAP_WORKER_METRICS_PORT", "value": "9809"} in container["env"]
    assert container["ports"] == [{"name": "metrics", "containerPort": 9809}]
    assert worker["metadata"]["annotations"]["prometheus.io/port"] == "9809"
    off = by_component(render({**BASE, "worker": {"metricsPort": 0}})["Deployment"],
                       "worker")["spec"]["template"]
    assert "ports" not in off["spec"]["containers"][0]
    assert all(e["name"] != "CAP_WORKER_METRICS_PORT" for e in off["spec"]["containers"][0]["env"])


def test_tls_alpn_responder_is_off_unless_a_port_is_set() -> None:
    docs = render(BASE)
    api = by_component(docs["Deployment"], "api")["spec"]["template"]["spec"]["containers"][0]
    assert all(e["name"] != "CAP_TLS_ALPN_PORT" for e in api["env"])
    assert [p["name"] for p in by_component(docs["Service"], "api")["spec"]["ports"]] == \
        ["http"]
    docs = render({**BASE, "api": {"tlsAlpnPort": 8443}})
    api = by_component(docs["Deployment"], "api")["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "CAP_TLS_ALPN_PORT", "value": "8443"} in api["env"]
    assert {"name": "tls-alpn", "containerPort": 8443} in api["ports"]
    assert {"name": "tls-alpn", "port": 443, "targetPort": "tls-alpn"} in \
        by_component(docs["Service"], "api")["spec"]["ports"]
