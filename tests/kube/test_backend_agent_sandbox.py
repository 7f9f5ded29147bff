"""The kubernetes backend in agent-sandbox mode (JUPYTER_SANDBOX_K8S_MODE=agent-sandbox),
through the real service and client, on the fake cluster.

The agent-sandbox controller cannot run here: `controller` below stands in for the part
of it the backend relies on, and nothing more. For every agents.x-k8s.io Sandbox it
makes the pod of its podTemplate, named as the Sandbox and owned by it (so the fake's
garbage collector deletes the pod with it), and makes it again when it is deleted while
its Sandbox stays. The API server, kubelet and the agent in each pod are as elsewhere.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
import yaml

from jupyter_sandbox import Sandbox
from tests.conftest import wait_for
from tests.kube.conftest import FakeCluster, running_fake_cluster

if TYPE_CHECKING:
    from tests.kube_fixtures import KubeService

pytest_plugins = ["tests.kube_fixtures"]
pytestmark = pytest.mark.timeout(120)
RBAC = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes" / "rbac.yaml"
SANDBOXES = "/apis/agents.x-k8s.io/v1beta1/namespaces/{ns}/sandboxes"
PODS = "/api/v1/namespaces/{ns}/pods"


@pytest.fixture(scope="module")
def fake_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeCluster]:
    with running_fake_cluster(tmp_path_factory.mktemp("fake-cluster"), rbac=RBAC) as cluster:
        yield cluster


@pytest.fixture
def controller(fake_cluster: FakeCluster) -> Iterator[None]:
    """A stand-in for the agent-sandbox controller (see the module docstring)."""
    config = yaml.safe_load(Path(fake_cluster.kubeconfig).read_text())
    base = config["clusters"][0]["cluster"]["server"]
    token = config["users"][0]["user"]["token"]
    stop = threading.Event()

    def reconcile(client: httpx.Client) -> None:
        ns = fake_cluster.namespace
        sandboxes = client.get(SANDBOXES.format(ns=ns)).json().get("items", [])
        pods = {p["metadata"]["name"] for p in client.get(PODS.format(ns=ns)).json()["items"]}
        for sandbox in sandboxes:
            meta = sandbox["metadata"]
            if meta["name"] in pods or meta.get("deletionTimestamp"):
                continue
            template = sandbox["spec"]["podTemplate"]
            owner = {
                "apiVersion": "agents.x-k8s.io/v1beta1",
                "kind": "Sandbox",
                "name": meta["name"],
                "uid": meta["uid"],
                "controller": True,
            }
            pod = {
                "metadata": {
                    "name": meta["name"],
                    "labels": template["metadata"]["labels"],
                    "ownerReferences": [owner],
                },
                "spec": template["spec"],
            }
            client.post(PODS.format(ns=ns), json=pod)

    def run() -> None:
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}) as client:
            while not stop.wait(0.05):
                try:
                    reconcile(client)
                except httpx.HTTPError:
                    continue

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield
    stop.set()
    thread.join(10)


def test_sandboxes_run_as_agent_sandbox_resources(make_kube_service, controller):
    service: KubeService = make_kube_service(JUPYTER_SANDBOX_K8S_MODE="agent-sandbox")
    sb = Sandbox.create(timeout="2m")
    [resource] = service.of_sandbox("sandboxes", sb.id)
    name = f"jsb-{sb.id}-0"
    assert resource["metadata"]["name"] == name
    assert resource["metadata"]["ownerReferences"][0]["name"].startswith("jupyter-sandbox-")
    template = resource["spec"]["podTemplate"]["spec"]
    assert template["automountServiceAccountToken"] is False
    assert template["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert service.pod(sb.id)["metadata"]["ownerReferences"][0]["kind"] == "Sandbox"
    assert sb.sh("echo in the pod of a Sandbox").stdout == "in the pod of a Sandbox\n"
    sb.fs.write_text("a.txt", "x")
    # The controller replaces a deleted pod; the processes are gone all the same.
    service.cluster.delete("pods", name)
    wait_for(lambda: sb.info().status == "failed", 20, message="the sandbox to fail")
    failure = sb.info().failure
    assert "replaced by its controller" in failure or "deleted behind" in failure, failure
    sb.restart()
    assert sb.sh("echo again").stdout == "again\n"
    assert [r["metadata"]["name"] for r in service.of_sandbox("sandboxes", sb.id)] == [
        f"jsb-{sb.id}-1"
    ]
    sb.kill()
    wait_for(lambda: not service.of_sandbox("sandboxes", sb.id), 20, message="the Sandbox to go")
