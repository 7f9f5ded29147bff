"""One watch of the instance's pods, kept as a cache of pods by name; no polling.

It lists, then watches from the list's resourceVersion (with bookmarks). A watch the
server ends is resumed from the last version seen; an expired version (410 Gone)
means a fresh list, and every cached pod that list lacks is taken as deleted, so no
deletion is missed. While the API server cannot be reached the cache keeps what it
last knew (running sandboxes keep working: their agents are reached directly) and the
watch retries with a growing delay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from .api import Api, ApiError, ApiUnreachable
from .objects import SANDBOX

log = logging.getLogger("jupyter_sandbox.service")

WATCH_SECONDS = 300  # how long one watch request lasts before it is renewed
# Seconds of silence after which a watch is taken for cut: the API server sends a bookmark
# about every minute, so a partition that keeps the connection open is noticed.
WATCH_IDLE = 90.0
RETRY_FIRST, RETRY_MAX = 0.2, 5.0  # seconds between attempts while the server is away


class PodWatch:
    """The pods of one labelSelector, as the API server last told them."""

    def __init__(self, api: Api, selector: str) -> None:
        self.api = api
        self.selector = selector
        self.pods: dict[str, dict] = {}
        self.version = ""
        self.connected = False  # False while the server cannot be reached
        self._changes: dict[str, asyncio.Event] = {}
        self._task: asyncio.Task | None = None
        self.events = 0  # watch events received (bookmarks included)
        self.relists = 0

    async def start(self) -> None:
        """List the pods (ApiError if that fails), then keep watching in the background."""
        await self._list()
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    # -- what it knows -------------------------------------------------------------------

    def of_sandbox(self, sandbox_id: str) -> list[dict]:
        return [
            pod
            for pod in self.pods.values()
            if pod["metadata"].get("labels", {}).get(SANDBOX) == sandbox_id
        ]

    async def wait(
        self, name: str, done: Callable[[dict | None], bool], timeout: float
    ) -> dict | None:
        """The pod `name` once `done(pod)` holds (`pod` is None once it is gone);
        asyncio.TimeoutError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            pod = self.pods.get(name)
            if done(pod):
                return pod
            changed = self._changes.setdefault(name, asyncio.Event())
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise asyncio.TimeoutError
            await asyncio.wait_for(changed.wait(), remaining)

    # -- keeping it ----------------------------------------------------------------------

    async def _list(self) -> None:
        answer = await self.api.list("pods", self.selector)
        listed = {pod["metadata"]["name"]: pod for pod in answer.get("items", [])}
        for name in set(self.pods) - set(listed):
            self._apply("DELETED", self.pods[name])
        for pod in listed.values():
            self._apply("MODIFIED", pod)
        self.version = answer.get("metadata", {}).get("resourceVersion", "")
        self.relists += 1
        if not self.connected:
            self.connected = True
            log.info("pod watch: listed %d pod(s) from the Kubernetes API server", len(listed))

    def _apply(self, kind: str, pod: dict) -> None:
        name = pod["metadata"]["name"]
        if kind == "DELETED":
            self.pods.pop(name, None)
        else:
            self.pods[name] = pod
        changed = self._changes.pop(name, None)
        if changed is not None:
            changed.set()

    async def _run(self) -> None:
        delay = RETRY_FIRST
        listed = True
        while True:
            began = time.monotonic()
            try:
                if not listed:
                    await self._list()
                    listed = True
                await self._follow()
                if time.monotonic() - began > 1:
                    delay = RETRY_FIRST
                    continue  # the server ended a watch that lasted: resume at once
            except ApiUnreachable as e:
                if self.connected:
                    log.warning("pod watch: %s; retrying", e.message)
                self.connected = False
            except ApiError as e:
                listed = False
                if e.status == 410:  # its version was compacted: list again, miss nothing
                    continue
                log.warning("pod watch failed (%s %s): %s; retrying", e.status, e.reason, e.message)
            except Exception:
                log.exception("pod watch failed; listing again")
                listed = False
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)

    async def _follow(self) -> None:
        """One watch request, from the last version, until the server ends it."""
        async for event in self.api.watch(
            "pods", self.selector, self.version, WATCH_SECONDS, WATCH_IDLE
        ):
            if not self.connected:
                self.connected = True
                log.info("pod watch: the Kubernetes API server answers again")
            self.events += 1
            pod = event.get("object") or {}
            version = pod.get("metadata", {}).get("resourceVersion")
            if event.get("type") in ("ADDED", "MODIFIED", "DELETED"):
                self._apply(event["type"], pod)
            if version:
                self.version = version
