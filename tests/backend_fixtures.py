"""The backends the session's service runs its tests on, and what each leaves behind.

A test module opts in to both with ``pytestmark = pytest.mark.backends("local",
"kubernetes")``; tests/conftest.py parametrizes its tests over those names (session-scoped,
so the service switches backend once). The kubernetes half runs against the fake cluster
of tests/kube (no real API server or kubelet can run here: those two are fakes, the
service, the backend, the official client and the agents in the pods are real), or,
with ``--cluster``, ``-m cluster`` or JUPYTER_SANDBOX_TEST_CLUSTER=1, against the real
cluster that KUBECONFIG names.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import pytest
from _pytest.mark.expression import Expression

if TYPE_CHECKING:
    from tests.kube_fixtures import KubeService

BACKENDS = ("local", "kubernetes")
MANAGED = "app.kubernetes.io/managed-by=jupyter-sandbox"


class Cluster(Protocol):
    """What the leak checks ask of a cluster (the fake one's control API has these)."""

    kubeconfig: str
    namespace: str

    def objects(self, kind: str, namespace: str | None = None) -> list[dict]: ...
    def delete(self, kind: str, name: str, grace: int | None = None) -> Any: ...
    def pod_pids(self) -> dict[str, list[int]]: ...
    def command_pids(self) -> dict[str, int]: ...


def real_cluster_wanted(config: pytest.Config) -> bool:
    """Whether the kubernetes half runs on a real cluster: ``--cluster``,
    JUPYTER_SANDBOX_TEST_CLUSTER=1, or a ``-m`` expression that selects ``cluster`` tests."""
    if config.getoption("cluster") or os.environ.get("JUPYTER_SANDBOX_TEST_CLUSTER") == "1":
        return True
    expression = config.getoption("markexpr")
    return bool(expression) and Expression.compile(expression).evaluate(
        lambda name, **_: name == "cluster"
    )


class RealCluster:
    """The cluster of KUBECONFIG, looked at with the backend's own API client. Its pods'
    processes are not on this machine, so `pod_pids` and `command_pids` have none."""

    def __init__(self, kubeconfig: str, namespace: str) -> None:
        self.kubeconfig = kubeconfig
        self.namespace = namespace

    def objects(self, kind: str, namespace: str | None = None) -> list[dict]:
        """This project's objects of a kind (none of a kind the cluster does not serve,
        like agent-sandbox's Sandboxes where that is not installed)."""
        return asyncio.run(self._call("list", kind, namespace or self.namespace))

    def delete(self, kind: str, name: str, grace: int | None = None) -> Any:
        return asyncio.run(self._call("delete", kind, self.namespace, name))

    def pod_pids(self) -> dict[str, list[int]]:
        return {}

    def command_pids(self) -> dict[str, int]:
        return {}

    async def _call(self, verb: str, kind: str, namespace: str, name: str = "") -> Any:
        from jupyter_sandbox.backends.kubernetes.api import Api, ApiError
        from jupyter_sandbox.backends.kubernetes.config import api_configuration

        api = Api(await api_configuration(), namespace)
        try:
            if verb == "delete":
                return await api.delete(kind, name)
            return (await api.list(kind, MANAGED))["items"]
        except ApiError as e:
            if e.status == 404:
                return []
            raise
        finally:
            await api.close()


def kubernetes_settings(service: KubeService, real: bool) -> dict[str, str]:
    """What a session service needs, on top of the local one's settings, to run its
    sandboxes as objects of `service`'s own instance in its cluster.

    Homes are PersistentVolumeClaims (unless JUPYTER_SANDBOX_K8S_HOME says otherwise):
    the behaviour tests expect a failed sandbox's files to be kept, as the local backend
    keeps them; an emptyDir home goes with its pod. A real cluster's pods get the default
    start timeout: images may need pulling."""
    wanted = ["JUPYTER_SANDBOX_BACKEND", "KUBECONFIG", "JUPYTER_SANDBOX_K8S_NAMESPACE"]
    wanted += ["JUPYTER_SANDBOX_K8S_INSTANCE"]
    if not real:  # a restart after a SIGKILL waits that Lease out
        wanted += ["JUPYTER_SANDBOX_K8S_START_TIMEOUT", "JUPYTER_SANDBOX_K8S_LEASE_SECONDS"]
    settings = {key: service.env[key] for key in wanted}
    settings["JUPYTER_SANDBOX_K8S_HOME"] = os.environ.get("JUPYTER_SANDBOX_K8S_HOME", "pvc")
    return settings


def pod_sandbox(pod: str) -> str:
    """The sandbox id of a pod named ``namespace/jsb-<id>-<generation>``."""
    name = pod.rsplit("/", 1)[-1]
    return name.removeprefix("jsb-").rsplit("-", 1)[0]


class PodProcesses:
    """The host pids each pod of the fake cluster has had, to find those that outlive
    their pod."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.seen: dict[int, str] = {}

    def look(self) -> dict[str, list[int]]:
        """The pods running now and their pids (remembered)."""
        running = self.cluster.pod_pids()
        self.seen.update({pid: pod for pod, pids in running.items() for pid in pids})
        return running

    def orphans(self, alive: Any) -> dict[int, str]:
        """Processes of pods that no longer run but that are still alive. Each is looked
        at once: a later process may reuse its pid."""
        running = self.look()
        ended = {pid: pod for pid, pod in self.seen.items() if pod not in running}
        for pid in ended:
            del self.seen[pid]
        orphans = {pid: pod for pid, pod in ended.items() if alive(pid)}
        # The fake cluster checks at its end that no pid it reported is alive; over a
        # session the pids wrap (pid_max may be 32768), so forget those seen to be gone.
        seen = getattr(self.cluster, "seen_pids", None)
        if seen is not None:
            seen -= set(ended) - set(orphans)
        return orphans


def direct_kubernetes_backend(
    cluster: Cluster, storage: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Any, KubeService]:
    """A kubernetes backend with no service above it (for tests of what sits beside the
    service, like the SSH gateway), with the session service's settings and an instance
    of its own; and the view of that instance, to check that nothing of it is left."""
    from jupyter_sandbox._config import Settings
    from jupyter_sandbox.backends.kubernetes import KubernetesBackend
    from jupyter_sandbox.backends.kubernetes.config import KubernetesSettings
    from tests.kube_fixtures import KubeService

    view = KubeService(cluster, storage.parent, {})
    view.storage = storage
    settings = kubernetes_settings(view, isinstance(cluster, RealCluster))
    monkeypatch.setenv("KUBECONFIG", settings["KUBECONFIG"])
    backend = KubernetesBackend(storage, Settings(), KubernetesSettings.from_env(settings))
    return backend, view
