"""Render the Helm chart with Helm's own Go SDK (helm-python-sdk) and inspect it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helm_python
import yaml

CHART = Path(__file__).resolve().parents[2] / "helm"
RELEASE = "rel"
NAMESPACE = "certs"
BASE: dict[str, Any] = {
    "mongo": {"uri": "mongodb://m0,m1,m2/certautopilot?replicaSet=rs0&w=majority"},
    "kek": {"existingSecret": "cap-kek"},
}

Doc = dict[str, Any]


def render_files(values: dict[str, Any]) -> dict[str, str]:
    """{template path: rendered text}, NOTES.txt included."""
    rendered: dict[str, str] = helm_python.Chart.load(str(CHART)).render(
        values=values, name=RELEASE, namespace=NAMESPACE)
    return rendered


def render_list(values: dict[str, Any]) -> list[Doc]:
    return [doc for path, text in render_files(values).items() if not path.endswith(".txt")
            for doc in yaml.safe_load_all(text) if doc]


def notes(values: dict[str, Any]) -> str:
    return next(text for path, text in render_files(values).items()
                if path.endswith("/NOTES.txt"))


def render(values: dict[str, Any]) -> dict[str, list[Doc]]:
    docs: dict[str, list[Doc]] = {}
    for doc in render_list(values):
        docs.setdefault(doc["kind"], []).append(doc)
    return docs


def by_component(docs: list[Doc], component: str) -> Doc:
    return next(d for d in docs
                if d["metadata"]["labels"].get("app.kubernetes.io/component") == component)


def container(doc: Doc) -> Doc:
    return dict(pod_spec(doc)["containers"][0])


def pod_spec(doc: Doc) -> Doc:
    spec: Doc = doc["spec"]
    if doc["kind"] == "Pod":
        return spec
    return dict(spec["template"]["spec"])


# ------------------------------------------------------------------ hook ordering rule

POD_KINDS = {"Pod", "Job", "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"}


def hook_events(doc: Doc) -> set[str]:
    value = (doc["metadata"].get("annotations") or {}).get("helm.sh/hook", "")
    return {e.strip() for e in value.split(",") if e.strip()}


def hook_weight(doc: Doc) -> int:
    return int((doc["metadata"].get("annotations") or {}).get("helm.sh/hook-weight", "0"))


def references(doc: Doc) -> set[tuple[str, str]]:
    """(kind, name) of every ServiceAccount, Secret and ConfigMap a pod spec needs."""
    spec = pod_spec(doc)
    refs = {("ServiceAccount", spec.get("serviceAccountName") or "default")}
    refs |= {("Secret", s["name"]) for s in spec.get("imagePullSecrets") or []}
    for volume in spec.get("volumes") or []:
        if "secret" in volume:
            refs.add(("Secret", volume["secret"]["secretName"]))
        if "configMap" in volume:
            refs.add(("ConfigMap", volume["configMap"]["name"]))
        for source in (volume.get("projected") or {}).get("sources") or []:
            if "secret" in source:
                refs.add(("Secret", source["secret"]["name"]))
            if "configMap" in source:
                refs.add(("ConfigMap", source["configMap"]["name"]))
    for box in [*spec.get("containers", []), *spec.get("initContainers", [])]:
        for env in box.get("env") or []:
            source = env.get("valueFrom") or {}
            if "secretKeyRef" in source:
                refs.add(("Secret", source["secretKeyRef"]["name"]))
            if "configMapKeyRef" in source:
                refs.add(("ConfigMap", source["configMapKeyRef"]["name"]))
        for env_from in box.get("envFrom") or []:
            if "secretRef" in env_from:
                refs.add(("Secret", env_from["secretRef"]["name"]))
            if "configMapRef" in env_from:
                refs.add(("ConfigMap", env_from["configMapRef"]["name"]))
    return refs


def preexisting(values: dict[str, Any]) -> set[tuple[str, str]]:
    """What exists before the install by the values (the operator made it) or always."""
    out = {("ServiceAccount", "default")}
    mongo, kek = values.get("mongo", {}), values.get("kek", {})
    if mongo.get("existingSecret"):
        out.add(("Secret", mongo["existingSecret"]))
    if kek.get("existingSecret"):
        out.add(("Secret", kek["existingSecret"]))
    out |= {("Secret", s["name"]) for s in values.get("imagePullSecrets") or []}
    account = values.get("serviceAccount", {})
    if account.get("create") is False and account.get("name"):
        out.add(("ServiceAccount", account["name"]))
    return out


def hook_violations(docs: list[Doc], values: dict[str, Any]) -> list[str]:
    """Every object a hook's pods reference must be a hook itself, of every event the
    referencing hook runs at, with a lower weight (Helm creates it first), or exist
    before the install by the values. Ordinary resources of the release do not count:
    Helm creates them only after the pre-install hooks succeeded."""
    problems = []
    hooks = [d for d in docs if hook_events(d)]
    existing = preexisting(values)
    for hook in hooks:
        if hook["kind"] not in POD_KINDS:
            continue
        for kind, name in sorted(references(hook)):
            if (kind, name) in existing:
                continue
            ok = any(d["kind"] == kind and d["metadata"]["name"] == name
                     and hook_events(hook) <= hook_events(d)
                     and hook_weight(d) < hook_weight(hook) for d in hooks)
            if not ok:
                problems.append(f"{hook['kind']} {hook['metadata']['name']} needs {kind} "
                                f"{name}, which is neither an earlier hook nor pre-existing")
    return problems
