"""The dashboard's client of the system sandbox service, acting for a hub user.

The dashboard runs as root under the hub, so the service sees a uid-0 caller: an
instructor, who sees and acts on every user's sandboxes. The hub user who clicked
is named in ``X-Sandbox-Acting-For``, which only changes how the audit line in the
student's sandbox log names the actor, never what the request may do.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from .._config import Paths
from .._errors import SandboxError, SandboxExpired, SandboxNotFound, ServiceUnavailable
from ..client._transport import raise_for_error
from ..service.identity import ACTING_FOR_HEADER as ACTING_FOR

ANY_ADDRESS = ("", "0.0.0.0", "::")
REQUEST_TIMEOUT = 30.0

Message = dict[str, Any]


class SystemService:
    """REST calls to the system service over its Unix socket."""

    def __init__(self, paths: Paths | None = None) -> None:
        self.paths = paths or Paths.system()
        self._client: httpx.AsyncClient | None = None

    @property
    def socket(self) -> Path:
        return self.paths.socket

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                transport=httpx.AsyncHTTPTransport(uds=str(self.socket)),
                base_url="http://sandbox-service",
                timeout=REQUEST_TIMEOUT,
            )
        return self._client

    async def request(
        self, method: str, path: str, acting_for: str, body: Message | None = None
    ) -> Any:
        """The service's JSON answer; its errors raised as the client's typed errors."""
        try:
            response = await self._http().request(
                method, path, json=body, headers={ACTING_FOR: acting_for}
            )
        except httpx.TransportError as e:
            raise ServiceUnavailable(
                f"the system sandbox service does not answer on {self.socket} ({e}); "
                "start it with: systemctl start jupyter-sandbox"
            ) from e
        await raise_for_error(response)
        return response.json() if response.content else None

    async def sandboxes(self, acting_for: str) -> list[Message]:
        """Every user's live sandboxes, each with its live usage."""
        listed = (await self.request("GET", "/v1/sandboxes", acting_for))["sandboxes"]
        details = await asyncio.gather(
            *(self.request("GET", f"/v1/sandboxes/{s['id']}", acting_for) for s in listed),
            return_exceptions=True,
        )
        found = []
        for detail in details:
            if isinstance(detail, (SandboxNotFound, SandboxExpired)):
                continue  # it ended between the list and its details
            if isinstance(detail, BaseException):
                raise detail
            found.append(detail)
        return found

    async def extend_by(self, ref: str, seconds: float, acting_for: str) -> Message:
        """Add `seconds` to the sandbox's time left (a session sandbox gets that much)."""
        info = await self.request("GET", f"/v1/sandboxes/{ref}", acting_for)
        left = max(0.0, (info.get("expires_at") or time.time()) - time.time())
        body = {"timeout": round(left + seconds, 3)}
        return await self.request("POST", f"/v1/sandboxes/{ref}/timeout", acting_for, body)

    async def logs(self, ref: str, acting_for: str, tail: int) -> AsyncIterator[Message]:
        """The sandbox's log entries, following until it ends."""
        params = {"follow": "1", "tail": str(tail)}
        headers = {ACTING_FOR: acting_for}
        try:
            async with self._http().stream(
                "GET", f"/v1/sandboxes/{ref}/logs", params=params, headers=headers, timeout=None
            ) as response:
                await raise_for_error(response)
                async for line in response.aiter_lines():
                    if line:
                        yield json.loads(line)
        except httpx.TransportError as e:
            raise ServiceUnavailable(f"the log stream of {ref} broke off: {e}") from e

    async def gateway(self, acting_for: str) -> tuple[str, int]:
        """Where the service's SSH gateway listens, as seen from this machine."""
        status = await self.request("GET", "/v1/status", acting_for)
        ssh = status.get("ssh") or {}
        port = ssh.get("port") or self._runtime().get("ssh_port")
        if not port:
            raise SandboxError("the system sandbox service does not report an SSH gateway")
        host = ssh.get("host") or ""
        return (host if host not in ANY_ADDRESS else "127.0.0.1", int(port))

    def _runtime(self) -> Message:
        try:
            return json.loads(self.paths.runtime_file.read_text())
        except (OSError, ValueError):
            return {}

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
