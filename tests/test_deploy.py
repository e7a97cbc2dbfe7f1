"""The Kubernetes example (deploy/k8s/) validates offline, and says what the docs say it does.

The core kinds (the Deployment) are checked by kubernetes-validate against the Kubernetes
OpenAPI schemas it ships, strictly (unknown fields are errors). KEDA's kinds are custom
resources: they are checked with jsonschema against the openAPIV3Schema of KEDA's own CRDs,
vendored in deploy/k8s/crds/, closed the way ``kubectl apply --validate=strict`` closes them (an
object with declared properties takes no others unless it preserves unknown fields).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
K8S_VERSION = "1.33.0"  # a release current managed clusters run; kubernetes-validate ships it


def documents(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def manifests() -> list[dict[str, Any]]:
    return [d for path in sorted(K8S.glob("*.yaml")) for d in documents(path.name)]


def _closed(schema: Any) -> Any:
    """A copy of ``schema`` in which every object that declares properties takes no others."""
    if isinstance(schema, dict):
        out = {k: _closed(v) for k, v in schema.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_closed(v) for v in schema]
    return schema


def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> the served version's schema, from every vendored CRD."""
    out = {}
    for path in sorted((K8S / "crds").glob("*.yaml")):
        (crd,) = documents(f"crds/{path.name}")
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version["served"]:
                out[(f"{group}/{version['name']}", kind)] = _closed(
                    version["schema"]["openAPIV3Schema"])
    return out


def validate(doc: dict[str, Any]) -> None:
    """Raise if ``doc`` is not a valid object of its kind (offline)."""
    schema = crd_schemas().get((doc["apiVersion"], doc["kind"]))
    if schema is not None:
        jsonschema.validate(doc, schema)
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def by_kind(kind: str) -> dict[str, Any]:
    (doc,) = [d for d in manifests() if d["kind"] == kind]
    return doc


def test_the_manifests_are_the_kinds_the_docs_describe() -> None:
    assert sorted(d["kind"] for d in manifests()) == ["Deployment", "ScaledObject",
                                                      "TriggerAuthentication"]
    assert set(crd_schemas()) == {("keda.sh/v1alpha1", "ScaledObject"),
                                  ("keda.sh/v1alpha1", "TriggerAuthentication")}


@pytest.mark.parametrize("doc", manifests(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_every_manifest_validates_offline(doc: dict[str, Any]) -> None:
    validate(doc)


@pytest.mark.parametrize("kind,path,bad", [
    ("Deployment", ("spec", "replicas"), "one"),                    # wrong type
    ("Deployment", ("spec", "template", "spec", "gpus"), 1),          # unknown field
    ("ScaledObject", ("spec", "maxReplicaCount"), "4"),              # wrong type
    ("ScaledObject", ("spec", "minReplicas"), 1),                    # unknown field (a typo)
    ("ScaledObject", ("spec", "scaleTargetRef"), None),              # a required field removed
    ("TriggerAuthentication", ("spec", "secretTargetRef", 0, "key"), None),
])
def test_a_broken_manifest_fails_validation(kind: str, path: tuple, bad: Any) -> None:
    """The checks can fail: each of these mistakes is refused by the same validation."""
    doc = copy.deepcopy(by_kind(kind))
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if bad is None:
        del parent[path[-1]]
    else:
        parent[path[-1]] = bad
    with pytest.raises((jsonschema.ValidationError, kubernetes_validate.ValidationError)):
        validate(doc)


def _arg(args: list[str], flag: str) -> str:
    for i, arg in enumerate(args):
        if arg == flag:
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{flag} not in {args}")


def test_keda_scales_the_worker_on_its_own_queue() -> None:
    deployment, scaled = by_kind("Deployment"), by_kind("ScaledObject")
    auth = by_kind("TriggerAuthentication")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "redis"
    meta = trigger["metadata"]
    # The queue the worker consumes, on the database the entrypoint puts the broker on (0).
    assert meta["listName"] == _arg(container["args"], "-Q")
    assert meta["databaseIndex"] == "0" and env["BROKER"]["value"] == "redis"
    assert meta["address"] == env["REDIS_ADDRESS"]["value"]
    assert int(meta["listLength"]) >= int(env["EXAMPLE_EMBED_BATCH_SIZE"]["value"])
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    (ref,) = auth["spec"]["secretTargetRef"]
    secret = env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert (ref["parameter"], ref["name"], ref["key"]) == ("password", secret["name"], secret["key"])
    assert 1 <= scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"]


def test_the_worker_owns_one_gpu_and_is_never_killed_mid_batch() -> None:
    pod = by_kind("Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert _arg(container["args"], "-c") == "1"
    time_limit = int(_arg(container["args"], "--time-limit"))
    # A warm shutdown finishes the running batch: the grace period must outlast one.
    assert pod["terminationGracePeriodSeconds"] > time_limit
    assert pod["securityContext"]["runAsUser"] == 10001  # the image's unprivileged user
