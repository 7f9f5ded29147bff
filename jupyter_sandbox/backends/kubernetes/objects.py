"""The Kubernetes objects of a sandbox, as plain JSON-able dicts (no API calls here).

Every object carries the instance's labels and an ownerReference to the instance's
anchor ConfigMap, so uninstalling (deleting the anchor) lets Kubernetes remove them
all. No pod owns a Secret or a PVC: a pod deleted behind the service's back takes
neither the sandbox's record nor its home with it.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass

from ...agent import protocol
from ..accounts import account_files
from ..cgroups import Limits
from .config import KubernetesSettings

MANAGED_BY = "app.kubernetes.io/managed-by"
INSTANCE = "jupyter-sandbox.io/instance"
SANDBOX = "jupyter-sandbox.io/sandbox"
POOLED = "jupyter-sandbox.io/pooled"
NETWORK = "jupyter-sandbox.io/network"
ROLE = "jupyter-sandbox.io/role"
MANAGER = "jupyter-sandbox"
AGENT_PORT = 7000
AGENT_DIR = protocol.POD_AGENT_DIR
HOME = "/home/sandbox"
STATE = "/run/sandbox"
UID = 1000
CERT_KEYS = {  # the agent's environment variable -> the Secret's key
    "JUPYTER_SANDBOX_AGENT_CERT": "agent-cert",
    "JUPYTER_SANDBOX_AGENT_KEY": "agent-key",
    "JUPYTER_SANDBOX_AGENT_PEER": "service-cert",
}
RECORD_KEY = "record"


@dataclass(frozen=True)
class Anchor:
    """The instance's anchor ConfigMap, as an ownerReference needs it."""

    name: str
    uid: str

    def reference(self) -> dict:
        return {"apiVersion": "v1", "kind": "ConfigMap", "name": self.name, "uid": self.uid}


def anchor_name(instance: str) -> str:
    return f"jupyter-sandbox-{instance}"


def shared_name(instance: str, what: str) -> str:
    """The name of an object the instance shares among its sandboxes (a NetworkPolicy,
    the agent code). Each instance has its own: another instance's policy selects only
    that instance's pods, and its objects go when that instance is uninstalled. The
    default instance keeps the unprefixed names it always had."""
    return (
        f"jupyter-sandbox-{what}" if instance == "default" else f"jupyter-sandbox-{instance}-{what}"
    )


def secret_name(sandbox_id: str) -> str:
    return f"jsb-{sandbox_id}"


def pvc_name(sandbox_id: str) -> str:
    return f"jsb-{sandbox_id}-home"


def pod_name(sandbox_id: str, generation: int) -> str:
    return f"jsb-{sandbox_id}-{generation}"


def generation_of(pod: dict) -> int | None:
    """The start a pod of this backend belongs to (0, 1, ...), from its name."""
    name = pod["metadata"]["name"]
    sandbox_id = pod["metadata"].get("labels", {}).get(SANDBOX, "")
    prefix = f"jsb-{sandbox_id}-"
    number = name[len(prefix) :] if name.startswith(prefix) else ""
    return int(number) if number.isdigit() else None


def instance_labels(instance: str) -> dict[str, str]:
    return {MANAGED_BY: MANAGER, INSTANCE: instance}


def selector(instance: str) -> str:
    """The labelSelector of every object of this instance."""
    return ",".join(f"{k}={v}" for k, v in instance_labels(instance).items())


def sandbox_labels(
    instance: str, sandbox_id: str, network: str | None = None, pooled: bool = False
) -> dict[str, str]:
    labels = {**instance_labels(instance), SANDBOX: sandbox_id}
    if network is not None:
        labels[NETWORK] = network
    if pooled:
        labels[POOLED] = "true"
    return labels


def metadata(name: str, labels: dict[str, str], anchor: Anchor | None) -> dict:
    meta: dict = {"name": name, "labels": labels}
    if anchor is not None:
        meta["ownerReferences"] = [anchor.reference()]
    return meta


def anchor_config_map(instance: str) -> dict:
    """The anchor: owner of every other object of the instance."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(anchor_name(instance), instance_labels(instance), None),
        "data": {
            "about": "Owner of this jupyter-sandbox instance's objects: deleting it "
            "deletes every sandbox pod, Secret and PVC of the instance."
        },
    }


def _digest(files: dict[str, str]) -> str:
    """12 hex digits naming `files`' contents (a changed file gets a new object)."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(f"{name}\0{len(files[name])}\0{files[name]}".encode())
    return digest.hexdigest()[:12]


def agent_code_name(instance: str, sources: dict[str, str]) -> str:
    return shared_name(instance, f"agent-{_digest(sources)}")


def agent_code(instance: str, sources: dict[str, str], anchor: Anchor) -> dict:
    """The agent's modules by file name; its name changes with their contents."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(agent_code_name(instance, sources), instance_labels(instance), anchor),
        "data": dict(sources),
    }


def accounts_name(instance: str) -> str:
    return shared_name(instance, f"accounts-{_digest(account_files())}")


def accounts(instance: str, anchor: Anchor) -> dict:
    """The passwd and group files naming uid 1000 `sandbox`, as the local backend's
    (an image such as python:3.12-slim has no user 1000); each pod mounts them over
    /etc/passwd and /etc/group."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(accounts_name(instance), instance_labels(instance), anchor),
        "data": account_files(),
    }


def secret(
    instance: str, sandbox_id: str, keys: dict[str, bytes], anchor: Anchor, pooled: bool = False
) -> dict:
    """The sandbox's Secret: the TLS pairs of its agent and the service, its record."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": metadata(
            secret_name(sandbox_id), sandbox_labels(instance, sandbox_id, pooled=pooled), anchor
        ),
        "data": {key: encode(value) for key, value in keys.items()},
    }


def encode(value: bytes) -> str:
    return base64.b64encode(value).decode()


def decode(secret_object: dict, key: str) -> bytes | None:
    value = (secret_object.get("data") or {}).get(key)
    return None if value is None else base64.b64decode(value)


def home_claim(settings: KubernetesSettings, sandbox_id: str, size: int, anchor: Anchor) -> dict:
    """The PVC holding a sandbox's home (JUPYTER_SANDBOX_K8S_HOME=pvc)."""
    spec: dict = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": str(size)}},
    }
    if settings.storage_class:
        spec["storageClassName"] = settings.storage_class
    labels = sandbox_labels(settings.instance, sandbox_id)
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": metadata(pvc_name(sandbox_id), labels, anchor),
        "spec": spec,
    }


def resources(limits: Limits) -> dict:
    """Requests equal to limits (the Guaranteed class when memory and CPU are both set)."""
    amounts = {}
    if limits.memory:
        amounts["memory"] = str(limits.memory)
    if limits.cpus:
        amounts["cpu"] = f"{max(1, round(limits.cpus * 1000))}m"
    if limits.disk:
        amounts["ephemeral-storage"] = str(limits.disk)
    return {"requests": dict(amounts), "limits": dict(amounts)} if amounts else {}


def pod(
    settings: KubernetesSettings,
    *,
    sandbox_id: str,
    generation: int,
    network: str,
    limits: Limits,
    code: str,
    anchor: Anchor,
    files_only: bool = False,
    pooled: bool = False,
) -> dict:
    """The pod of one start of a sandbox: its agent as pid 1, reachable on AGENT_PORT."""
    command = ["python3", "-E", "-s", "-S", f"{AGENT_DIR}/main.py", "--pod"]
    env = [
        {
            "name": "JUPYTER_SANDBOX_AGENT_ADDRESS",
            "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}},
        },
        {"name": "JUPYTER_SANDBOX_AGENT_PORT", "value": str(AGENT_PORT)},
    ]
    env += [
        {"name": name, "valueFrom": {"secretKeyRef": {"name": secret_name(sandbox_id), "key": key}}}
        for name, key in CERT_KEYS.items()
    ]
    if settings.home == "pvc":
        home = {"name": "home", "persistentVolumeClaim": {"claimName": pvc_name(sandbox_id)}}
    else:
        home = {"name": "home", "emptyDir": {}}
        if limits.disk:
            home["emptyDir"]["sizeLimit"] = str(limits.disk)
    container = {
        "name": "agent",
        "image": settings.image,
        "command": [*command, "files-only"] if files_only else command,
        "env": env,
        "ports": [{"containerPort": AGENT_PORT, "name": "agent"}],
        "readinessProbe": {"tcpSocket": {"port": AGENT_PORT}, "periodSeconds": 1},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": False,
        },
        "volumeMounts": [
            {"name": "agent", "mountPath": AGENT_DIR, "readOnly": True},
            {"name": "home", "mountPath": HOME},
            {"name": "state", "mountPath": STATE},
            {"name": "tmp", "mountPath": "/tmp"},
            *(
                {"name": "accounts", "mountPath": f"/etc/{key}", "subPath": key, "readOnly": True}
                for key in account_files()
            ),
        ],
        "workingDir": HOME,
    }
    limits_of = resources(limits)
    if limits_of:
        container["resources"] = limits_of
    spec: dict = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 5,
        "hostname": sandbox_id,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": UID,
            "runAsGroup": UID,
            "fsGroup": UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            {"name": "agent", "configMap": {"name": code}},
            home,
            {"name": "state", "emptyDir": {"medium": "Memory"}},
            {"name": "tmp", "emptyDir": {}},
            {"name": "accounts", "configMap": {"name": accounts_name(settings.instance)}},
        ],
    }
    if settings.runtime_class:
        spec["runtimeClassName"] = settings.runtime_class
    labels = sandbox_labels(settings.instance, sandbox_id, network, pooled)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata(pod_name(sandbox_id, generation), labels, anchor),
        "spec": spec,
    }


def ingress_policy(instance: str, anchor: Anchor) -> dict:
    """Sandbox pods accept TCP to their agent from the service and gateway pods only."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata(shared_name(instance, "ingress"), instance_labels(instance), anchor),
        "spec": {
            "podSelector": {
                "matchLabels": instance_labels(instance),
                "matchExpressions": [{"key": SANDBOX, "operator": "Exists"}],
            },
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [{"podSelector": {"matchLabels": {ROLE: "service"}}}],
                    "ports": [{"protocol": "TCP", "port": AGENT_PORT}],
                }
            ],
        },
    }


def no_egress_policy(instance: str, anchor: Anchor) -> dict:
    """Sandbox pods with network "none" reach nothing."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata(shared_name(instance, "no-egress"), instance_labels(instance), anchor),
        "spec": {
            "podSelector": {"matchLabels": {**instance_labels(instance), NETWORK: "none"}},
            "policyTypes": ["Egress"],
            "egress": [],
        },
    }
