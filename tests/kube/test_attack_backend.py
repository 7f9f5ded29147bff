"""Attacks and faults on the kubernetes backend as deployed: the real service (its own
process, under the Role of deploy/kubernetes/rbac.yaml) on the fake cluster, driven with
the real CLI and client, each test checking that nothing of it is left behind.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import wait_for
from tests.kube.conftest import running_fake_cluster
from tests.kube_fixtures import ROOT, KubeService, end_kube_service

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


PROBE = r"""
ls -A /var/run/secrets /run/secrets 2>&1
echo "--- env"; env
echo "--- host"; hostname; id -u
grep -E '^(CapEff|CapPrm|NoNewPrivs)' /proc/self/status
echo "--- environ"
for f in /proc/[0-9]*/environ; do tr '\0' '\n' < "$f" 2>/dev/null; done \
  | grep -c 'PRIVATE KEY' || true
echo "--- api"
python3 - "$API" <<'PY'
import sys, urllib.request, urllib.error
try:
    urllib.request.urlopen(sys.argv[1] + "/api/v1/namespaces/jupyter-sandbox/secrets", timeout=5)
    print("api: answered")
except urllib.error.HTTPError as e:
    print("api:", e.code)
except OSError as e:
    print("api: unreachable", e)
PY
"""


def test_inside_a_pod_no_token_no_keys_no_other_secret_and_the_spec_is_fenced(
    make_kube_service, fake_cluster
) -> None:
    from jupyter_sandbox import Sandbox

    service = make_kube_service(JUPYTER_SANDBOX_K8S_RUNTIME_CLASS="gvisor")
    other = create(service)
    server = yaml.safe_load(Path(fake_cluster.kubeconfig).read_text())["clusters"][0]
    with Sandbox.create(timeout="5m") as sandbox:
        out = sandbox.sh(PROBE, env={"API": server["cluster"]["server"]}).stdout
        mounts, rest = out.split("--- env\n")
        env, rest = rest.split("--- host\n")
        host, rest = rest.split("--- environ\n")
        environ, api = rest.split("--- api\n")
        assert "kubernetes.io" not in mounts, mounts
        assert "PRIVATE KEY" not in env and "BEGIN" not in env, env
        assert "JUPYTER_SANDBOX_AGENT" not in env, env
        lines = host.split()
        assert lines[0] == sandbox.id and lines[1] != "0", host
        assert "CapEff:\t0000000000000000" in host and "NoNewPrivs:\t1" in host, host
        assert environ.strip() == "0", "a process's environment holds a private key"
        # No token: the API server does not hand out another sandbox's Secret.
        assert api.strip() in ("api: 401", "api: 403") or "unreachable" in api, api
        spec = service.pod(sandbox.id)["spec"]
    assert spec["automountServiceAccountToken"] is False
    assert spec["runtimeClassName"] == "gvisor"
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    [container] = spec["containers"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert not [v for v in spec["volumes"] if "secret" in v or "projected" in v]
    assert all(
        "secretKeyRef" not in str(e)
        or e["valueFrom"]["secretKeyRef"]["key"] in ("agent-cert", "agent-key", "service-cert")
        for e in container["env"]
    )
    assert other != sandbox.id


def test_a_secret_of_another_name_claiming_a_sandbox_is_not_trusted_after_a_restart(
    make_kube_service,
) -> None:
    from jupyter_sandbox.backends.kubernetes.objects import secret
    from jupyter_sandbox.backends.tls import SandboxCredentials

    service = make_kube_service()
    victim = create(service)
    service.cli("exec", victim, "sh", "-c", "echo precious > notes.txt")
    # Someone who may create Secrets in the namespace makes one with the sandbox's labels,
    # its record, and TLS pairs of their own (listed after the sandbox's own Secret).
    pairs = SandboxCredentials.generate(victim)
    keys = {
        "agent-cert": pairs.agent_cert,
        "agent-key": pairs.agent_key,
        "service-cert": pairs.service_cert,
        "service-key": pairs.service_key,
        "record": service.secret_key(victim, "record"),
    }
    forged = secret(service.instance, victim, keys, None)
    forged["metadata"]["name"] = "zz-forged"
    service.create_object("secrets", forged)
    try:
        service.kill()
        service.start()
        # The sandbox is still reached with its own pairs, its files intact.
        done = service.cli("exec", victim, "cat", "notes.txt", check=False)
        assert done.returncode == 0 and done.stdout == "precious\n", done.stderr
    finally:
        service.cluster.delete("secrets", "zz-forged")


def test_pod_deleted_behind_the_service_while_a_command_streams(make_kube_service) -> None:
    service = make_kube_service()
    sandbox = create(service)
    command = [sys.executable, "-m", "jupyter_sandbox", "exec", sandbox]
    command += ["sh", "-c", "echo started; exec sleep 60"]
    with subprocess.Popen(
        command,
        env={**os.environ, **service.env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as streaming:
        assert streaming.stdout.readline() == "started\n"
        pod = service.pod(sandbox)["metadata"]["name"]
        # Its watch is expired (410: listed again) as the pod goes.
        service.cluster.expire_watches()
        service.cluster.delete("pods", pod, grace=0)
        _, stderr = streaming.communicate(timeout=30)
    assert streaming.returncode != 0 and "connection ended" in stderr, stderr
    # The next request says what happened, and what to do.
    done = service.cli("exec", sandbox, "true", check=False)
    assert done.returncode != 0
    assert "deleted behind the service's back" in done.stderr, done.stderr
    assert "its pod its pod" not in done.stderr and "kill it" in done.stderr, done.stderr


def test_service_killed_while_a_create_waits_for_its_pod_leaves_nothing(
    make_kube_service, fake_cluster
) -> None:
    service = make_kube_service()
    kept = create(service)
    service.cli("exec", kept, "sh", "-c", "echo kept > kept.txt")
    cpu = fake_cluster.node()["cpu"]
    fake_cluster.node(cpu="0")  # the next pod stays Pending: Unschedulable
    try:
        command = [sys.executable, "-m", "jupyter_sandbox", "create", "--timeout", "5m"]
        with subprocess.Popen(
            command, env={**os.environ, **service.env}, stdout=subprocess.DEVNULL
        ) as creating:
            wait_for(lambda: len(service.objects("pods")) == 2, 20, message="the second pod")
            # Its Secret and pod exist, its record does not: SIGKILL the service now.
            service.kill()
            creating.wait(30)
    finally:
        fake_cluster.node(cpu=f"{cpu}m")
    service.start()
    wait_for(lambda: service.sandbox_ids() == {kept}, 20, message="the unfinished start to go")
    wait_for(lambda: len(service.pod_processes()) == 1, 20, message="its pod's processes")
    assert [p.name for p in (service.storage / "sandboxes").iterdir()] == [kept]
    done = service.cli("exec", kept, "cat", "kept.txt")
    assert done.stdout == "kept\n"


def test_start_with_no_cluster_says_so_and_what_to_do(tmp_path: Path, fake_cluster) -> None:
    """A missing kubeconfig, an API server that does not answer, bad settings, no
    permission: the service does not start, and says why and what to do."""
    settings = [
        ({"KUBECONFIG": str(tmp_path / "no-such-kubeconfig")}, "set KUBECONFIG"),
        ({"KUBECONFIG": str(unreachable_kubeconfig(tmp_path))}, "cannot be reached"),
        # Bad settings, and a namespace the service's Role does not cover (403).
        ({"JUPYTER_SANDBOX_K8S_NAMESPACE": "Bad_Name"}, "not a valid Kubernetes name"),
        ({"JUPYTER_SANDBOX_K8S_NAMESPACE": "elsewhere"}, "Give its service account the Role"),
    ]
    for number, (env, said) in enumerate(settings):
        service = KubeService(fake_cluster, tmp_path / f"setting-{number}", env)
        with pytest.raises(AssertionError, match="the service exited at start") as failed:
            service.start()
        assert said in str(failed.value), str(failed.value)[-2000:]
        assert not service.leftovers()


def unreachable_kubeconfig(directory: Path) -> Path:
    """A kubeconfig naming a port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x",
    }
    path = directory / "unreachable.kubeconfig"
    directory.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config))
    return path


def lease_of(service: KubeService) -> dict:
    """The spec of the service's instance Lease."""
    [lease] = service.objects("leases")
    return lease["spec"]


def test_second_service_of_the_same_instance_is_refused(
    make_kube_service, fake_cluster, tmp_path: Path
) -> None:
    """A second service of one instance (replicas: 2, a rolling update) would adopt the
    first's sandboxes and end them; it is refused, and the first's sandboxes go on."""
    first = make_kube_service()
    sandbox = create(first)
    pod = first.pod(sandbox)["metadata"]["uid"]
    holder = lease_of(first)["holderIdentity"]
    second = KubeService(fake_cluster, tmp_path / "second", {})
    second.env["JUPYTER_SANDBOX_K8S_INSTANCE"] = second.instance = first.instance
    try:
        with pytest.raises(AssertionError) as refused:
            second.start()
    finally:
        second.stop()
    message = str(refused.value)
    assert f"another service of instance {first.instance} holds its lease" in message, message
    assert holder in message and "replicas: 1" in message, message
    # It waited one lease duration for the lease to lapse; it did not, nothing was adopted.
    assert lease_of(first)["holderIdentity"] == holder
    assert first.pod(sandbox)["metadata"]["uid"] == pod
    assert first.cli("exec", sandbox, "true").returncode == 0


def test_restart_after_sigkill_takes_the_lease_once_it_lapses(make_kube_service) -> None:
    service = make_kube_service()
    sandbox = create(service)
    before = lease_of(service)
    service.kill()
    service.start()
    after = lease_of(service)
    assert after["holderIdentity"] != before["holderIdentity"]
    assert after["leaseTransitions"] == before["leaseTransitions"] + 1
    assert "waiting up to 3 s for it to lapse" in service.log()
    # The new service adopted the sandbox it left.
    assert service.cli("exec", sandbox, "true").returncode == 0
    assert service.pod(sandbox)["metadata"]["name"].endswith("-0")


def test_service_whose_lease_another_takes_exits_and_its_sandboxes_run_on(
    make_kube_service,
) -> None:
    """Another service took the Lease (this one could not renew it in time): it must
    neither reap nor adopt any more, so it exits; the restarted one waits the other's
    Lease out and serves the sandboxes that ran all along."""
    service = make_kube_service()
    sandbox = create(service)
    pod = service.pod(sandbox)["metadata"]["uid"]

    def take() -> bool:  # as another service would: with the resourceVersion it read
        [lease] = service.objects("leases")
        lease["spec"]["holderIdentity"] = "intruder/1/0"
        try:
            service.replace_object("leases", lease)
        except httpx.HTTPStatusError as e:
            if e.response.status_code != 409:  # renewed meanwhile: read again
                raise
            return False
        return True

    wait_for(take, 10, message="the Lease to be taken")
    wait_for(lambda: service.proc.poll() is not None, 20, message="the service to exit")
    assert service.proc.returncode == 3
    assert "took its lease while this one could not renew it: exiting" in service.log()
    service.proc = None
    service.start()
    assert lease_of(service)["holderIdentity"] != "intruder/1/0"
    assert service.pod(sandbox)["metadata"]["uid"] == pod
    assert service.cli("exec", sandbox, "true").returncode == 0


def test_clean_stop_releases_the_lease_at_once(make_kube_service) -> None:
    service = make_kube_service()
    sandbox = create(service)
    service.stop()
    assert not lease_of(service).get("holderIdentity")
    service.start()
    assert "waiting up to" not in service.log()
    assert lease_of(service)["holderIdentity"]
    assert service.cli("exec", sandbox, "true").returncode == 0


def test_kill_while_the_api_server_hangs_removes_everything_once_it_is_back(
    make_kube_service, fake_cluster
) -> None:
    service = make_kube_service()
    sandbox = create(service)
    fake_cluster.outage(4, mode="hang")
    done = service.cli("kill", sandbox, check=False, timeout=60)
    assert done.returncode == 0, done.stderr
    listed = service.cli("list", "--json")
    assert sandbox not in listed.stdout
    wait_for(lambda: not service.leftovers(), 40, message="its objects to go")
    # The service still serves: a new sandbox starts.
    assert service.cli("exec", create(service), "true").returncode == 0


def test_damaged_record_in_a_secret_is_adopted_as_failed_kept_and_killable(
    make_kube_service,
) -> None:
    """A record that does not parse, on a fresh disk (a new service pod: only the
    records are left). With its database the service takes the sandbox from there."""
    service = make_kube_service()
    sandbox = create(service)
    other = create(service)
    damaged = base64.b64encode(b'{"id": "' + other.encode() + b'", "status": ').decode()

    service.kill()
    service.patch_object("secrets", f"jsb-{sandbox}", {"data": {"record": damaged}})
    database = Path(service.env["JUPYTER_DATA_DIR"]) / "sandbox" / "state.sqlite3"
    assert database.exists()
    shutil.rmtree(database.parent)
    service.start()
    # The other sandbox serves; the damaged one is known, failed, saying why and what to do.
    assert service.cli("exec", other, "true").returncode == 0
    done = service.cli("exec", sandbox, "true", check=False)
    assert done.returncode != 0 and "kill" in done.stderr, done.stderr
    assert service.secret_key(sandbox, "record-unreadable") == base64.b64decode(damaged)
    service.cli("kill", sandbox)
    wait_for(lambda: not service.leftovers_of(sandbox), 20, message="its objects to go")


def test_service_killed_while_a_kill_waits_for_the_api_server(
    make_kube_service, fake_cluster
) -> None:
    """A kill the API server could not carry out yet, then SIGKILL: the next service does
    not bring the sandbox back, and removes its objects."""
    service = make_kube_service()
    sandbox = create(service)
    fake_cluster.outage(5, mode="refuse")
    assert service.cli("kill", sandbox, check=False, timeout=60).returncode == 0
    service.kill()
    wait_for(lambda: api_answers(fake_cluster), 20, message="the API server to answer")
    service.start()
    assert sandbox not in service.cli("list", "--json").stdout
    wait_for(lambda: not service.leftovers(), 40, message="its objects to go")


def api_answers(cluster) -> bool:
    """Does the cluster's API port accept connections (no outage in refuse mode)?"""
    server = yaml.safe_load(Path(cluster.kubeconfig).read_text())["clusters"][0]["cluster"]
    address = httpx.URL(server["server"])
    try:
        socket.create_connection((address.host, address.port), timeout=1).close()
    except OSError:
        return False
    return True


def test_service_killed_during_the_restart_of_a_failed_pvc_sandbox_keeps_its_files(
    make_kube_service, fake_cluster
) -> None:
    service = make_kube_service(JUPYTER_SANDBOX_K8S_HOME="pvc")
    sandbox = create(service)
    service.cli("exec", sandbox, "sh", "-c", "echo precious > notes.txt")
    service.cluster.delete("pods", service.pod(sandbox)["metadata"]["name"], grace=0)
    wait_for(
        lambda: service.cli("exec", sandbox, "true", check=False).returncode != 0,
        20,
        message="the sandbox to fail",
    )
    cpu = fake_cluster.node()["cpu"]
    fake_cluster.node(cpu="0")  # the restarted pod stays Pending
    try:
        command = [sys.executable, "-m", "jupyter_sandbox", "restart", sandbox]
        with subprocess.Popen(
            command, env={**os.environ, **service.env}, stdout=subprocess.DEVNULL
        ) as restarting:
            wait_for(
                lambda: [
                    p
                    for p in service.of_sandbox("pods", sandbox)
                    if p["metadata"]["name"].endswith("-1")
                ],
                20,
                message="the restart's pod",
            )
            service.kill()
            restarting.wait(30)
    finally:
        fake_cluster.node(cpu=f"{cpu}m")
    service.start()
    assert service.of_sandbox("persistentvolumeclaims", sandbox)
    if service.cli("exec", sandbox, "true", check=False).returncode != 0:
        service.cli("restart", sandbox)
    assert service.cli("exec", sandbox, "cat", "notes.txt").stdout == "precious\n"
