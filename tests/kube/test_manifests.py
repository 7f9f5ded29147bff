"""The Kubernetes install under deploy/kubernetes, checked the way a reviewer would before
applying it: every file parses, kustomize renders the set, the Role grants exactly what
the backend needs in its own namespace and nothing cluster-wide.

No cluster runs here: these tests read the manifests and render them with `kubectl
kustomize` (which needs no API server). The fake API server (tests/kube/fake_api.py)
enforces the same rbac.yaml on the backend's real calls.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "kubernetes"
# Files in deploy/kubernetes that are not Kubernetes objects applied by kustomize.
NOT_APPLIED = {"kustomization.yaml", "z2jh-values.yaml"}

# Everything the service may do, per (API group, resource): the backend's pods, their
# Secrets, ConfigMaps, PVC homes and NetworkPolicies, and the optional agent-sandbox
# resources. A rule granting anything else, or another verb, fails the test.
ALLOWED = {
    ("", "pods"): {"get", "list", "watch", "create", "delete"},
    ("", "secrets"): {"get", "list", "create", "update", "patch", "delete"},
    ("", "configmaps"): {"get", "list", "create", "delete"},
    ("", "persistentvolumeclaims"): {"get", "list", "create", "delete"},
    ("networking.k8s.io", "networkpolicies"): {"get", "list", "create", "delete"},
    ("agents.x-k8s.io", "sandboxes"): {"get", "list", "watch", "create", "patch", "delete"},
    ("extensions.agents.x-k8s.io", "sandboxwarmpools"): {
        "get",
        "list",
        "watch",
        "create",
        "patch",
        "delete",
    },
}
# Kinds that reach beyond one namespace: none of them may be part of the install.
CLUSTER_KINDS = {
    "ClusterRole",
    "ClusterRoleBinding",
    "Namespace",
    "CustomResourceDefinition",
    "PersistentVolume",
    "StorageClass",
    "RuntimeClass",
    "PriorityClass",
    "MutatingWebhookConfiguration",
    "ValidatingWebhookConfiguration",
}


def load(name: str) -> list[dict[str, Any]]:
    """The YAML documents of deploy/kubernetes/`name`, empty ones left out."""
    text = (DEPLOY / name).read_text()
    return [doc for doc in yaml.safe_load_all(text) if doc is not None]


def kustomization() -> dict[str, Any]:
    (doc,) = load("kustomization.yaml")
    return doc


def applied() -> list[dict[str, Any]]:
    """The objects of every file the kustomization lists, as written."""
    return [doc for name in kustomization()["resources"] for doc in load(name)]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = (o for o in objects if o["kind"] == kind)
    return found


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    """What `kubectl kustomize deploy/kubernetes` outputs, parsed."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (Debian: apt-get install kubernetes-client)")
    done = subprocess.run(
        [kubectl, "kustomize", str(DEPLOY)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, f"kubectl kustomize failed:\n{done.stderr}"
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc is not None]


@pytest.mark.unprivileged
def test_every_yaml_file_parses_into_named_objects() -> None:
    files = sorted(DEPLOY.glob("*.yaml"))
    assert {f.name for f in files} >= {"kustomization.yaml", "rbac.yaml", "serviceaccount.yaml"}
    for path in files:
        docs = load(path.name)
        assert docs, f"{path.name} holds no YAML document"
        if path.name in NOT_APPLIED:
            continue
        for doc in docs:
            assert doc.get("apiVersion") and doc.get("kind"), f"{path.name}: {doc}"
            assert doc["metadata"].get("name"), f"{path.name}: a {doc['kind']} with no name"
            assert "namespace" not in doc["metadata"], (
                f"{path.name}: {doc['kind']} {doc['metadata']['name']} names a namespace; "
                "the kustomization sets it for every object"
            )


@pytest.mark.unprivileged
def test_kustomization_lists_every_manifest() -> None:
    manifests = {p.name for p in DEPLOY.glob("*.yaml")} - NOT_APPLIED
    listed = kustomization()["resources"]
    assert sorted(listed) == sorted(manifests)
    assert len(listed) == len(set(listed))


@pytest.mark.unprivileged
def test_kustomize_renders_every_object_into_the_namespace(rendered) -> None:
    namespace = kustomization()["namespace"]
    written = sorted((o["kind"], o["metadata"]["name"]) for o in applied())
    assert sorted((o["kind"], o["metadata"]["name"]) for o in rendered) == written
    for obj in rendered:
        assert obj["metadata"]["namespace"] == namespace, obj["metadata"]
    binding = one(rendered, "RoleBinding")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "jupyter-sandbox", "namespace": namespace}
    ]


@pytest.mark.unprivileged
def test_nothing_in_the_install_reaches_beyond_its_namespace(rendered) -> None:
    kinds = {o["kind"] for o in rendered}
    assert not kinds & CLUSTER_KINDS, f"cluster-scoped objects: {kinds & CLUSTER_KINDS}"
    role = one(rendered, "Role")
    binding = one(rendered, "RoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }


@pytest.mark.unprivileged
def test_role_grants_exactly_what_the_backend_needs() -> None:
    role = one(applied(), "Role")
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert set(rule) <= {"apiGroups", "resources", "verbs"}, (
            f"a rule with {sorted(set(rule) - {'apiGroups', 'resources', 'verbs'})}: {rule}"
        )
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[field], f"a wildcard in {field}: {rule}"
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    for key, verbs in granted.items():
        assert key in ALLOWED, f"the Role grants {key}, which the backend does not use"
        assert verbs <= ALLOWED[key], f"{key}: more verbs than needed: {verbs - ALLOWED[key]}"
    assert set(granted) == set(ALLOWED), f"missing from the Role: {set(ALLOWED) - set(granted)}"
    # No way into a running pod through the API server: the agent has its own channel.
    assert not {r for _, r in granted} & {"pods/exec", "pods/attach", "pods/portforward"}
