"""A real sandbox service on the kubernetes backend, against the fake cluster.

`kube_service_env` (function scope) starts ``jupyter-sandbox serve --no-supervisor`` (the
cluster's Deployment is what restarts a service there) as its own process
with JUPYTER_SANDBOX_BACKEND=kubernetes and the fake cluster's KUBECONFIG, with an
instance of its own (so tests never see each other's objects), and points this
process's client at it. `KubeService` can kill and restart that process and read the
fake cluster's objects of its instance. At the end it kills what sandboxes are left
and checks that nothing of the instance is left: no pod, Secret or PVC in the
cluster, no pod process on this host, no sandbox directory.

`start_kube_service(cluster, base, **env)` is the same without the fixture, for a
module or session scoped service.

Tests outside tests/kube get `fake_cluster` from here (one per session, under the
service's Role); inside tests/kube, tests/kube/conftest.py's own (one per module) wins.
Use it with ``pytest_plugins = ["tests.kube_fixtures"]``.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import sandbox_cli, stop_process, storage_parent, wait_for

ROOT = Path(__file__).resolve().parent.parent
INSTANCE_LABEL = "jupyter-sandbox.io/instance"
SANDBOX_LABEL = "jupyter-sandbox.io/sandbox"
PER_SANDBOX = ("pods", "secrets", "persistentvolumeclaims", "sandboxes")


class KubeService:
    """One service process on the kubernetes backend, and the cluster it uses."""

    def __init__(self, cluster: Any, base: Path, extra: dict[str, str]) -> None:
        self.cluster = cluster
        self.base = base
        self.instance = "t" + secrets.token_hex(4)
        self.storage = base / "storage"
        self.storage.mkdir(parents=True, exist_ok=True)
        self.env = {
            "JUPYTER_RUNTIME_DIR": str(base / "rt"),
            "JUPYTER_DATA_DIR": str(base / "data"),
            "JUPYTER_SANDBOX_DIR": str(self.storage),
            "JUPYTER_SANDBOX_BACKEND": "kubernetes",
            "KUBECONFIG": str(cluster.kubeconfig),
            "JUPYTER_SANDBOX_K8S_NAMESPACE": cluster.namespace,
            "JUPYTER_SANDBOX_K8S_INSTANCE": self.instance,
            "JUPYTER_SANDBOX_K8S_START_TIMEOUT": "20",
            "JUPYTER_SANDBOX_POOL": "0",
            # Requests equal limits: the fake node (as a real one) schedules by them.
            "JUPYTER_SANDBOX_DEFAULT_CPUS": "0.25",
            "JUPYTER_SANDBOX_LEASE_TTL": "4",
            # The instance's Lease: a restart after a SIGKILL waits up to this for it.
            "JUPYTER_SANDBOX_K8S_LEASE_SECONDS": "3",
            "JUPYTER_SANDBOX_IDLE_TIMEOUT": "120",
            "JUPYTER_SANDBOX_SSH_PORT": "0",
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
            ),
            **extra,
        }
        self.proc: subprocess.Popen | None = None
        self.seen_pods: set[str] = set()

    @property
    def runtime_file(self) -> Path:
        return Path(self.env["JUPYTER_RUNTIME_DIR"]) / "jupyter-sandbox.json"

    @property
    def log_file(self) -> Path:
        return self.base / "service.out"

    def start(self) -> None:
        """Start the service and wait until it answers (its runtime file names it)."""
        self.runtime_file.unlink(missing_ok=True)
        with open(self.log_file, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "jupyter_sandbox", "serve", "--no-supervisor"],
                env={**os.environ, **self.env},
                stdout=out,
                stderr=out,
                cwd=ROOT,
            )
        wait_for(
            lambda: self.runtime_file.exists() or self.proc.poll() is not None,
            60,
            message="the service to start",
        )
        if self.proc.poll() is not None:
            raise AssertionError(f"the service exited at start:\n{self.log()}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to the service and wait for it to exit."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(30)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 30)
            self.proc = None

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def cli(
        self, *args: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess:
        return sandbox_cli(self.env, *args, check=check, timeout=timeout)

    # -- the cluster, as far as this instance goes --------------------------------------

    def objects(self, kind: str) -> list[dict]:
        """The fake cluster's objects of `kind` (a resource name) of this instance."""
        found = [
            o
            for o in self.cluster.objects(kind, self.cluster.namespace)
            if o["metadata"].get("labels", {}).get(INSTANCE_LABEL) == self.instance
        ]
        if kind == "pods":
            self.seen_pods |= {o["metadata"]["name"] for o in found}
        return found

    def of_sandbox(self, kind: str, sandbox_id: str) -> list[dict]:
        return [
            o
            for o in self.objects(kind)
            if o["metadata"]["labels"].get(SANDBOX_LABEL) == sandbox_id
        ]

    def pod(self, sandbox_id: str) -> dict:
        """The one pod of a sandbox that is not being deleted."""
        pods = [
            p
            for p in self.of_sandbox("pods", sandbox_id)
            if not p["metadata"].get("deletionTimestamp")
        ]
        assert len(pods) == 1, f"pods of {sandbox_id}: {[p['metadata']['name'] for p in pods]}"
        return pods[0]

    def secret_key(self, sandbox_id: str, key: str) -> bytes | None:
        """One key of the sandbox's Secret, decoded."""
        [secret] = self.of_sandbox("secrets", sandbox_id)
        value = secret.get("data", {}).get(key)
        return None if value is None else base64.b64decode(value)

    def record(self, sandbox_id: str) -> dict:
        """The record the sandbox's Secret holds."""
        return json.loads(self.secret_key(sandbox_id, "record"))

    def leftovers_of(self, sandbox_id: str) -> list[str]:
        """`resource/name` of every object of one sandbox."""
        return [
            f"{kind}/{o['metadata']['name']}"
            for kind in PER_SANDBOX
            for o in self.of_sandbox(kind, sandbox_id)
        ]

    def sandbox_ids(self) -> set[str]:
        """The sandboxes that have any object in the cluster."""
        return {
            o["metadata"]["labels"][SANDBOX_LABEL]
            for kind in PER_SANDBOX
            for o in self.objects(kind)
            if SANDBOX_LABEL in o["metadata"]["labels"]
        }

    def create_object(self, resource: str, body: dict) -> dict:
        """Create an object through the fake's API, as another client of it would."""
        return self._api("POST", resource, "", json=body)

    def patch_object(self, resource: str, name: str, patch: dict) -> dict:
        """Merge-patch an object through the fake's API (someone else's edit)."""
        headers = {"Content-Type": "application/merge-patch+json"}
        return self._api("PATCH", resource, name, content=json.dumps(patch), headers=headers)

    def replace_object(self, resource: str, body: dict) -> dict:
        """Replace an object through the fake's API (someone else's write)."""
        return self._api("PUT", resource, body["metadata"]["name"], json=body)

    def _api(self, method: str, resource: str, name: str, headers=None, **kwargs) -> dict:
        from jupyter_sandbox.backends.kubernetes.api import PREFIXES

        config = yaml.safe_load(Path(self.cluster.kubeconfig).read_text())
        server = config["clusters"][0]["cluster"]["server"] + PREFIXES.get(resource, "/api/v1")
        token = config["users"][0]["user"]["token"]
        answer = httpx.request(
            method,
            f"{server}/namespaces/{self.cluster.namespace}/{resource}/{name}".rstrip("/"),
            headers={"Authorization": f"Bearer {token}", **(headers or {})},
            timeout=10,
            **kwargs,
        )
        answer.raise_for_status()
        return answer.json()

    def leftover_labels(self, sandbox_id: str) -> dict[str, str]:
        return {
            "app.kubernetes.io/managed-by": "jupyter-sandbox",
            INSTANCE_LABEL: self.instance,
            SANDBOX_LABEL: sandbox_id,
        }

    def leftover_secret(self, sandbox_id: str) -> dict:
        """A sandbox Secret as a start killed before its record leaves it (no record)."""
        labels = self.leftover_labels(sandbox_id)
        return {"metadata": {"name": f"jsb-{sandbox_id}", "labels": labels}, "data": {}}

    def leftover_pod(self, sandbox_id: str) -> dict:
        """A sandbox's pod whose start no record tells of."""
        container = {"name": "agent", "image": "python:3.12-slim", "command": ["sleep", "600"]}
        return {
            "metadata": {"name": f"jsb-{sandbox_id}-0", "labels": self.leftover_labels(sandbox_id)},
            "spec": {"restartPolicy": "Never", "containers": [container]},
        }

    def leftovers(self) -> dict[str, list[str]]:
        """Names of the instance's per-sandbox objects that exist, by resource."""
        found = {kind: [o["metadata"]["name"] for o in self.objects(kind)] for kind in PER_SANDBOX}
        return {kind: names for kind, names in found.items() if names}

    def pod_processes(self) -> dict[str, list[int]]:
        """The fake kubelet's processes of this instance's pods (any seen so far), by pod."""
        self.objects("pods")
        prefix = f"{self.cluster.namespace}/"
        return {
            key[len(prefix) :]: pids
            for key, pids in self.cluster.pod_pids().items()
            if key.startswith(prefix) and key[len(prefix) :] in self.seen_pods and pids
        }

    def check_clean(self) -> None:
        """Nothing of the instance is left in the cluster, on the host or in storage."""
        wait_for(lambda: not self.leftovers(), 30, message="the instance's objects to go")
        wait_for(lambda: not self.pod_processes(), 30, message="the pods' processes to end")
        sandboxes = self.storage / "sandboxes"
        left = list(sandboxes.iterdir()) if sandboxes.exists() else []
        assert not left, f"sandbox directories left: {left}"


def start_kube_service(cluster: Any, base: Path, **extra: str) -> KubeService:
    service = KubeService(cluster, base, extra)
    service.start()
    return service


def end_kube_service(service: KubeService) -> None:
    """Kill the sandboxes left (with the CLI), stop the service, check nothing is left."""
    if service.proc is not None and service.proc.poll() is None:
        listed = service.cli("list", "--json", check=False)
        if listed.returncode == 0 and listed.stdout.strip():
            for info in json.loads(listed.stdout):
                service.cli("kill", info["id"], check=False)
    service.stop()
    service.check_clean()


@pytest.fixture(scope="session")
def fake_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A fake cluster for the session, answering 403 to what the service's Role forbids."""
    from tests.kube.conftest import running_fake_cluster

    rbac = ROOT / "deploy" / "kubernetes" / "rbac.yaml"
    with running_fake_cluster(tmp_path_factory.mktemp("fake-cluster"), rbac=rbac) as cluster:
        yield cluster


@pytest.fixture
def make_kube_service(
    fake_cluster: Any, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., KubeService]]:
    """Start a service on the kubernetes backend with extra environment variables (its
    JUPYTER_SANDBOX_K8S_* settings), and point this process's client at it; at the end,
    check that nothing of it is left."""
    started: list[KubeService] = []

    def make(**extra: str) -> KubeService:
        base = Path(tempfile.mkdtemp(prefix="jsb-kube-", dir=storage_parent()))
        service = KubeService(fake_cluster, base, extra)
        started.append(service)
        for key, value in service.env.items():
            if key != "PYTHONPATH":
                monkeypatch.setenv(key, value)
        service.start()
        return service

    yield make
    for service in reversed(started):
        try:
            end_kube_service(service)
        finally:
            kept = Path(tempfile.gettempdir()) / f"jupyter-sandbox-kube-tests-{os.getuid()}.log"
            if service.log_file.exists():
                shutil.copy(service.log_file, kept)
            shutil.rmtree(service.base, ignore_errors=True)


@pytest.fixture
def kube_service_env(make_kube_service: Callable[..., KubeService]) -> KubeService:
    """A service on the kubernetes backend (default settings, emptyDir homes)."""
    return make_kube_service()
