"""Sandboxes as agent-sandbox ``Sandbox`` resources (kubernetes-sigs/agent-sandbox).

With JUPYTER_SANDBOX_K8S_MODE=agent-sandbox each start of a sandbox is a
``agents.x-k8s.io/v1beta1`` Sandbox instead of a bare pod: its podTemplate is the pod
the pods mode would create, and the agent-sandbox controller makes that pod (named as
the Sandbox, with its labels) and deletes it with the Sandbox. Everything else (the
Secret, the PVC home, the pod watch, the TLS channel) is the same in both modes.

The controller recreates a Sandbox's pod that someone deletes; the backend tells the
new pod from the one it started by its uid, and fails the sandbox as in pods mode (its
processes are gone). The warm pool is the service's own (pooled Sandboxes, claimed by
their record), not a SandboxWarmPool.
"""

from __future__ import annotations

API_VERSION = "agents.x-k8s.io/v1beta1"
RESOURCE = "sandboxes"


def sandbox(pod: dict) -> dict:
    """The Sandbox whose controller runs `pod` (a pod body from ``objects.pod``)."""
    meta = pod["metadata"]
    return {
        "apiVersion": API_VERSION,
        "kind": "Sandbox",
        "metadata": dict(meta),
        "spec": {
            "podTemplate": {"metadata": {"labels": dict(meta["labels"])}, "spec": pod["spec"]},
            "operatingMode": "Running",
        },
    }


def missing(namespace: str, message: str) -> str:
    """What to do when the cluster has no Sandbox API."""
    return (
        f"JUPYTER_SANDBOX_K8S_MODE=agent-sandbox, but the cluster serves no {API_VERSION} "
        f"Sandbox resource in namespace {namespace} ({message}): install the agent-sandbox "
        "controller (kubernetes-sigs/agent-sandbox), or set JUPYTER_SANDBOX_K8S_MODE=pods"
    )
