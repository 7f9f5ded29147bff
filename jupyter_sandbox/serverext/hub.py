"""What the handlers share: the service's event feed, live usage, SSH accesses, owned sandboxes."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from .._durations import parse_duration
from .._errors import InvalidRequest, SandboxError, SandboxExpired, SandboxNotFound
from .._models import SandboxInfo, SshAccess
from ..client import AsyncSandbox
from ..client._async import shared_transport
from ..client._service import runtime_info
from ..client._transport import raise_for_error

Message = dict[str, Any]
Subscriber = Callable[[Message], None]
SessionLister = Callable[[], Awaitable[list[dict[str, Any]]]]
CREATE_OPTIONS = ("name", "timeout", "memory", "cpus", "pids", "network", "env", "labels")
CREATE_OPTIONS += ("record_terminals",)
RETRY_DELAY = 1.0
ANY_ADDRESS = ("", "0.0.0.0", "::")


class SandboxHub:
    """One per Jupyter server: the panels subscribe here; the handlers act through it.

    The service is only contacted while someone is looking (a panel is connected)
    or asks for something, so an idle Jupyter server never keeps it alive.
    """

    def __init__(
        self, list_sessions: SessionLister, owner: str, usage_interval: float, log: logging.Logger
    ) -> None:
        self._list_sessions = list_sessions
        self.owner = owner
        self.usage_interval = usage_interval
        self.log = log
        self._subscribers: set[Subscriber] = set()
        self._tasks: list[asyncio.Task] = []
        self._handles: dict[str, AsyncSandbox] = {}
        self._accesses: dict[str, SshAccess] = {}
        self._gateway: tuple[str, int] | None = None

    # -- the panels' feed ------------------------------------------------------------------

    async def subscribe(self, subscriber: Subscriber) -> None:
        """Send `subscriber` a snapshot now and every change from then on."""
        self._subscribers.add(subscriber)
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._follow_events()),
                asyncio.create_task(self._poll_usage()),
            ]
        subscriber({"type": "snapshot", "sandboxes": await self.list()})

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.discard(subscriber)
        if not self._subscribers:
            self._cancel_tasks()

    def _broadcast(self, message: Message) -> None:
        for subscriber in list(self._subscribers):
            subscriber(message)

    def _cancel_tasks(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._tasks = []

    async def _follow_events(self) -> None:
        """Relay the service's lifecycle events; after a reconnect, resend a snapshot."""
        reconnect = False
        while True:
            try:
                async with shared_transport().stream("GET", "/v1/events", timeout=None) as response:
                    if reconnect:  # changes may have been missed meanwhile
                        self._broadcast({"type": "snapshot", "sandboxes": await self.list()})
                    async for line in response.aiter_lines():
                        await self._relay(json.loads(line) if line else {})
            except (SandboxError, OSError, ValueError) as e:
                self.log.debug("sandbox event feed interrupted: %s", e)
            reconnect = True
            await asyncio.sleep(RETRY_DELAY)

    async def _relay(self, event: Message) -> None:
        kind = event.get("event")
        if "sandbox" not in event:
            return
        sandbox = SandboxInfo.from_json(event["sandbox"])
        if kind == "ended":
            self._forget(sandbox.id)
        # Panels know three kinds; a failure or a restart changes a sandbox they show.
        kind = kind if kind in ("created", "ended") else "updated"
        self._broadcast({"type": kind, "sandbox": await self._describe(sandbox)})

    async def _poll_usage(self) -> None:
        """Live CPU, memory and pids of every running sandbox, for the panels' charts."""
        while True:
            await asyncio.sleep(self.usage_interval)
            try:
                usage = {info.id: info.usage for info in await self._infos()}
            except SandboxError as e:
                self.log.debug("sandbox usage poll failed: %s", e)
                continue
            self._broadcast({"type": "usage", "time": time.time(), "usage": usage})

    async def _infos(self) -> list[SandboxInfo]:
        """Every live sandbox with its usage, asked for all at once (a class has dozens)."""

        async def info(sandbox_id: str) -> SandboxInfo | None:
            with contextlib.suppress(SandboxNotFound, SandboxExpired):
                return await (await self.handle(sandbox_id)).info()
            return None

        found = await asyncio.gather(*(info(listed.id) for listed in await AsyncSandbox.list()))
        return [i for i in found if i is not None]

    # -- sandboxes -------------------------------------------------------------------------

    async def list(self) -> list[Message]:
        """Every live sandbox, as the panel shows it."""
        kernels = await self._kernel_paths()
        return [self._as_json(info, kernels) for info in await AsyncSandbox.list()]

    async def get(self, ref: str) -> Message:
        return await self._describe(await (await self.handle(ref)).info())

    async def create(self, options: Message, image: Path | None = None) -> Message:
        """Start a sandbox; a "session" one lives as long as this Jupyter server.

        `image`, a local directory, is uploaded into the sandbox's home first, as
        ``%%sandbox --image DIR`` does; if that fails the sandbox is killed.
        """
        unknown = set(options) - set(CREATE_OPTIONS)
        if unknown:
            raise ValueError(f"unknown option(s): {', '.join(sorted(unknown))}")
        sandbox = await AsyncSandbox.create(owner=self.owner, **options)
        self._handles[sandbox.id] = sandbox
        if image is not None:
            try:
                await sandbox.fs.upload(image, ".")
            except BaseException as e:
                await sandbox.kill()  # ignores a sandbox that has ended already
                self._forget(sandbox.id)
                if isinstance(e, OSError) and not isinstance(e, SandboxError):
                    raise InvalidRequest(f"cannot upload the image directory: {e}") from e
                raise
        return await self.get(sandbox.id)

    async def kill(self, ref: str) -> None:
        sandbox = await self.handle(ref)
        await sandbox.kill()
        self._forget(sandbox.id)

    async def extend(self, ref: str, timeout: str | float) -> Message:
        """Set the deadline to `timeout` from now (the service's own meaning)."""
        return await self._describe(await (await self.handle(ref)).extend_timeout(timeout))

    async def extend_by(self, ref: str, more: str | float) -> Message:
        """Add `more` to the time left (a "session" sandbox gets `more` from now)."""
        seconds = parse_duration(more)
        sandbox = await self.handle(ref)
        left = (await sandbox.info()).time_left or 0.0
        return await self._describe(await sandbox.extend_timeout(left + seconds))

    async def usage(self) -> Message | None:
        """The caller's use of the service against its quota; None if the service has none."""
        client = await shared_transport().client()
        response = await client.get("/v1/usage")
        if response.status_code == 404:  # a service from before quotas
            return None
        await raise_for_error(response)
        return response.json()

    async def restart(self, ref: str) -> Message:
        return await self._describe(await (await self.handle(ref)).restart())

    async def recordings(self, ref: str) -> list[Message]:
        """The sandbox's terminal recordings: name, started_at, size."""
        return [dataclasses.asdict(r) for r in await (await self.handle(ref)).recordings()]

    async def recording(self, ref: str, name: str) -> bytes:
        """One recording's asciicast v2 file."""
        return await (await self.handle(ref)).recording(name)

    async def handle(self, ref: str) -> AsyncSandbox:
        """A handle on sandbox `ref` (id or name), reused across requests."""
        for sandbox in self._handles.values():
            if ref in (sandbox.id, sandbox.name):
                return sandbox
        sandbox = await AsyncSandbox.connect(ref)
        self._handles[sandbox.id] = sandbox
        return sandbox

    def _forget(self, sandbox_id: str) -> None:
        self._accesses.pop(sandbox_id, None)
        self._handles.pop(sandbox_id, None)

    async def _describe(self, info: SandboxInfo) -> Message:
        return self._as_json(info, await self._kernel_paths())

    @staticmethod
    def _as_json(info: SandboxInfo, kernels: dict[str, str]) -> Message:
        data = dataclasses.asdict(info)
        data["notebook"] = kernels.get(info.labels.get("kernel", ""))
        return data

    async def _kernel_paths(self) -> dict[str, str]:
        """Notebook path of each kernel with a session in this server."""
        return {
            s["kernel"]["id"]: s["path"] for s in await self._list_sessions() if s.get("kernel")
        }

    # -- SSH -------------------------------------------------------------------------------

    async def ssh_access(self, ref: str, fresh: bool = False) -> SshAccess:
        """The SSH access this server made for `ref`, or a new one if none is still valid."""
        sandbox = await self.handle(ref)
        access = self._accesses.get(sandbox.id)
        if fresh or access is None or (access.expires_at or float("inf")) < time.time() + 5:
            access = await sandbox.expose_ssh()
            self._accesses[sandbox.id] = access
        return access

    async def revoke_ssh(self, ref: str) -> int:
        sandbox = await self.handle(ref)
        self._accesses.pop(sandbox.id, None)
        return await sandbox.revoke_ssh()

    async def terminal_access(self, ref: str) -> SshAccess:
        """A one-connection credential for a terminal session."""
        return await (await self.handle(ref)).expose_ssh(single_use=True)

    async def gateway(self) -> tuple[str, int]:
        """Where the service's SSH gateway listens, as seen from this server."""
        if self._gateway is None:
            transport = shared_transport()
            status = await transport.request("GET", "/v1/status")  # starts it too
            ssh = status.get("ssh") or {}
            port = ssh.get("port") or (runtime_info(transport.paths) or {}).get("ssh_port")
            if not port:
                raise SandboxError("the sandbox service does not report an SSH gateway")
            host = ssh.get("host") or os.environ.get("JUPYTER_SANDBOX_SSH_HOST", "")
            self._gateway = (host if host not in ANY_ADDRESS else "127.0.0.1", int(port))
        return self._gateway

    async def close(self) -> None:
        """Stop following; "session" sandboxes created here end with their handles."""
        self._subscribers.clear()
        self._cancel_tasks()
        for sandbox in list(self._handles.values()):
            if sandbox.owns_lease:
                await sandbox.kill()
        self._handles.clear()
