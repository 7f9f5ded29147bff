"""The fake kubelet, driven through the fake API server by the official async client.

The kubelet and the API server are test fakes (none can run here); the pods' processes
are real: each runs in bubblewrap on its own loopback pod IP. These tests check what the
Kubernetes backend relies on: readiness on the pod IP, env and volumes as the pod spec
says, exit states, graceful deletion that kills the processes, PVCs that outlive pods,
garbage collection of owned pods, and no process left behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from kubernetes_asyncio import client, watch
from kubernetes_asyncio.client.rest import ApiException

from tests.conftest import wait_for
from tests.kube.conftest import FakeCluster, alive, run, running_fake_cluster

pytestmark = pytest.mark.unprivileged

# A TCP server that answers what the container sees of itself.
SERVER = """
import json, os, socket
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind((os.environ["ADDRESS"], 7000))
server.listen()
while True:
    conn, _ = server.accept()
    report = {
        "pid": os.getpid(), "uid": os.getuid(), "gid": os.getgid(),
        "env": {k: os.environ.get(k) for k in ("ADDRESS", "TOKEN", "GREETING", "HOSTNAME")},
        "code": open("/opt/code/main.py").read(),
        "code_writable": os.access("/opt/code", os.W_OK),
        "state": os.statvfs("/run/state").f_blocks > 0,
        "home": sorted(os.listdir("/home/sandbox")),
    }
    conn.sendall(json.dumps(report).encode())
    conn.close()
"""


POD_IP = "status.podIP"
TOKEN_REF = {"name": "kl-secret", "key": "token"}


def pod_manifest(name: str, command: list[str], home: dict | None = None, grace: int = 5) -> dict:
    """A pod shaped like the backend's (contract section 2), running `command`."""
    return {
        "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "jupyter-sandbox"}},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "terminationGracePeriodSeconds": grace,
            "hostname": name,
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": 1000,
                "runAsGroup": 1000,
                "fsGroup": 1000,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [
                {
                    "name": "agent",
                    "image": "python:3.12-slim",
                    "command": command,
                    "ports": [{"containerPort": 7000, "name": "agent"}],
                    "readinessProbe": {"tcpSocket": {"port": "agent"}, "periodSeconds": 1},
                    "resources": {"requests": {"memory": "256Mi"}, "limits": {"memory": "256Mi"}},
                    "env": [
                        {"name": "ADDRESS", "valueFrom": {"fieldRef": {"fieldPath": POD_IP}}},
                        {"name": "TOKEN", "valueFrom": {"secretKeyRef": dict(TOKEN_REF)}},
                        {"name": "GREETING", "value": "hello $(ADDRESS) $$(ADDRESS)"},
                    ],
                    "volumeMounts": [
                        {"name": "code", "mountPath": "/opt/code", "readOnly": True},
                        {"name": "home", "mountPath": "/home/sandbox"},
                        {"name": "state", "mountPath": "/run/state"},
                    ],
                }
            ],
            "volumes": [
                {"name": "code", "configMap": {"name": "kl-code"}},
                home or {"name": "home", "emptyDir": {}},
                {"name": "state", "emptyDir": {"medium": "Memory"}},
            ],
        },
    }  # fmt: skip


async def until(
    v1: client.CoreV1Api,
    ns: str,
    name: str,
    done: Callable[[str, dict], bool],
    since: str,
    timeout: float = 20,
) -> list[tuple[str, dict]]:
    """Watch pod `name` from version `since` until `done(type, raw pod)`; all events seen."""
    seen = []
    stream = watch.Watch().stream(
        v1.list_namespaced_pod, ns, field_selector=f"metadata.name={name}",
        resource_version=since, timeout_seconds=int(timeout),
    )  # fmt: skip
    async with stream as events:
        async for event in events:
            seen.append((event["type"], event["raw_object"]))
            if done(event["type"], event["raw_object"]):
                return seen
    raise AssertionError(f"pod {name} did not get there within {timeout} s: {seen[-1:]}")


def ready(kind: str, pod: dict) -> bool:
    conditions = {c["type"]: c["status"] for c in pod["status"].get("conditions") or []}
    return conditions.get("Ready") == "True"


async def prepare(v1: client.CoreV1Api, ns: str) -> None:
    """The secret and config map the test pods reference."""
    secret = {"metadata": {"name": "kl-secret"}, "stringData": {"token": "s3cret"}}
    code = {"metadata": {"name": "kl-code"}, "data": {"main.py": "print(1)\n"}}
    for call, body in (
        (v1.create_namespaced_secret, secret),
        (v1.create_namespaced_config_map, code),
    ):
        try:
            await call(ns, body)
        except ApiException as exc:
            if exc.status != 409:
                raise


async def ask(pod_ip: str) -> dict:
    reader, writer = await asyncio.open_connection(pod_ip, 7000)
    data = await reader.read()
    writer.close()
    return json.loads(data)


def test_pod_becomes_ready_on_its_ip_and_deletion_kills_its_processes(
    fake_cluster: FakeCluster,
) -> None:
    ns = fake_cluster.namespace

    async def scenario(v1: client.CoreV1Api) -> None:
        await prepare(v1, ns)
        made = await v1.create_namespaced_pod(
            ns, pod_manifest("kl-ready", ["python3", "-c", SERVER])
        )
        events = await until(v1, ns, "kl-ready", ready, made.metadata.resource_version)
        phases = [pod["status"].get("phase") for _, pod in events]
        assert phases[0] == "Pending" and phases[-1] == "Running"
        states = [(p["status"].get("containerStatuses") or [{}])[0].get("state") for _, p in events]
        assert {"waiting": {"reason": "ContainerCreating"}} in states  # as a kubelet reports
        pod = events[-1][1]
        status = pod["status"]
        assert pod["spec"]["nodeName"] and status["hostIP"] and status["startTime"]
        assert status["podIPs"] == [{"ip": status["podIP"]}] and status["podIP"].startswith(
            "127.0."
        )
        running = status["containerStatuses"][0]
        assert running["ready"] and running["started"] and "running" in running["state"]
        seen = await ask(status["podIP"])
        assert (seen["pid"], seen["uid"], seen["gid"]) == (1, 1000, 1000)
        assert seen["env"] == {
            "ADDRESS": status["podIP"],
            "TOKEN": "s3cret",
            "GREETING": f"hello {status['podIP']} $(ADDRESS)",
            "HOSTNAME": "kl-ready",
        }
        assert seen["code"] == "print(1)\n" and not seen["code_writable"]
        assert seen["state"] and seen["home"] == []
        pids = await asyncio.to_thread(fake_cluster.pod_pids)
        assert len(pids[f"{ns}/kl-ready"]) >= 2  # bwrap and the server
        command = (await asyncio.to_thread(fake_cluster.command_pids))[f"{ns}/kl-ready"]
        assert command in pids[f"{ns}/kl-ready"]
        assert Path(f"/proc/{command}/cmdline").read_bytes().split(b"\0")[:2] == [b"python3", b"-c"]
        began = time.monotonic()
        deleted = await v1.delete_namespaced_pod("kl-ready", ns, grace_period_seconds=1)
        assert (
            deleted.metadata.deletion_timestamp
            and deleted.metadata.deletion_grace_period_seconds == 1
        )
        events = await until(
            v1, ns, "kl-ready", lambda kind, _: kind == "DELETED", made.metadata.resource_version
        )
        assert time.monotonic() - began >= 1  # pid 1 ignores SIGTERM: SIGKILL after the grace
        last = events[-1][1]["status"]
        terminated = last["containerStatuses"][0]["state"]["terminated"]
        assert (last["phase"], terminated["exitCode"], terminated["reason"]) == (
            "Failed",
            137,
            "Error",
        )
        assert not [p for p in pids[f"{ns}/kl-ready"] if alive(p)]
        with pytest.raises(ApiException) as caught:
            await v1.read_namespaced_pod("kl-ready", ns)
        assert caught.value.status == 404

    run(fake_cluster, scenario)


def test_exit_states_are_recorded_and_ended_pods_delete_at_once(fake_cluster: FakeCluster) -> None:
    ns = fake_cluster.namespace

    async def scenario(v1: client.CoreV1Api) -> dict[str, tuple]:
        await prepare(v1, ns)
        ends = {}
        for name, command in (
            ("kl-ok", ["true"]),
            ("kl-fails", ["sh", "-c", "echo $0; exit 3", "out"]),
        ):
            manifest = pod_manifest(name, command)
            del manifest["spec"]["containers"][0]["readinessProbe"]
            made = await v1.create_namespaced_pod(ns, manifest)
            events = await until(
                v1, ns, name, lambda _, p: p["status"].get("phase") in ("Succeeded", "Failed"),
                made.metadata.resource_version,
            )  # fmt: skip
            status = events[-1][1]["status"]
            state = status["containerStatuses"][0]["state"]["terminated"]
            assert state["startedAt"] and state["finishedAt"]
            log = await v1.read_namespaced_pod_log(name, ns)
            ends[name] = (status["phase"], state["exitCode"], state["reason"], log)
            gone = await v1.delete_namespaced_pod(name, ns)
            assert gone.metadata.deletion_grace_period_seconds == 0
            with pytest.raises(ApiException):
                await v1.read_namespaced_pod(name, ns)
        return ends

    assert run(fake_cluster, scenario) == {
        "kl-ok": ("Succeeded", 0, "Completed", ""),
        "kl-fails": ("Failed", 3, "Error", "out\n"),
    }


def test_a_missing_secret_holds_the_pod_until_it_exists(fake_cluster: FakeCluster) -> None:
    ns = fake_cluster.namespace

    async def scenario(v1: client.CoreV1Api) -> None:
        await prepare(v1, ns)
        manifest = pod_manifest("kl-wait", ["python3", "-c", SERVER])
        manifest["spec"]["containers"][0]["env"][1]["valueFrom"]["secretKeyRef"]["name"] = (
            "kl-later"
        )
        made = await v1.create_namespaced_pod(ns, manifest)

        def waiting(_: str, pod: dict) -> bool:
            statuses = pod["status"].get("containerStatuses") or [{}]
            waiting = statuses[0].get("state", {}).get("waiting", {})
            return waiting.get("reason") == "CreateContainerConfigError"

        events = await until(v1, ns, "kl-wait", waiting, made.metadata.resource_version)
        state = events[-1][1]["status"]["containerStatuses"][0]["state"]["waiting"]
        assert state == {
            "reason": "CreateContainerConfigError",
            "message": 'secret "kl-later" not found',
        }
        assert events[-1][1]["status"]["phase"] == "Pending"
        await v1.create_namespaced_secret(
            ns, {"metadata": {"name": "kl-later"}, "stringData": {"token": "late"}}
        )
        events = await until(v1, ns, "kl-wait", ready, events[-1][1]["metadata"]["resourceVersion"])
        assert (await ask(events[-1][1]["status"]["podIP"]))["env"]["TOKEN"] == "late"
        await v1.delete_namespaced_pod("kl-wait", ns, grace_period_seconds=0)
        await asyncio.to_thread(wait_for, lambda: f"{ns}/kl-wait" not in fake_cluster.pod_pids())
        await v1.delete_namespaced_secret("kl-later", ns)

    run(fake_cluster, scenario)


def test_a_pvc_home_outlives_its_pods_and_goes_with_the_claim(fake_cluster: FakeCluster) -> None:
    ns = fake_cluster.namespace
    writer = ["sh", "-c", 'echo kept > /home/sandbox/file && exec python3 -c "$0"', SERVER]
    home = {"name": "home", "persistentVolumeClaim": {"claimName": "kl-home"}}

    async def scenario(v1: client.CoreV1Api) -> None:
        await prepare(v1, ns)
        claim = {"metadata": {"name": "kl-home"}, "spec": {"accessModes": ["ReadWriteOnce"],
                 "resources": {"requests": {"storage": "1Gi"}}}}  # fmt: skip
        await v1.create_namespaced_persistent_volume_claim(ns, claim)
        made = await v1.create_namespaced_pod(ns, pod_manifest("kl-pvc-1", writer, home))
        await until(v1, ns, "kl-pvc-1", ready, made.metadata.resource_version)
        await v1.delete_namespaced_pod("kl-pvc-1", ns, grace_period_seconds=0)
        made = await v1.create_namespaced_pod(
            ns, pod_manifest("kl-pvc-2", ["python3", "-c", SERVER], home)
        )
        events = await until(v1, ns, "kl-pvc-2", ready, made.metadata.resource_version)
        assert (await ask(events[-1][1]["status"]["podIP"]))["home"] == ["file"]
        pvc = await v1.read_namespaced_persistent_volume_claim("kl-home", ns)
        assert pvc.status.phase == "Bound" and pvc.spec.volume_name
        # Deleting the claim while a pod uses it: it waits (pvc-protection) until the pod goes.
        await v1.delete_namespaced_persistent_volume_claim("kl-home", ns)
        pvc = await v1.read_namespaced_persistent_volume_claim("kl-home", ns)
        assert pvc.metadata.deletion_timestamp and pvc.metadata.finalizers == [
            "kubernetes.io/pvc-protection"
        ]
        await v1.delete_namespaced_pod("kl-pvc-2", ns, grace_period_seconds=1)
        await asyncio.to_thread(
            wait_for, lambda: "kl-home" not in fake_cluster.names("persistentvolumeclaims"), 10
        )
        claims = fake_cluster.directory / "node" / "pvcs" / ns
        await asyncio.to_thread(wait_for, lambda: not (claims / "kl-home").exists(), 5)

    run(fake_cluster, scenario)


def test_a_sub_path_mount_binds_one_key_of_a_config_map(fake_cluster: FakeCluster) -> None:
    ns = fake_cluster.namespace
    shows = "import pwd; print(pwd.getpwuid(1000).pw_name, open('/etc/group').read().split())"
    files = {"passwd": "sandbox:x:1000:1000::/home/sandbox:/bin/sh\n", "group": "sandbox:x:1000:\n"}

    def with_accounts(name: str, command: list[str], sub_path: str) -> dict:
        manifest = pod_manifest(name, command)
        del manifest["spec"]["containers"][0]["readinessProbe"]
        manifest["spec"]["volumes"].append({"name": "etc", "configMap": {"name": "kl-etc"}})
        manifest["spec"]["containers"][0]["volumeMounts"] += [
            {"name": "etc", "mountPath": "/etc/passwd", "subPath": sub_path, "readOnly": True},
            {"name": "etc", "mountPath": "/etc/group", "subPath": "group"},
        ]
        return manifest

    async def scenario(v1: client.CoreV1Api) -> tuple[str, dict]:
        await prepare(v1, ns)
        await v1.create_namespaced_config_map(ns, {"metadata": {"name": "kl-etc"}, "data": files})
        made = await v1.create_namespaced_pod(
            ns, with_accounts("kl-sub", ["python3", "-c", shows], "passwd")
        )
        events = await until(
            v1, ns, "kl-sub", lambda _, p: p["status"].get("phase") in ("Succeeded", "Failed"),
            made.metadata.resource_version,
        )  # fmt: skip
        log = await v1.read_namespaced_pod_log("kl-sub", ns)
        assert events[-1][1]["status"]["phase"] == "Succeeded", log
        await v1.delete_namespaced_pod("kl-sub", ns)
        made = await v1.create_namespaced_pod(ns, with_accounts("kl-escape", ["true"], "../x"))

        def refused(_: str, pod: dict) -> bool:
            statuses = pod["status"].get("containerStatuses") or [{}]
            return statuses[0].get("state", {}).get("waiting", {}).get("reason") == (
                "CreateContainerConfigError"
            )

        events = await until(v1, ns, "kl-escape", refused, made.metadata.resource_version)
        await v1.delete_namespaced_pod("kl-escape", ns, grace_period_seconds=0)
        await v1.delete_namespaced_config_map("kl-etc", ns)
        return log, events[-1][1]["status"]["containerStatuses"][0]["state"]["waiting"]

    log, waiting = run(fake_cluster, scenario)
    assert log == "sandbox ['sandbox:x:1000:']\n"  # each file is the key's, the rest of /etc stays
    assert waiting["message"] == (
        "volumeMount \"etc\": subPath '../x' must be a relative path without '..'"
    )


def test_owned_pods_are_collected_with_their_owner_or_without_one(
    fake_cluster: FakeCluster,
) -> None:
    ns = fake_cluster.namespace

    async def scenario(v1: client.CoreV1Api) -> None:
        await prepare(v1, ns)
        anchor = await v1.create_namespaced_config_map(ns, {"metadata": {"name": "kl-anchor"}})
        ref = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "name": "kl-anchor",
            "uid": anchor.metadata.uid,
        }
        owned = pod_manifest("kl-owned", ["python3", "-c", SERVER], grace=1)
        owned["metadata"]["ownerReferences"] = [ref]
        made = await v1.create_namespaced_pod(ns, owned)
        await until(v1, ns, "kl-owned", ready, made.metadata.resource_version)
        stray = pod_manifest("kl-stray", ["python3", "-c", SERVER], grace=1)
        stray["metadata"]["ownerReferences"] = [
            dict(ref, name="kl-gone", uid="4a1c2b3d-0000-4000-8000-000000000000")
        ]
        made_stray = await v1.create_namespaced_pod(ns, stray)
        await v1.delete_namespaced_config_map("kl-anchor", ns)
        for name, since in (
            ("kl-owned", made.metadata.resource_version),
            ("kl-stray", made_stray.metadata.resource_version),
        ):
            await until(v1, ns, name, lambda kind, _: kind == "DELETED", since)
        assert not {"kl-owned", "kl-stray"} & set(fake_cluster.names("pods"))
        await asyncio.to_thread(wait_for, lambda: not fake_cluster.pod_pids())

    run(fake_cluster, scenario)


def test_sigterm_of_the_cluster_kills_every_pod(tmp_path: Path) -> None:
    async def scenario(v1: client.CoreV1Api) -> None:
        await prepare(v1, "jupyter-sandbox")
        made = await v1.create_namespaced_pod(
            "jupyter-sandbox", pod_manifest("kl-left", ["python3", "-c", SERVER])
        )
        await until(v1, "jupyter-sandbox", "kl-left", ready, made.metadata.resource_version)

    with running_fake_cluster(tmp_path) as cluster:
        run(cluster, scenario)
        pids = [p for group in cluster.pod_pids().values() for p in group]
        assert pids and all(alive(p) for p in pids)
        cluster.stop()
        assert cluster.process.returncode == 0
        assert not [p for p in pids if alive(p)]
        assert not os.listdir(tmp_path / "node" / "pods")


def test_a_killed_cluster_takes_its_pods_with_it(tmp_path: Path) -> None:
    async def scenario(v1: client.CoreV1Api) -> None:
        await prepare(v1, "jupyter-sandbox")
        manifest = pod_manifest("kl-crash", ["python3", "-c", SERVER])
        made = await v1.create_namespaced_pod("jupyter-sandbox", manifest)
        await until(v1, "jupyter-sandbox", "kl-crash", ready, made.metadata.resource_version)

    with running_fake_cluster(tmp_path) as cluster:
        run(cluster, scenario)
        pids = [p for group in cluster.pod_pids().values() for p in group]
        assert pids
        cluster.process.kill()  # no chance to clean up: bwrap --die-with-parent does it
        cluster.process.wait()
        wait_for(lambda: not [p for p in pids if alive(p)], 5, message="pods to die")


def test_a_pod_that_does_not_fit_stays_pending_until_the_node_has_room(
    fake_cluster: FakeCluster,
) -> None:
    ns = fake_cluster.namespace
    capacity = fake_cluster.node()

    def unschedulable(_: str, pod: dict) -> bool:
        conditions = {c["type"]: c for c in pod["status"].get("conditions") or []}
        return conditions.get("PodScheduled", {}).get("reason") == "Unschedulable"

    async def scenario(v1: client.CoreV1Api) -> list[str]:
        await prepare(v1, ns)
        messages = []
        home = {"name": "home", "persistentVolumeClaim": {"claimName": "kl-no-claim"}}
        made = await v1.create_namespaced_pod(ns, pod_manifest("kl-noclaim", ["true"], home))
        events = await until(v1, ns, "kl-noclaim", unschedulable, made.metadata.resource_version)
        pod = events[-1][1]
        assert not pod["spec"].get("nodeName") and pod["status"]["phase"] == "Pending"
        messages.append(pod["status"]["conditions"][0]["message"])
        gone = await v1.delete_namespaced_pod("kl-noclaim", ns)  # unscheduled: at once
        assert gone.metadata.deletion_grace_period_seconds == 0
        await asyncio.to_thread(fake_cluster.node, memory="128Mi")
        made = await v1.create_namespaced_pod(ns, pod_manifest("kl-big", ["python3", "-c", SERVER]))
        events = await until(v1, ns, "kl-big", unschedulable, made.metadata.resource_version)
        messages.append(events[-1][1]["status"]["conditions"][0]["message"])
        await asyncio.to_thread(fake_cluster.node, memory=str(capacity["memory"]))
        await until(v1, ns, "kl-big", ready, events[-1][1]["metadata"]["resourceVersion"])
        await v1.delete_namespaced_pod("kl-big", ns, grace_period_seconds=0)
        await asyncio.to_thread(wait_for, lambda: f"{ns}/kl-big" not in fake_cluster.pod_pids())
        return messages

    try:
        messages = run(fake_cluster, scenario)
    finally:
        fake_cluster.node(memory=str(capacity["memory"]))
    assert messages == [
        '0/1 nodes are available: persistentvolumeclaim "kl-no-claim" not found. preemption: '
        "0/1 nodes are available: 1 Preemption is not helpful for scheduling.",
        "0/1 nodes are available: 1 Insufficient memory. preemption: 0/1 nodes are available: "
        "1 No preemption victims found for incoming pod.",
    ]
