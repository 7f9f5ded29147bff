"""Finding the objects of this instance that no sandbox record accounts for.

A service killed while it started a sandbox leaves a Secret, maybe a PVC and a pod
whose sandbox never got a record; a failed removal leaves some of them too. At every
service start (and periodically) each such object is deleted. An object of a
sandbox with a record is never touched: that sandbox is adopted.
"""

from __future__ import annotations

import calendar
import time
from collections.abc import Iterable

from . import objects
from .api import Api
from .watch import PodWatch


def age(body: dict, now: float | None = None) -> float:
    """Seconds since the object was created (0 if that is not known)."""
    created = body.get("metadata", {}).get("creationTimestamp")
    try:
        made = calendar.timegm(time.strptime(created, "%Y-%m-%dT%H:%M:%SZ"))
    except (TypeError, ValueError):
        return 0.0
    return max(0.0, (now or time.time()) - made)


class Inventory:
    """Every pod, Secret and PVC of the instance, by sandbox id."""

    def __init__(self) -> None:
        self.by_sandbox: dict[str, list[tuple[str, dict]]] = {}

    def add(self, resource: str, items: Iterable[dict]) -> None:
        for body in items:
            sandbox_id = body["metadata"].get("labels", {}).get(objects.SANDBOX)
            if sandbox_id:
                self.by_sandbox.setdefault(sandbox_id, []).append((resource, body))

    def recorded(self) -> set[str]:
        """Sandboxes whose Secret holds a record."""
        return {
            sandbox_id
            for sandbox_id, found in self.by_sandbox.items()
            if any(r == "secrets" and objects.decode(b, objects.RECORD_KEY) for r, b in found)
        }

    def unaccounted(
        self, keep: set[str], older_than: float = 0.0
    ) -> dict[str, list[tuple[str, str]]]:
        """(resource, name) of the objects of sandboxes that have no record, that `keep`
        does not name and whose every object is older than `older_than` seconds."""
        recorded = self.recorded()
        found = {}
        for sandbox_id, items in self.by_sandbox.items():
            if sandbox_id in keep or sandbox_id in recorded:
                continue
            if older_than and min(age(body) for _, body in items) < older_than:
                continue
            found[sandbox_id] = [(r, body["metadata"]["name"]) for r, body in items]
        return found


async def inventory(
    api: Api, watch: PodWatch, secrets: list[dict] | None = None, extra: tuple[str, ...] = ()
) -> Inventory:
    """What the instance has now: pods from the watch, Secrets, PVCs and the `extra`
    resources listed (the Secrets given, if a list of them was just made)."""
    found = Inventory()
    found.add("pods", watch.pods.values())
    if secrets is None:
        secrets = (await api.list("secrets", watch.selector)).get("items", [])
    found.add("secrets", secrets)
    for resource in ("persistentvolumeclaims", *extra):
        found.add(resource, (await api.list(resource, watch.selector)).get("items", []))
    return found
