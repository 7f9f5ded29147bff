"""Attacks and faults on the kubernetes backend as deployed: the real service (its own
process, under the Role of deploy/kubernetes/rbac.yaml) on the fake cluster, driven with
the real CLI and client, each test checking that nothing of it is left behind.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import wait_for
from tests.kube.conftest import running_fake_cluster
from tests.kube_fixtures import ROOT, end_kube_service

pytest_plugins = ["tests.kube_fixtures"]

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def fake_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """One fake cluster for this module, answering 403 to what the service's Role forbids."""
    rbac = ROOT / "deploy" / "kubernetes" / "rbac.yaml"
    with running_fake_cluster(tmp_path_factory.mktemp("attack-cluster"), rbac=rbac) as cluster:
        yield cluster


def selects(policy: dict, pod: dict) -> bool:
    """Does the NetworkPolicy's podSelector select the pod (as the API server decides)?"""
    selector = policy["spec"]["podSelector"]
    labels = pod["metadata"].get("labels", {})
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expression in selector.get("matchExpressions") or []:
        if expression["operator"] != "Exists" or expression["key"] not in labels:
            return False
    return True


def policies_of(cluster, pod: dict) -> set[tuple[str, ...]]:
    """The policyTypes of every NetworkPolicy that selects the pod."""
    return {
        tuple(p["spec"]["policyTypes"])
        for p in cluster.objects("networkpolicies", cluster.namespace)
        if selects(p, pod)
    }


def create(service, *args: str) -> str:
    """A new sandbox of the service, made with the CLI; its id."""
    done = service.cli("create", "--timeout", "5m", *args, check=False)
    assert done.returncode == 0, f"create failed: {done.stderr}\n{service.log()[-3000:]}"
    return done.stdout.strip()


def test_second_instance_in_the_namespace_gets_its_own_policies_and_agent_code(
    make_kube_service, fake_cluster, tmp_path: Path
) -> None:
    first = make_kube_service()
    second = make_kube_service()
    sandbox = create(second)
    # Its pod is fenced like the first instance's: no egress, ingress from the service only.
    assert policies_of(fake_cluster, second.pod(sandbox)) == {("Ingress",), ("Egress",)}

    # Uninstalling the first instance (stop it, delete its anchor) leaves the second whole.
    end_kube_service(first)
    anchor = f"jupyter-sandbox-{first.instance}"
    fake_cluster.delete("configmaps", anchor)

    def owned_by_first() -> list[str]:
        return [
            f"{kind}/{o['metadata']['name']}"
            for kind in ("configmaps", "networkpolicies")
            for o in fake_cluster.objects(kind, fake_cluster.namespace)
            if any(r["name"] == anchor for r in o["metadata"].get("ownerReferences") or [])
            or o["metadata"]["name"] == anchor
        ]

    wait_for(lambda: not owned_by_first(), 20, message="the first instance's objects to go")
    again = create(second)
    assert policies_of(fake_cluster, second.pod(again)) == {("Ingress",), ("Egress",)}
    assert second.cli("exec", again, "true").returncode == 0
