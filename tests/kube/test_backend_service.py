"""The kubernetes backend used through the real service and the real client, on the fake
cluster (tests/kube: a fake API server and kubelet, the only mocked parts; each pod's
agent really runs, in bubblewrap on a loopback pod IP, reached over TLS)."""

from __future__ import annotations

import base64
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from jupyter_sandbox import Sandbox, SandboxFailed, ServiceUnavailable
from jupyter_sandbox.kernel import _text
from tests.conftest import wait_for
from tests.kube.conftest import FakeCluster, running_fake_cluster

if TYPE_CHECKING:
    from tests.kube_fixtures import KubeService

pytest_plugins = ["tests.kube_fixtures"]

pytestmark = pytest.mark.timeout(120)
RBAC = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes" / "rbac.yaml"


@pytest.fixture(scope="module")
def fake_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeCluster]:
    """The fake cluster, answering 403 to anything the service's Role does not allow: every
    call the backend makes here fits deploy/kubernetes/rbac.yaml."""
    with running_fake_cluster(tmp_path_factory.mktemp("fake-cluster"), rbac=RBAC) as cluster:
        yield cluster


def test_create_run_files_kill_leaves_nothing(kube_service_env: KubeService):
    service = kube_service_env
    sb = Sandbox.create(timeout="2m", memory="256M", cpus=0.5)
    pod = service.pod(sb.id)
    assert pod["metadata"]["name"] == f"jsb-{sb.id}-0"
    result = sb.sh("echo hello from $(hostname); id -u; echo $HOME; pwd")
    assert result.stdout.split() == [
        "hello",
        "from",
        sb.id,
        "1000",
        "/home/sandbox",
        "/home/sandbox",
    ]
    sb.fs.write_text("notes/a.txt", "kept\n")
    assert sb.fs.read_text("notes/a.txt") == "kept\n"
    assert sb.sh("cat notes/a.txt").stdout == "kept\n"
    secret = service.of_sandbox("secrets", sb.id)
    assert [s["metadata"]["name"] for s in secret] == [f"jsb-{sb.id}"]
    assert service.pod_processes(), "the pod's agent runs on this host"
    sb.kill()
    wait_for(lambda: not service.leftovers(), 20, message="the sandbox's objects to go")
    wait_for(lambda: not service.pod_processes(), 20, message="the pod's processes to end")
    assert not (service.storage / "sandboxes" / sb.id).exists()


def test_pod_is_locked_down_and_sized_from_the_limits(make_kube_service):
    service = make_kube_service(JUPYTER_SANDBOX_K8S_RUNTIME_CLASS="gvisor")
    with Sandbox.create(timeout="2m", memory="256M", cpus=0.5) as sb:
        spec = service.pod(sb.id)["spec"]
        [container] = spec["containers"]
        assert spec["automountServiceAccountToken"] is False
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["resources"]["limits"]["memory"] == str(256 << 20)
        assert container["resources"]["limits"]["cpu"] == "500m"
        assert container["resources"]["requests"] == container["resources"]["limits"]
        assert spec["runtimeClassName"] == "gvisor"
        # No service-account token reaches the sandbox: nothing of the API's.
        token = sb.sh("cat /var/run/secrets/kubernetes.io/serviceaccount/token", check=False)
        assert token.exit_code != 0 and not token.stdout
        env = sb.sh("env").stdout
        assert "BEGIN" not in env and "JUPYTER_SANDBOX_AGENT" not in env, (
            "the agent's credentials must not reach user code"
        )


def test_service_sigkilled_readopts_its_pods_and_deletes_unrecorded_leftovers(
    kube_service_env: KubeService,
):
    service = kube_service_env
    sb = Sandbox.create(timeout="5m")
    sb.fs.write_text("work.txt", "written before the kill\n")
    sleeper = sb.spawn("sleep 300")
    pod = service.pod(sb.id)["metadata"]["name"]
    # What a service killed in the middle of a start leaves: objects, no record.
    leftover = "sb-feedfacade"
    service.create_object("secrets", service.leftover_secret(leftover))
    service.create_object("pods", service.leftover_pod(leftover))
    wait_for(lambda: service.of_sandbox("pods", leftover), 10, message="the leftover pod")
    service.kill()
    unstarted = service.storage / "sandboxes" / "sb-0dd0dd0dd0"  # killed before its Secret
    unstarted.mkdir()
    (service.storage / "sandboxes" / leftover).mkdir()  # and the leftover's own
    assert service.pod(sb.id)["metadata"]["name"] == pod, "pods outlive the service"
    service.start()
    wait_for(lambda: not service.leftovers_of(leftover), 20, message="the leftover to be deleted")
    assert not unstarted.exists()
    assert sorted(p.name for p in (service.storage / "sandboxes").iterdir()) == [sb.id]
    again = Sandbox.connect(sb.id)
    assert again.info().status == "running"
    assert again.fs.read_text("work.txt") == "written before the kill\n"
    assert sleeper.pid in [p.pid for p in again.processes()]
    assert again.sh("echo still here").stdout == "still here\n"
    assert service.pod(sb.id)["metadata"]["name"] == pod, "re-adopted, not started again"
    again.kill()


def test_a_new_service_on_a_fresh_disk_readopts_from_the_secrets_alone(
    kube_service_env: KubeService,
):
    """A service pod rescheduled elsewhere has no database: the Secrets' records suffice."""
    service = kube_service_env
    sb = Sandbox.create(name="survivor", timeout="5m", memory="300M")
    sb.fs.write_text("work.txt", "in the pod, not on the service's disk\n")
    service.kill()
    shutil.rmtree(service.env["JUPYTER_DATA_DIR"])
    shutil.rmtree(service.storage)
    service.storage.mkdir()
    service.start()
    again = Sandbox.connect("survivor")
    info = again.info()
    assert (again.id, info.status, info.limits["memory"]) == (sb.id, "running", 300 << 20)
    assert again.fs.read_text("work.txt") == "in the pod, not on the service's disk\n"
    assert again.sh("echo adopted").stdout == "adopted\n"
    again.kill()


def test_a_damaged_record_is_kept_aside_and_its_sandbox_adopted_as_failed(
    kube_service_env: KubeService,
):
    service = kube_service_env
    sb = Sandbox.create(timeout="5m")
    service.kill()
    shutil.rmtree(service.env["JUPYTER_DATA_DIR"])  # nothing but the Secret tells of it
    damaged = b'{"format": 1, "record": {"id": "'
    service.patch_object("secrets", f"jsb-{sb.id}", {"data": {"record": _b64(damaged)}})
    service.start()
    info = Sandbox.connect(sb.id).info()
    assert info.status == "failed"
    assert "its record does not check out" in info.failure
    assert f"key record-unreadable of Secret jsb-{sb.id}" in info.failure
    wait_for(
        lambda: service.secret_key(sb.id, "record-unreadable") == damaged,
        10,
        message="the damaged record to be kept aside",
    )
    Sandbox.connect(sb.id).kill()


def test_pod_deleted_behind_the_services_back_fails_and_keeps_a_pvc_home(make_kube_service):
    service = make_kube_service(JUPYTER_SANDBOX_K8S_HOME="pvc")
    sb = Sandbox.create(timeout="5m")
    sb.fs.write_text("work.txt", "kept on the claim\n")
    assert [c["metadata"]["name"] for c in service.of_sandbox("persistentvolumeclaims", sb.id)] == [
        f"jsb-{sb.id}-home"
    ]
    service.cluster.delete("pods", service.pod(sb.id)["metadata"]["name"])
    wait_for(lambda: sb.info().status == "failed", 20, message="the sandbox to fail")
    failure = sb.info().failure
    assert "deleted behind the service's back" in failure
    assert "home is kept on its PersistentVolumeClaim" in failure
    with pytest.raises(SandboxFailed, match="deleted behind the service's back") as failed:
        sb.sh("true")
    assert "Its files are kept until its deadline" in str(failed.value)
    assert sb.info().files_kept is True
    assert sb.fs.read_text("work.txt") == "kept on the claim\n"
    files_pod = service.pod(sb.id)
    assert files_pod["spec"]["containers"][0]["command"][-1] == "files-only"
    sb.restart()
    assert sb.sh("cat work.txt").stdout == "kept on the claim\n"
    assert service.pod(sb.id)["metadata"]["name"] == f"jsb-{sb.id}-2"
    sb.kill()


def test_agent_killed_on_the_node_fails_the_sandbox_saying_so(kube_service_env: KubeService):
    service = kube_service_env
    sb = Sandbox.create(timeout="2m")
    pod = service.pod(sb.id)["metadata"]["name"]
    agent = service.cluster.command_pids()[f"{service.cluster.namespace}/{pod}"]
    assert b"--pod" in _argv(agent), "the container's command is the agent"
    os.kill(agent, signal.SIGKILL)
    wait_for(lambda: sb.info().status == "failed", 20, message="the sandbox to fail")
    failure = sb.info().failure
    assert "its agent was killed (SIGKILL, exit status 137)" in failure
    assert "no files are kept" in failure
    sb.kill()


def test_an_emptydir_home_lost_to_a_failure_is_told_as_lost(kube_service_env: KubeService):
    """With the default emptyDir home a failed sandbox's files are gone: its info, its
    SandboxFailed, the CLI and the magics' text say so and what to do, never "kept"."""
    service = kube_service_env
    sb = Sandbox.create(timeout="5m")
    sb.fs.write_text("work.txt", "lost with the pod\n")
    assert sb.info().files_kept is False  # what a failure would do, told before one
    service.cluster.delete("pods", service.pod(sb.id)["metadata"]["name"])
    wait_for(lambda: sb.info().status == "failed", 20, message="the sandbox to fail")
    info = sb.info()
    assert info.files_kept is False
    with pytest.raises(SandboxFailed) as failed:
        sb.sh("true")
    message = str(failed.value)
    assert "Its files are not kept" in message and "kept until" not in message
    assert "start again with an empty home" in message
    assert "JUPYTER_SANDBOX_K8S_HOME=pvc" in message
    cli = subprocess.run(
        [sys.executable, "-m", "jupyter_sandbox", "info", sb.id],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    files = next(line for line in cli.splitlines() if line.startswith("files"))
    assert "not kept" in files and "starts it with an empty home" in files, cli
    assert "JUPYTER_SANDBOX_K8S_HOME=pvc" in files, cli
    shown = _text.info_text("default", info)
    assert "its files are not kept: `%sandbox restart default` starts it" in shown
    assert "files kept" not in _text.state(info) and "files not kept" in _text.state(info)
    sb.restart()  # as told: it runs again, with an empty home
    assert "work.txt" not in [entry.name for entry in sb.fs.list(".")]
    sb.kill()


def test_api_server_away_for_30_s(kube_service_env: KubeService):
    service = kube_service_env
    sb = Sandbox.create(timeout="5m")
    [lease] = service.objects("leases")
    service.cluster.outage(30)
    began = time.monotonic()
    assert sb.sh("echo works without the API").stdout == "works without the API\n"
    sb.fs.write_text("during.txt", "written during the outage\n")
    extended = sb.extend_timeout("7m").expires_at  # its record waits for the API server
    with pytest.raises(ServiceUnavailable, match="cannot be reached"):
        Sandbox.create(timeout="1m")
    assert time.monotonic() - began < 25, "a create fails within a bound, it does not hang"
    assert service.sandbox_ids() == {sb.id}, "a create that failed leaves nothing"
    second = wait_for(_created, 60, interval=1.0, message="a create to work after the outage")
    assert sb.info().status == "running"
    assert sb.fs.read_text("during.txt") == "written during the outage\n"
    wait_for(
        lambda: service.record(sb.id)["record"]["expires_at"] == extended,
        20,
        message="the record changed during the outage to reach the Secret",
    )
    # Renewing the instance's Lease failed all along, which did not stop the service:
    # it holds the Lease still, renewed again.
    assert "renewing the instance's lease failed" in service.log()
    [renewed] = service.objects("leases")
    assert renewed["spec"]["holderIdentity"] == lease["spec"]["holderIdentity"]
    assert renewed["spec"]["renewTime"] > lease["spec"]["renewTime"]
    # The pod watch is back: a deletion now is seen.
    service.cluster.delete("pods", service.pod(second.id)["metadata"]["name"])
    wait_for(lambda: second.info().status == "failed", 20, message="the deletion to be seen")
    second.kill()
    sb.kill()


def test_expired_watch_misses_no_deletion(kube_service_env: KubeService):
    service = kube_service_env
    sb = Sandbox.create(timeout="5m")
    lists = service.cluster.stats()["requests"].get("list pods", 0)
    service.cluster.expire_watches()
    service.cluster.delete("pods", service.pod(sb.id)["metadata"]["name"])
    wait_for(lambda: sb.info().status == "failed", 20, message="the deletion to be seen")
    assert service.cluster.stats()["requests"].get("list pods", 0) > lists, "it listed again"
    failure = sb.info().failure
    assert "deleted behind the service's back" in failure
    assert "emptyDir volume and is gone with the pod: no files are kept" in failure
    sb.kill()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _argv(pid: int) -> list[bytes]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")


def _created() -> Sandbox | None:
    try:
        return Sandbox.create(timeout="2m")
    except ServiceUnavailable:
        return None


def test_warm_pool_pods_are_claimed_refilled_and_drained(make_kube_service):
    service = make_kube_service(JUPYTER_SANDBOX_POOL="1")
    pooled = wait_for(lambda: _ready_sandboxes(service), 30, message="a pooled pod")
    sb = Sandbox.create(timeout="2m")
    assert {sb.id} == pooled, "the create took the pooled pod"
    assert sb.sh("echo from the pool").stdout == "from the pool\n"
    refilled = wait_for(lambda: _ready_sandboxes(service) - {sb.id}, 30, message="a refill")
    other = Sandbox.create(timeout="2m", cpus=0.5)  # a running pod cannot take other CPUs
    assert other.id not in refilled
    resources = service.pod(other.id)["spec"]["containers"][0]["resources"]
    assert resources["limits"]["cpu"] == "500m"
    sb.kill()
    other.kill()
    # The fixture's end stops the service, which drains the pool: nothing may be left.


def _ready_sandboxes(service: KubeService) -> set[str]:
    return {
        p["metadata"]["labels"]["jupyter-sandbox.io/sandbox"]
        for p in service.objects("pods")
        if any(
            c["type"] == "Ready" and c["status"] == "True"
            for c in p.get("status", {}).get("conditions", [])
        )
        and not p["metadata"].get("deletionTimestamp")
    }
