"""The objects the Kubernetes backend builds match the pod shape of the design (no
cluster needed: these are pure functions)."""

from __future__ import annotations

import base64

import pytest

from jupyter_sandbox._errors import InvalidRequest
from jupyter_sandbox.backends.cgroups import Limits
from jupyter_sandbox.backends.kubernetes import agent_sandbox, objects, status
from jupyter_sandbox.backends.kubernetes.config import KubernetesSettings
from jupyter_sandbox.backends.local import write_etc

pytestmark = pytest.mark.unprivileged

ANCHOR = objects.Anchor("jupyter-sandbox-default", "uid-1")
LIMITS = Limits(memory=512 << 20, cpus=1.5, pids=100, fds=1000, disk=2 << 30)


def make_pod(**overrides) -> dict:
    settings = overrides.pop("settings", KubernetesSettings())
    args = dict(
        sandbox_id="sb-0123456789",
        generation=2,
        network="none",
        limits=LIMITS,
        code="jupyter-sandbox-agent-abc",
        anchor=ANCHOR,
    )
    return objects.pod(settings, **{**args, **overrides})


def test_pod_is_locked_down_as_the_design_says():
    pod = make_pod()
    spec = pod["spec"]
    assert pod["metadata"]["name"] == "jsb-sb-0123456789-2"
    assert spec["automountServiceAccountToken"] is False
    assert spec["enableServiceLinks"] is False
    assert spec["restartPolicy"] == "Never"
    assert spec["terminationGracePeriodSeconds"] == 5
    assert spec["hostname"] == "sb-0123456789"
    assert "runtimeClassName" not in spec
    assert spec["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 1000,
        "runAsGroup": 1000,
        "fsGroup": 1000,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    [container] = spec["containers"]
    assert container["name"] == "agent"
    assert container["image"] == "python:3.12-slim"
    assert container["command"] == [
        "python3", "-E", "-s", "-S", "/opt/jupyter-sandbox/agent/main.py", "--pod"
    ]  # fmt: skip
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": False,
    }
    assert container["ports"] == [{"containerPort": 7000, "name": "agent"}]
    assert container["readinessProbe"]["tcpSocket"] == {"port": 7000}


def test_resources_are_the_sandbox_limits_as_requests_and_limits():
    [container] = make_pod()["spec"]["containers"]
    wanted = {"memory": str(512 << 20), "cpu": "1500m", "ephemeral-storage": str(2 << 30)}
    assert container["resources"] == {"requests": wanted, "limits": wanted}
    [bare] = make_pod(limits=Limits())["spec"]["containers"]
    assert "resources" not in bare


def test_agent_gets_its_address_port_and_credentials_from_the_secret_only():
    [container] = make_pod()["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["JUPYTER_SANDBOX_AGENT_ADDRESS"]["valueFrom"] == {
        "fieldRef": {"fieldPath": "status.podIP"}
    }
    assert env["JUPYTER_SANDBOX_AGENT_PORT"]["value"] == "7000"
    names = ("CERT", "KEY", "PEER")
    refs = {
        name: env[f"JUPYTER_SANDBOX_AGENT_{name}"]["valueFrom"]["secretKeyRef"] for name in names
    }
    assert {r["name"] for r in refs.values()} == {"jsb-sb-0123456789"}
    assert [r["key"] for r in refs.values()] == ["agent-cert", "agent-key", "service-cert"]
    everything = repr(make_pod())
    assert "service-key" not in everything and "record" not in everything


def test_volumes_and_mounts():
    pod = make_pod()
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {m["mountPath"]: m for m in pod["spec"]["containers"][0]["volumeMounts"]}
    assert volumes[mounts["/opt/jupyter-sandbox/agent"]["name"]]["configMap"] == {
        "name": "jupyter-sandbox-agent-abc"
    }
    assert mounts["/opt/jupyter-sandbox/agent"]["readOnly"] is True
    assert "emptyDir" in volumes[mounts["/home/sandbox"]["name"]]
    assert volumes[mounts["/run/sandbox"]["name"]]["emptyDir"] == {"medium": "Memory"}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    pvc = make_pod(settings=KubernetesSettings(home="pvc"))
    home = {v["name"]: v for v in pvc["spec"]["volumes"]}["home"]
    assert home == {
        "name": "home",
        "persistentVolumeClaim": {"claimName": "jsb-sb-0123456789-home"},
    }


def test_passwd_and_group_name_uid_1000_as_on_the_local_backend(tmp_path):
    pod = make_pod(settings=KubernetesSettings(instance="lab"))
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {m["mountPath"]: m for m in pod["spec"]["containers"][0]["volumeMounts"]}
    accounts = objects.accounts("lab", ANCHOR)
    for key in ("passwd", "group"):
        mount = mounts[f"/etc/{key}"]
        assert (mount["subPath"], mount["readOnly"]) == (key, True)
        assert volumes[mount["name"]]["configMap"] == {"name": accounts["metadata"]["name"]}
    assert accounts["metadata"]["name"].startswith("jupyter-sandbox-lab-accounts-")
    assert accounts["metadata"]["ownerReferences"][0]["name"] == ANCHOR.name
    write_etc(tmp_path, "sb-0123456789")
    assert accounts["data"] == {key: (tmp_path / key).read_text() for key in ("passwd", "group")}
    sandbox = [line for line in accounts["data"]["passwd"].splitlines() if ":1000:" in line]
    assert sandbox == ["sandbox:x:1000:1000:Sandbox user:/home/sandbox:/bin/bash"]
    assert "sandbox:x:1000:" in accounts["data"]["group"].splitlines()


def test_options_runtime_class_image_files_only():
    settings = KubernetesSettings(runtime_class="gvisor", image="registry.example/py:3")
    pod = make_pod(settings=settings, files_only=True)
    assert pod["spec"]["runtimeClassName"] == "gvisor"
    assert pod["spec"]["containers"][0]["image"] == "registry.example/py:3"
    assert pod["spec"]["containers"][0]["command"][-2:] == ["--pod", "files-only"]


def test_every_object_is_labelled_and_owned_by_the_anchor():
    labels = {
        "app.kubernetes.io/managed-by": "jupyter-sandbox",
        "jupyter-sandbox.io/instance": "default",
        "jupyter-sandbox.io/sandbox": "sb-0123456789",
    }
    keys = {"agent-cert": b"A", "agent-key": b"K", "service-cert": b"S", "service-key": b"T"}
    built = [
        make_pod(),
        objects.secret("default", "sb-0123456789", keys, ANCHOR),
        objects.home_claim(KubernetesSettings(), "sb-0123456789", 1 << 30, ANCHOR),
    ]
    for body in built:
        assert labels.items() <= body["metadata"]["labels"].items()
        assert body["metadata"]["ownerReferences"] == [
            {"apiVersion": "v1", "kind": "ConfigMap", "name": ANCHOR.name, "uid": "uid-1"}
        ]
    assert built[0]["metadata"]["labels"]["jupyter-sandbox.io/network"] == "none"
    shared = [
        objects.agent_code("default", {"main.py": "x"}, ANCHOR),
        objects.ingress_policy("default", ANCHOR),
        objects.no_egress_policy("default", ANCHOR),
    ]
    for body in shared:
        assert body["metadata"]["ownerReferences"][0]["name"] == "jupyter-sandbox-default"
    anchor = objects.anchor_config_map("default")
    assert anchor["metadata"]["name"] == "jupyter-sandbox-default"
    assert "ownerReferences" not in anchor["metadata"]


def test_secret_holds_the_pairs_base64():
    keys = {"agent-cert": b"A", "agent-key": b"K", "service-cert": b"S", "service-key": b"T"}
    body = objects.secret("default", "sb-0123456789", keys, ANCHOR)
    assert body["metadata"]["name"] == "jsb-sb-0123456789"
    assert body["type"] == "Opaque"
    assert {k: base64.b64decode(v) for k, v in body["data"].items()} == keys
    assert objects.decode(body, "agent-key") == b"K"
    assert objects.decode(body, "record") is None


def test_agent_code_is_named_by_its_sources():
    one = objects.agent_code("default", {"main.py": "a", "protocol.py": "b"}, ANCHOR)
    same = objects.agent_code("default", {"protocol.py": "b", "main.py": "a"}, ANCHOR)
    other = objects.agent_code("default", {"main.py": "a", "protocol.py": "c"}, ANCHOR)
    assert one["metadata"]["name"] == same["metadata"]["name"] != other["metadata"]["name"]
    assert one["metadata"]["name"].startswith("jupyter-sandbox-agent-")
    assert len(one["metadata"]["name"]) == len("jupyter-sandbox-agent-") + 12
    assert one["data"] == {"main.py": "a", "protocol.py": "b"}


def test_network_policies():
    ingress = objects.ingress_policy("default", ANCHOR)
    assert ingress["metadata"]["name"] == "jupyter-sandbox-ingress"
    assert ingress["spec"]["ingress"] == [
        {
            "from": [{"podSelector": {"matchLabels": {"jupyter-sandbox.io/role": "service"}}}],
            "ports": [{"protocol": "TCP", "port": 7000}],
        }
    ]
    egress = objects.no_egress_policy("default", ANCHOR)
    assert egress["metadata"]["name"] == "jupyter-sandbox-no-egress"
    assert egress["spec"]["podSelector"]["matchLabels"]["jupyter-sandbox.io/network"] == "none"
    assert egress["spec"]["policyTypes"] == ["Egress"]
    assert egress["spec"]["egress"] == []


def test_settings_from_env_and_their_errors(tmp_path, monkeypatch):
    monkeypatch.setattr("jupyter_sandbox.backends.kubernetes.config.SERVICE_ACCOUNT", tmp_path)
    assert KubernetesSettings.from_env({}).namespace == "default"
    (tmp_path / "namespace").write_text("course-1\n")
    assert KubernetesSettings.from_env({}).namespace == "course-1"
    env = {
        "JUPYTER_SANDBOX_K8S_NAMESPACE": "sandboxes",
        "JUPYTER_SANDBOX_K8S_IMAGE": "python:3.13-slim",
        "JUPYTER_SANDBOX_K8S_RUNTIME_CLASS": "kata",
        "JUPYTER_SANDBOX_K8S_HOME": "PVC",
        "JUPYTER_SANDBOX_K8S_STORAGE_CLASS": "fast",
        "JUPYTER_SANDBOX_K8S_INSTANCE": "course-1",
        "JUPYTER_SANDBOX_K8S_START_TIMEOUT": "30",
        "JUPYTER_SANDBOX_K8S_MODE": "agent-sandbox",
    }
    assert KubernetesSettings.from_env(env) == KubernetesSettings(
        "sandboxes", "python:3.13-slim", "kata", "pvc", "fast", "course-1", 30.0, "agent-sandbox"
    )
    bad_values = [
        ("HOME", "nfs"), ("INSTANCE", "Not_A_Name"), ("START_TIMEOUT", "soon"), ("MODE", "vm")
    ]  # fmt: skip
    for name, bad in bad_values:
        with pytest.raises(InvalidRequest, match=f"JUPYTER_SANDBOX_K8S_{name}"):
            KubernetesSettings.from_env({f"JUPYTER_SANDBOX_K8S_{name}": bad})


def pod_with(phase="Running", ready=True, terminated=None, waiting=None, **extra) -> dict:
    container: dict = {"state": {}}
    if terminated:
        container["state"]["terminated"] = terminated
    if waiting:
        container["state"]["waiting"] = waiting
    conditions = [{"type": "Ready", "status": "True" if ready else "False"}]
    body = {
        "metadata": {"name": "jsb-sb-0123456789-0"},
        "status": {"phase": phase, "podIP": "10.0.0.5", "conditions": conditions,
                   "containerStatuses": [container], **extra},
    }  # fmt: skip
    return body


def test_pod_status_in_words():
    assert status.ready(pod_with()) and not status.ended(pod_with())
    assert not status.ready(pod_with(ready=False))
    assert status.ended(None) and status.ended(pod_with("Failed"))
    oom = pod_with("Failed", terminated={"exitCode": 137, "reason": "OOMKilled"})
    assert status.explain(oom, 256 << 20, "emptydir", False).startswith(
        "out of memory: limit 256 MiB"
    )
    assert "no files are kept" in status.explain(oom, 256 << 20, "emptydir", False)
    killed = pod_with("Failed", terminated={"exitCode": 137, "reason": "Error"})
    assert "SIGKILL" in status.explain(killed, None, "pvc", False)
    assert "PersistentVolumeClaim" in status.explain(killed, None, "pvc", False)
    evicted = pod_with("Failed", reason="Evicted", message="low on ephemeral-storage")
    assert "evicted (low on ephemeral-storage)" in status.explain(evicted, None, "pvc", False)
    assert "behind the service's back" in status.explain(None, None, "pvc", False)
    pull = pod_with("Pending", ready=False, waiting={"reason": "ImagePullBackOff"})
    assert "image cannot be pulled" in status.stuck(pull)
    unschedulable = pod_with("Pending", ready=False)
    unschedulable["status"]["conditions"] = [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
         "message": "0/3 nodes have enough memory"}
    ]  # fmt: skip
    assert status.stuck(unschedulable) is None
    assert status.pending(unschedulable) == (
        "PodScheduled: Unschedulable (0/3 nodes have enough memory)"
    )


def test_agent_sandbox_wraps_the_same_pod():
    pod = make_pod()
    resource = agent_sandbox.sandbox(pod)
    assert resource["apiVersion"] == "agents.x-k8s.io/v1beta1"
    assert resource["kind"] == "Sandbox"
    assert resource["metadata"] == pod["metadata"]
    assert resource["spec"]["podTemplate"] == {
        "metadata": {"labels": pod["metadata"]["labels"]},
        "spec": pod["spec"],
    }
