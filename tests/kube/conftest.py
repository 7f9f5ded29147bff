"""Fixtures for tests against the fake Kubernetes cluster (tests/kube/fake_cluster.py).

No real API server or kubelet can run on this machine, so these start the fake one as a
subprocess, the way the service's tests do: the official client, the backend, the
service and the agents in the pods are real. Teardown checks that no pod process is
left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from kubernetes_asyncio import client, config

ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = "jupyter-sandbox"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0


@dataclass
class FakeCluster:
    """A running fake cluster: its kubeconfig, namespace and fault controls."""

    kubeconfig: str
    control: str
    process: subprocess.Popen
    directory: Path
    namespace: str = NAMESPACE
    seen_pids: set[int] = field(default_factory=set)

    def _call(self, method: str, path: str, body: dict | None = None) -> object:
        response = httpx.request(method, self.control + path, json=body, timeout=30)
        if response.status_code >= 400:
            raise RuntimeError(f"fake cluster control {path}: {response.text}")
        return response.json()

    def objects(self, kind: str, namespace: str | None = None) -> list[dict]:
        """Every object of a kind ("pods" or "Pod"), in a namespace or all."""
        query = f"?namespace={namespace}" if namespace else ""
        return self._call("GET", f"/objects/{kind}{query}")

    def names(self, kind: str) -> set[str]:
        return {o["metadata"]["name"] for o in self.objects(kind, self.namespace)}

    def delete(self, kind: str, name: str, grace: int | None = None) -> dict:
        """Delete an object behind every client's back, through the normal deletion path."""
        body = {"kind": kind, "name": name, "namespace": self.namespace}
        if grace is not None:
            body["grace"] = grace
        return self._call("POST", "/delete", body)

    def outage(self, seconds: float, mode: str = "refuse") -> None:
        """The API port refuses connections for `seconds` (open watches are cut); with
        mode="hang" it accepts them and answers nothing (a network partition)."""
        self._call("POST", "/outage", {"seconds": seconds, "mode": mode})

    def expire_watches(self) -> int:
        """Every open watch gets a 410 Expired event; older resourceVersions are compacted."""
        return self._call("POST", "/expire_watches")["expired_watches"]

    def stats(self) -> dict:
        """Request counts per "verb resource", watch events sent, objects per kind."""
        return self._call("GET", "/stats")

    def reset_stats(self) -> None:
        self._call("POST", "/stats/reset")

    def pod_pids(self) -> dict[str, list[int]]:
        """Host pids of each running pod's processes, by "namespace/name"."""
        pids = self._call("GET", "/pod_pids")
        self.seen_pids |= {pid for group in pids.values() for pid in group}
        return pids

    def command_pids(self) -> dict[str, int]:
        """The host pid of each running container's command (pid 1 inside its pod, e.g.
        the agent), by "namespace/name"."""
        return self._call("GET", "/command_pids")

    def node(self, **capacity: str) -> dict[str, int]:
        """The node's allocatable resources; change them with cpu="2", memory="1Gi",
        ephemeral_storage="10Gi" (pods that do not fit stay Pending, Unschedulable)."""
        if not capacity:
            return self._call("GET", "/node")
        body = {key.replace("_", "-"): value for key, value in capacity.items()}
        return self._call("POST", "/node", body)

    def stop(self) -> None:
        """SIGTERM the cluster (it kills every pod process) and wait for it."""
        if self.process.poll() is None:
            with contextlib.suppress(Exception):
                self.pod_pids()
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired as exc:
                self.process.kill()
                self.process.wait()
                raise AssertionError(
                    "the fake cluster did not stop within 30 s of SIGTERM"
                ) from exc


@contextlib.asynccontextmanager
async def core(cluster: FakeCluster) -> AsyncIterator[client.CoreV1Api]:
    """The official async client's core API, configured from the cluster's kubeconfig."""
    configuration = client.Configuration()
    await config.load_kube_config(
        config_file=cluster.kubeconfig, client_configuration=configuration
    )
    async with client.ApiClient(configuration) as api:
        yield client.CoreV1Api(api)


def run(cluster: FakeCluster, scenario: Callable[[client.CoreV1Api], Awaitable[object]]) -> object:
    """Run `scenario` against the cluster's core API in a fresh event loop; its result."""

    async def main() -> object:
        async with core(cluster) as v1:
            return await scenario(v1)

    return asyncio.run(main())


def alive(pid: int) -> bool:
    """True for a live process (a zombie is not alive)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@contextlib.contextmanager
def running_fake_cluster(
    directory: Path, rbac: Path | None = None, bookmark_interval: float | None = None
) -> Iterator[FakeCluster]:
    """Start `python3 -m tests.kube.fake_cluster` and stop it after; no pod process may
    outlive it."""
    directory.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "tests.kube.fake_cluster", "--dir", str(directory)]
    if rbac is not None:
        argv += ["--rbac", str(rbac)]
    if bookmark_interval is not None:
        argv += ["--bookmark-interval", str(bookmark_interval)]
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    errors = open(directory / "cluster.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=errors)
    try:
        ready, _, _ = select.select([process.stdout], [], [], START_TIMEOUT)
        line = process.stdout.readline() if ready else b""
        if not line:
            process.kill()
            process.wait()
            log = (directory / "cluster.log").read_text(errors="replace")
            raise RuntimeError(f"the fake cluster did not start within {START_TIMEOUT} s: {log}")
        info = json.loads(line)
        cluster = FakeCluster(info["kubeconfig"], info["control"], process, directory)
        try:
            yield cluster
        finally:
            cluster.stop()
        deadline = time.monotonic() + 5
        while (left := [p for p in cluster.seen_pids if alive(p)]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not left, f"pod processes outlived the fake cluster: {left}"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
        errors.close()


@pytest.fixture(scope="module")
def fake_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeCluster]:
    """A fake cluster shared by the tests of a module."""
    with running_fake_cluster(tmp_path_factory.mktemp("fake-cluster")) as cluster:
        yield cluster
