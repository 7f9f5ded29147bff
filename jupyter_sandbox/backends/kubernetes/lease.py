"""The instance's Lease: one service of an instance at a time.

Two services of one instance (a Deployment scaled to 2, a rolling update) would adopt
each other's sandboxes from their Secrets and end the other's live sandboxes whose
leases they never see renewed. So the service holds a coordination.k8s.io/v1 Lease
named after the instance, renews it every third of its duration (replace with the
resourceVersion read: a 409 means someone else wrote it), and releases it on a clean
stop. A service finding it held by another waits up to one duration for it to lapse
(the holder was SIGKILLed), then refuses to start. A Lease is "lapsed" when its
renewTime plus duration is past, or when this process saw it unchanged for a whole
duration (which does not trust the other node's clock).

An API outage never ends the service: only a Lease found held by someone else does.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from datetime import datetime, timezone

from ..._errors import IsolationUnavailable
from . import objects
from .api import Api, ApiError

log = logging.getLogger("jupyter_sandbox.service")

RESOURCE = "leases"


def micro_time(at: float) -> str:
    """A Kubernetes MicroTime (RFC 3339 with microseconds, UTC)."""
    return datetime.fromtimestamp(at, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def identity() -> str:
    """This service: its pod (or host) name, pid and a random part."""
    host = os.environ.get("HOSTNAME") or socket.gethostname()
    return f"{host}/{os.getpid()}/{secrets.token_hex(4)}"


class InstanceLease:
    """Takes, renews and releases the instance's Lease."""

    def __init__(
        self,
        api: Api,
        instance: str,
        anchor: objects.Anchor,
        duration: int,
        lost: Callable[[str], None],
    ) -> None:
        self.api = api
        self.instance = instance
        self.name = anchor.name
        self.anchor = anchor
        self.duration = duration
        self.every = max(duration / 3, 0.2)
        self.holder = identity()
        self.lost = lost  # called once the Lease is found held by another service
        self.body: dict | None = None  # the Lease as last written by this service

    async def acquire(self) -> None:
        """Take the Lease, waiting up to one duration for another holder's to lapse;
        IsolationUnavailable naming that holder if it does not."""
        watched: tuple[str, str] | None = None  # (holder, renewTime) as last seen
        since = began = time.monotonic()  # since when unchanged; since when waiting
        waited = False
        while True:
            current = await self._read()
            if current is None:
                if await self._write(None):
                    return
                continue
            spec = current.get("spec") or {}
            duration = self._duration_of(spec)
            seen = (spec.get("holderIdentity") or "", spec.get("renewTime") or "")
            if seen != watched:
                watched, since = seen, time.monotonic()
            lapsed = time.monotonic() - since >= duration
            if self._free(spec) or lapsed:
                if await self._write(current):
                    return
                continue
            if time.monotonic() - began >= duration * 4 / 3:
                raise IsolationUnavailable(self._refusal(*seen))
            if not waited:
                log.info(
                    "the lease of instance %s is held by %s: waiting up to %d s for it to lapse",
                    self.instance,
                    seen[0],
                    duration,
                )
                waited = True
            await asyncio.sleep(duration / 3)

    def _duration_of(self, spec: dict) -> float:
        """The holder's lease duration (its own, which may not be this service's)."""
        duration = spec.get("leaseDurationSeconds")
        return duration if isinstance(duration, int) and duration > 0 else self.duration

    def _free(self, spec: dict) -> bool:
        if not spec.get("holderIdentity"):
            return True
        renewed = parse_time(spec.get("renewTime") or spec.get("acquireTime"))
        return renewed is None or renewed + self._duration_of(spec) < time.time()

    def _refusal(self, holder: str, renewed: str) -> str:
        at = parse_time(renewed)
        ago = f"renewed {max(time.time() - at, 0):.0f} s ago" if at else "never renewed"
        return (
            f"another service of instance {self.instance} holds its lease (holder {holder}, "
            f"{ago}, Lease {self.name}): run one replica per instance (Deployment replicas: "
            "1, strategy Recreate) or give this one another JUPYTER_SANDBOX_K8S_INSTANCE"
        )

    async def _read(self) -> dict | None:
        try:
            return await self.api.get(RESOURCE, self.name)
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    async def _write(self, current: dict | None) -> bool:
        """Make this service the holder (create, or replace `current`); False on a
        conflict (someone wrote it meanwhile: read again)."""
        now = micro_time(time.time())
        spec = (current or {}).get("spec") or {}
        transitions = spec.get("leaseTransitions") or 0
        ours = spec.get("holderIdentity") == self.holder
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": self.name,
                "labels": objects.instance_labels(self.instance),
                "ownerReferences": [self.anchor.reference()],
            },
            "spec": {
                "holderIdentity": self.holder,
                "leaseDurationSeconds": self.duration,
                "acquireTime": spec.get("acquireTime") if ours else now,
                "renewTime": now,
                "leaseTransitions": transitions if ours or current is None else transitions + 1,
            },
        }
        try:
            if current is None:
                self.body = await self.api.create(RESOURCE, body)
            else:
                body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
                self.body = await self.api.replace(RESOURCE, body)
        except ApiError as e:
            if e.status == 409:
                return False
            raise
        return True

    async def keep(self) -> None:
        """Renew every third of the duration until cancelled. Failures to reach the API
        are logged and retried; a Lease held by another calls `lost`."""
        failing = False
        while True:
            await asyncio.sleep(self.every)
            try:
                await self._renew()
                if failing:
                    log.info("the instance's lease %s is renewed again", self.name)
                failing = False
            except ApiError as e:
                if not failing:
                    log.warning("renewing the instance's lease failed (%s); retrying", e.message)
                failing = True

    async def _renew(self) -> None:
        while True:
            current = self.body
            if current is not None and await self._write(current):
                return
            current = await self._read()
            if current is None:  # deleted: take it again
                self.body = None
                if await self._write(None):
                    return
                continue
            holder = (current.get("spec") or {}).get("holderIdentity") or ""
            if holder and holder != self.holder:
                self.lost(holder)
                return
            self.body = current

    async def release(self) -> None:
        """Give the Lease up (a restart need not wait for it to lapse); best effort."""
        if self.body is None:
            return
        body = dict(self.body)
        body["spec"] = {**body["spec"], "holderIdentity": None, "renewTime": None}
        try:
            await self.api.replace(RESOURCE, body)
        except ApiError as e:
            log.warning(
                "releasing the instance's lease failed (%s): a restart waits %d s for it to lapse",
                e.message,
                self.duration,
            )
