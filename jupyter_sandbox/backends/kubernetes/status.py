"""What a pod's status says, in words for the sandbox's user."""

from __future__ import annotations

# Waiting reasons after which a pod does not start without someone changing something.
STUCK = {
    "ErrImagePull": "its image cannot be pulled",
    "ImagePullBackOff": "its image cannot be pulled",
    "InvalidImageName": "its image name is invalid",
    "CreateContainerConfigError": "its container cannot be configured",
    "CreateContainerError": "its container cannot be created",
    "RunContainerError": "its container cannot be run",
}


def ready(pod: dict | None) -> bool:
    """Running, with its Ready condition true (its agent's port accepts)."""
    if pod is None or pod["metadata"].get("deletionTimestamp"):
        return False
    status = pod.get("status") or {}
    conditions = status.get("conditions") or []
    is_ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
    return status.get("phase") == "Running" and is_ready and bool(status.get("podIP"))


def ended(pod: dict | None) -> bool:
    """Gone, being deleted, or its container has ended (it never restarts)."""
    if pod is None or pod["metadata"].get("deletionTimestamp"):
        return True
    return (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed", "Unknown")


def stuck(pod: dict | None) -> str | None:
    """Why a pending pod will not start by itself (its image cannot be pulled...)."""
    waiting = _container(pod).get("state", {}).get("waiting") or {}
    reason = waiting.get("reason")
    if reason in STUCK:
        detail = waiting.get("message")
        return f"{STUCK[reason]} ({reason}{': ' + detail if detail else ''})"
    return None


def pending(pod: dict | None) -> str:
    """Where a pod that is not ready yet stands: its last condition or waiting reason."""
    if pod is None:
        return "the pod does not exist (any more)"
    status = pod.get("status") or {}
    waiting = _container(pod).get("state", {}).get("waiting") or {}
    if waiting.get("reason"):
        return _said(f"its container is waiting: {waiting['reason']}", waiting.get("message"))
    for condition in status.get("conditions") or []:
        if condition.get("status") != "True":
            what = condition.get("reason") or f"{condition.get('type')} is false"
            return _said(f"{condition.get('type')}: {what}", condition.get("message"))
    return f"phase {status.get('phase') or 'Pending'}"


def explain(pod: dict | None, memory: int | None, home: str, deleted_by_us: bool) -> str:
    """Why the sandbox of an ended pod can no longer serve (see `ended`)."""
    gone = "its home was an emptyDir volume and is gone with the pod: no files are kept"
    kept = gone if home == "emptydir" else "its home is kept on its PersistentVolumeClaim"
    if pod is None or pod["metadata"].get("deletionTimestamp"):
        which = f"its pod {pod['metadata']['name']}" if pod else "its pod"
        who = "by this service" if deleted_by_us else "behind the service's back"
        status = (pod or {}).get("status") or {}
        if status.get("reason") == "Evicted":
            return f"its pod was evicted ({status.get('message') or 'node pressure'}); {kept}"
        return f"{which} was deleted {who} (kubectl delete, a node drain...); {kept}"
    status = pod.get("status") or {}
    if status.get("reason") == "Evicted":
        return f"its pod was evicted ({status.get('message') or 'node pressure'}); {kept}"
    if status.get("phase") == "Unknown":
        return f"its node stopped reporting on its pod ({status.get('reason') or 'lost'}); {kept}"
    terminated = _container(pod).get("state", {}).get("terminated") or {}
    code, reason = terminated.get("exitCode"), terminated.get("reason")
    if reason == "OOMKilled":
        limit = f"limit {memory // (1 << 20)} MiB" if memory else "no limit of its own set"
        return f"out of memory: {limit} (its container was OOM-killed); {kept}"
    if code == 137 or terminated.get("signal") == 9:
        return f"its agent was killed (SIGKILL, exit status 137); {kept}"
    if code is not None:
        return f"its agent exited with status {code} ({reason or 'no reason given'}); {kept}"
    return f"its pod ended (phase {status.get('phase')}); {kept}"


def _container(pod: dict | None) -> dict:
    statuses = ((pod or {}).get("status") or {}).get("containerStatuses") or []
    return statuses[0] if statuses else {}


def _said(text: str, message: str | None) -> str:
    return f"{text} ({message})" if message else text
