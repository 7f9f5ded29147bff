"""End a kernel's "session" sandboxes when that kernel shuts down or restarts.

Kernel sandboxes carry ``labels={"kernel": <kernel id>}``. Their lease would
expire on its own once the kernel stops renewing it; this makes the end
immediate. The server's kernel_actions events cover shutdowns and restarts;
a timer catches kernels that vanished without one.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from .._errors import SandboxError, SandboxExpired, SandboxNotFound
from ..client import AsyncSandbox

KERNEL_ACTIONS = "https://events.jupyter.org/jupyter_server/kernel_actions/v1"
REAPED_ACTIONS = ("shutdown", "restart")


class KernelReaper:
    """Kills the "session" sandboxes of kernels that are gone."""

    def __init__(self, kernel_ids: Callable[[], list[str]], log: logging.Logger) -> None:
        self._kernel_ids = kernel_ids
        self.log = log
        self._seen: set[str] = set(kernel_ids())

    async def on_kernel_action(self, logger: Any, schema_id: str, data: dict[str, Any]) -> None:
        """jupyter_events listener for kernel_actions."""
        kernel_id = data.get("kernel_id")
        if data.get("status") != "success" or not kernel_id:
            return
        if data.get("action") == "start":
            self._seen.add(kernel_id)
        elif data.get("action") in REAPED_ACTIONS:
            try:
                await self.reap({kernel_id}, before=time.time())
            except SandboxError as e:
                self.log.warning("could not end the sandboxes of kernel %s: %s", kernel_id, e)

    async def reconcile(self) -> None:
        """Reap the sandboxes of kernels this server had that its kernel manager lost."""
        alive = set(self._kernel_ids())
        gone = self._seen - alive
        self._seen = alive
        if gone:
            await self.reap(gone)

    async def tick(self) -> None:
        """One timer round: reconcile, and only log what fails."""
        try:
            await self.reconcile()
        except SandboxError as e:
            self.log.warning("could not reconcile kernel sandboxes: %s", e)

    async def reap(self, kernel_ids: set[str], before: float | None = None) -> list[str]:
        """Kill the "session" sandboxes of `kernel_ids` (created before `before`, if given)."""
        reaped = []
        for info in await AsyncSandbox.list():
            if (
                info.timeout == "session"
                and info.labels.get("kernel") in kernel_ids
                and (before is None or info.created_at < before)
            ):
                with contextlib.suppress(SandboxNotFound, SandboxExpired):  # ended meanwhile
                    await (await AsyncSandbox.connect(info.id)).kill()
                reaped.append(info.id)
        if reaped:
            self.log.info("ended sandboxes %s of kernel(s) %s", reaped, sorted(kernel_ids))
        return reaped
