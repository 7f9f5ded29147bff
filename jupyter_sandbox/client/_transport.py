"""Finding (or starting) the user's sandbox service and talking HTTP to it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from typing import Any

import httpx

from .._config import Paths
from .._errors import ServiceUnavailable, error_from
from ..agent import protocol
from ..untrusted.messages import MAX_RESULT

START_TIMEOUT = 30.0
_TIMEOUT = httpx.Timeout(60.0, connect=5.0)


class Transport:
    """An HTTP client bound to the service; restarts the service if it went away."""

    def __init__(self, paths: Paths | None = None) -> None:
        self.paths = paths or Paths.default()
        self._client: httpx.AsyncClient | None = None
        self._lock = asyncio.Lock()

    async def client(self) -> httpx.AsyncClient:
        if self._client is None:
            async with self._lock:
                if self._client is None:
                    self._client = await self._connect()
        return self._client

    async def _connect(self) -> httpx.AsyncClient:
        remote = os.environ.get("JUPYTER_SANDBOX_URL")
        if remote:
            token = os.environ.get("JUPYTER_SANDBOX_TOKEN", "")
            return httpx.AsyncClient(
                base_url=remote, timeout=_TIMEOUT, headers={"Authorization": f"Bearer {token}"}
            )
        client = await self._try_socket()
        if client is None:
            await asyncio.to_thread(start_service, self.paths)
            client = await self._try_socket()
        if client is None:
            raise ServiceUnavailable(
                f"the sandbox service did not come up; see {self.paths.log_file}"
            )
        return client

    async def _try_socket(self) -> httpx.AsyncClient | None:
        if not self.paths.socket.exists():
            return None
        client = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=str(self.paths.socket)),
            base_url="http://sandbox-service",
            timeout=_TIMEOUT,
        )
        try:
            response = await client.get("/v1/status")
            response.raise_for_status()
        except httpx.HTTPError:
            await client.aclose()
            return None
        return client

    async def reset(self) -> None:
        """Forget the connection, so the next request finds or starts the service again."""
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.aclose()

    async def close(self) -> None:
        await self.reset()

    async def request(self, method: str, url: str, **kwargs: Any) -> Any:
        """A request whose JSON answer is returned, or whose error is raised typed."""
        for attempt in (1, 2):
            client = await self.client()
            try:
                response = await client.request(method, url, **kwargs)
            except (httpx.ConnectError, httpx.RemoteProtocolError) as e:
                await self.reset()
                if attempt == 2 or kwargs.get("content") is not None:
                    raise ServiceUnavailable(f"lost the sandbox service: {e}") from None
                continue
            except httpx.TimeoutException as e:
                raise ServiceUnavailable(f"the sandbox service stopped answering ({e!r})") from None
            await raise_for_error(response)
            return response.json()
        raise AssertionError("unreachable")

    @contextlib.asynccontextmanager
    async def stream(self, method: str, url: str, **kwargs: Any) -> AsyncIterator[httpx.Response]:
        client = await self.client()
        try:
            async with client.stream(method, url, **kwargs) as response:
                await raise_for_error(response)
                yield response
        except (httpx.ConnectError, httpx.RemoteProtocolError) as e:
            await self.reset()
            raise ServiceUnavailable(f"lost the sandbox service: {e}") from None
        except httpx.TimeoutException as e:
            raise ServiceUnavailable(f"the sandbox service stopped answering ({e!r})") from None


async def raise_for_error(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    await response.aread()
    try:
        body = response.json()
        kind, message = body["error"], body["message"]
    except (ValueError, KeyError, TypeError):
        raise ServiceUnavailable(
            f"the sandbox service answered {response.status_code}: {response.text[:200]}"
        ) from None
    raise error_from(kind, message)


async def read_frames(response: httpx.Response) -> AsyncIterator[tuple[int, bytes]]:
    """Frames of a framed response body."""
    buffer = bytearray()
    header = protocol.HEADER.size
    async for chunk in response.aiter_raw():
        buffer += chunk
        while len(buffer) >= header:
            kind, size = protocol.HEADER.unpack_from(buffer)
            if size > MAX_RESULT:
                raise ServiceUnavailable(f"the sandbox service sent a frame of {size} bytes")
            if len(buffer) < header + size:
                break
            payload = bytes(buffer[header : header + size])
            del buffer[: header + size]
            yield kind, payload


def start_service(paths: Paths) -> None:
    """Start `jupyter-sandbox serve` detached and wait until it listens (or fails)."""
    paths.data_dir.mkdir(parents=True, exist_ok=True)
    read_fd, write_fd = os.pipe()
    log_fd = os.open(paths.log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.fchmod(log_fd, 0o600)  # the service's log is private, even one made before this rule
    with os.fdopen(log_fd, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jupyter_sandbox", "serve", "--ready-fd", str(write_fd)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            pass_fds=(write_fd,),
            start_new_session=True,
        )
    os.close(write_fd)
    # The service outlives this process's interest in it; reap it whenever it exits
    # so it never lingers as a zombie of a long-lived client such as a kernel.
    threading.Thread(target=proc.wait, name="jupyter-sandbox-service", daemon=True).start()
    with os.fdopen(read_fd, "rb") as ready:
        # The service writes one line when listening; EOF without it means it exited
        # (another service won the race, or startup failed).
        line = ready.readline()
    if line:
        return
    try:
        proc.wait(START_TIMEOUT)
    except subprocess.TimeoutExpired:
        return
    if proc.returncode not in (0, 3):  # 3: another service is already running
        tail = paths.log_file.read_text(errors="replace")[-2000:] if paths.log_file.exists() else ""
        raise ServiceUnavailable(f"the sandbox service failed to start:\n{tail}")


def runtime_info(paths: Paths) -> dict[str, Any] | None:
    try:
        return json.loads(paths.runtime_file.read_text())
    except (OSError, ValueError):
        return None
