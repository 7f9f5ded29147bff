"""Settings of the Kubernetes backend, from JUPYTER_SANDBOX_K8S_* environment variables.

* JUPYTER_SANDBOX_K8S_NAMESPACE: where sandboxes run (default: the service's own
  namespace when it runs in a cluster, else "default");
* JUPYTER_SANDBOX_K8S_IMAGE: the sandbox image, which must have python3 (default
  ``python:3.12-slim``);
* JUPYTER_SANDBOX_K8S_RUNTIME_CLASS: a RuntimeClass for sandbox pods (gVisor, Kata);
* JUPYTER_SANDBOX_K8S_HOME: ``emptydir`` (default) or ``pvc`` (a PersistentVolumeClaim
  per sandbox, kept until the sandbox ends). An emptyDir home lives and dies with its
  pod: when a sandbox fails (its pod deleted, evicted, out of memory) its files are
  gone, and its failure says so; a restart starts with an empty home. With ``pvc`` a
  failed sandbox's files stay readable and a restart finds them;
* JUPYTER_SANDBOX_K8S_STORAGE_CLASS: the claims' storage class (default: the cluster's);
* JUPYTER_SANDBOX_K8S_INSTANCE: tells this service's objects from another's in the same
  namespace (default "default");
* JUPYTER_SANDBOX_K8S_START_TIMEOUT: seconds a pod may take to become ready (120);
* JUPYTER_SANDBOX_K8S_LEASE_SECONDS: the duration of the instance's Lease (15), which one
  service of the instance holds at a time; a restart after a crash waits up to that;
* JUPYTER_SANDBOX_K8S_MODE: ``pods`` (default: the backend creates bare pods) or
  ``agent-sandbox`` (it creates agent-sandbox ``Sandbox`` resources, whose controller
  makes the pods; see ``agent_sandbox``).

The API server is reached with the kubeconfig of KUBECONFIG (or ~/.kube/config), else
with the service account of the pod the service runs in.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..._errors import InvalidRequest

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
HOMES = ("emptydir", "pvc")
MODES = ("pods", "agent-sandbox")
LABEL_VALUE_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?")
DNS_LABEL_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
DNS_NAME_RE = re.compile(r"[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?")


@dataclass(frozen=True)
class KubernetesSettings:
    """Where and how sandbox pods run."""

    namespace: str = "default"
    image: str = "python:3.12-slim"
    runtime_class: str | None = None
    home: str = "emptydir"
    storage_class: str | None = None
    instance: str = "default"
    start_timeout: float = 120.0
    mode: str = "pods"
    lease_seconds: int = 15

    def __post_init__(self) -> None:
        checks = (
            ("NAMESPACE", self.namespace, DNS_LABEL_RE),
            ("INSTANCE", self.instance, DNS_LABEL_RE),
            ("RUNTIME_CLASS", self.runtime_class, DNS_NAME_RE),
            ("STORAGE_CLASS", self.storage_class, DNS_NAME_RE),
        )
        for name, value, pattern in checks:
            if value is not None and not pattern.fullmatch(value):
                raise InvalidRequest(
                    f"JUPYTER_SANDBOX_K8S_{name}={value!r} is not a valid Kubernetes name: "
                    "use lowercase letters, digits and '-'"
                )
        if self.home not in HOMES:
            raise InvalidRequest(
                f"JUPYTER_SANDBOX_K8S_HOME={self.home!r}: expected one of {', '.join(HOMES)}"
            )
        if self.mode not in MODES:
            raise InvalidRequest(
                f"JUPYTER_SANDBOX_K8S_MODE={self.mode!r}: expected one of {', '.join(MODES)}"
            )
        if not self.image or any(c.isspace() for c in self.image):
            raise InvalidRequest(f"JUPYTER_SANDBOX_K8S_IMAGE={self.image!r} is not an image name")
        if not self.start_timeout > 0:
            raise InvalidRequest("JUPYTER_SANDBOX_K8S_START_TIMEOUT must be a positive number")
        if not self.lease_seconds > 0:
            raise InvalidRequest("JUPYTER_SANDBOX_K8S_LEASE_SECONDS must be a positive number")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> KubernetesSettings:
        """The settings the environment gives; InvalidRequest naming a bad one."""
        env = os.environ if environ is None else environ

        def get(name: str) -> str | None:
            return env.get(f"JUPYTER_SANDBOX_K8S_{name}") or None

        def number(name: str, parse: Callable[[str], Any], default: Any, what: str) -> Any:
            value = get(name)
            try:
                return parse(value) if value else default
            except ValueError:
                raise InvalidRequest(
                    f"JUPYTER_SANDBOX_K8S_{name}={value!r} is not {what}"
                ) from None

        start_timeout = number("START_TIMEOUT", float, cls.start_timeout, "a number of seconds")
        lease_seconds = number("LEASE_SECONDS", int, cls.lease_seconds, "a whole number of seconds")
        return cls(
            namespace=get("NAMESPACE") or own_namespace() or cls.namespace,
            image=get("IMAGE") or cls.image,
            runtime_class=get("RUNTIME_CLASS"),
            home=(get("HOME") or cls.home).lower(),
            storage_class=get("STORAGE_CLASS"),
            instance=get("INSTANCE") or cls.instance,
            start_timeout=start_timeout,
            mode=(get("MODE") or cls.mode).lower(),
            lease_seconds=lease_seconds,
        )


def own_namespace() -> str | None:
    """The namespace of the pod this process runs in, if it runs in one."""
    try:
        return (SERVICE_ACCOUNT / "namespace").read_text().strip() or None
    except OSError:
        return None


async def api_configuration():
    """The client configuration: the kubeconfig of KUBECONFIG (or ~/.kube/config), else
    the service account of the pod this process runs in. ConfigException (from
    kubernetes_asyncio) when there is neither."""
    from kubernetes_asyncio import client, config

    configuration = client.Configuration()
    path = os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
    if os.environ.get("KUBECONFIG") or os.path.exists(path):
        await config.load_kube_config(config_file=path, client_configuration=configuration)
    else:
        config.load_incluster_config(client_configuration=configuration)
    return configuration
