"""The kubernetes backend on its own (no service above it), on the fake cluster: what
it makes, what it reads back, how it fails. The fake API server and kubelet are the only
mocked parts; the agent in each pod is real and reached over TLS."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from jupyter_sandbox._config import Settings
from jupyter_sandbox._errors import IsolationUnavailable, ServiceUnavailable
from jupyter_sandbox.backends.base import Limits, SandboxSpec
from jupyter_sandbox.backends.kubernetes import KubernetesBackend
from jupyter_sandbox.backends.kubernetes.config import KubernetesSettings

pytestmark = pytest.mark.timeout(90)


def backend_for(cluster, storage: Path, **settings) -> KubernetesBackend:
    kube = KubernetesSettings(namespace=cluster.namespace, start_timeout=20, **settings)
    return KubernetesBackend(storage, Settings(), kube)


@pytest.fixture
def kubeconfig(fake_cluster, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(fake_cluster.kubeconfig))
    return fake_cluster


def instance_objects(cluster, kind: str, instance: str) -> list[dict]:
    return [
        o
        for o in cluster.objects(kind, cluster.namespace)
        if o["metadata"].get("labels", {}).get("jupyter-sandbox.io/instance") == instance
    ]


def test_start_ping_exec_stop_and_what_a_lifecycle_costs(kubeconfig, tmp_path):
    cluster = kubeconfig

    async def lifecycle() -> dict:
        backend = backend_for(cluster, tmp_path, instance="direct1", lease_seconds=3)
        await backend.prepare(None, 0)
        assert await asyncio.to_thread(backend.read_records) == {}
        cluster.reset_stats()
        runtime = await backend.start(SandboxSpec("sb-d1rect0001", limits=Limits(memory=1 << 28)))
        assert backend.serving(runtime) and await backend.failure(runtime) is None
        assert os.path.isdir(runtime.directory)
        answer = await backend.agent(runtime).call("ping")
        assert answer is not None
        backend.write_record("sb-d1rect0001", b'{"first": 1}')
        backend.write_record("sb-d1rect0001", b'{"second": 2}')  # queued: only the last counts
        assert await backend.records.flush(10) == 0
        [secret] = instance_objects(cluster, "secrets", "direct1")
        assert "record" in secret["data"]
        # A second backend of the instance is refused while the first holds its Lease.
        refused = backend_for(cluster, tmp_path / "refused", instance="direct1")
        with pytest.raises(IsolationUnavailable, match="another service of instance direct1"):
            await refused.prepare(None, 0)
        await backend.close()  # releases the Lease; the sandbox keeps running
        again = backend_for(cluster, tmp_path / "again", instance="direct1")
        await again.prepare(None, 0)
        assert await asyncio.to_thread(again.read_records) == {"sb-d1rect0001": b'{"second": 2}'}
        adopted = again.runtime("sb-d1rect0001", runtime.to_json())
        assert adopted.pod == runtime.pod
        await again.stop(adopted)
        stats = cluster.stats()
        assert not os.path.exists(adopted.directory)
        await again.close()
        return stats

    stats = asyncio.run(lifecycle())
    for kind in ("pods", "secrets", "persistentvolumeclaims"):
        assert not instance_objects(cluster, kind, "direct1"), kind
    print("API requests for one sandbox's start, record, second backend, stop:", stats["requests"])


def test_a_pod_not_ready_in_time_says_where_it_got_and_leaves_nothing(kubeconfig, tmp_path):
    cluster = kubeconfig

    async def start() -> None:
        kube = KubernetesSettings(
            namespace=cluster.namespace, instance="direct2", start_timeout=0.01
        )
        backend = KubernetesBackend(tmp_path, Settings(), kube)
        await backend.prepare(None, 0)
        try:
            await backend.start(SandboxSpec("sb-d1rect0002"))
        finally:
            await backend.close()

    with pytest.raises(IsolationUnavailable, match="jsb-sb-d1rect0002-0 was not ready within"):
        asyncio.run(start())
    for kind in ("pods", "secrets"):
        assert not instance_objects(cluster, kind, "direct2"), kind
    assert not (tmp_path / "sandboxes" / "sb-d1rect0002").exists()


def test_no_cluster_and_no_api_server_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    backend = KubernetesBackend(tmp_path, Settings(), KubernetesSettings())
    with pytest.raises(IsolationUnavailable, match="set KUBECONFIG"):
        asyncio.run(backend.prepare(None, 0))
    config = tmp_path / "unreachable"
    config.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        "clusters: [{name: c, cluster: {server: 'http://127.0.0.1:9'}}]\n"
        "users: [{name: u, user: {token: t}}]\n"
        "contexts: [{name: c, context: {cluster: c, user: u}}]\n"
    )
    monkeypatch.setenv("KUBECONFIG", str(config))
    backend = KubernetesBackend(tmp_path, Settings(), KubernetesSettings())
    with pytest.raises(ServiceUnavailable, match=r"127\.0\.0\.1:9 .*cannot be reached"):
        asyncio.run(backend.prepare(None, 0))
