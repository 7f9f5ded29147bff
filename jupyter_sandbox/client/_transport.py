"""Talking HTTP to the user's sandbox service, with only typed errors coming out.

Whatever happens underneath (the service killed mid-upload, a connection cut
mid-stream, a service that stops answering), callers get a ``ServiceUnavailable``
that says what happened to their call and what to do. A request that never
reached the service, or one that is safe to repeat, is sent again once the
service is back; any other is never repeated behind the caller's back.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx

from .._config import Paths
from .._errors import PermissionDenied, ServiceUnavailable, error_from
from ..agent import protocol
from ..untrusted.messages import MAX_RESULT
from ._service import (
    find_or_start,
    find_system,
    is_supervised,
    remote_credentials,
    service_mode,
)

_TIMEOUT = httpx.Timeout(60.0, connect=5.0)
_POOL = httpx.Limits(max_connections=100, max_keepalive_connections=20)  # httpx's own
# Renewals of a hundred sandboxes (one each per third of the lease) must keep pace with
# a service whose answers slow to a second under load: enough connections for that.
_LEASE_POOL = httpx.Limits(max_connections=64)
_SAFE_METHODS = ("GET", "HEAD", "DELETE")


@dataclass(frozen=True)
class Call:
    """What a request does, in the words of the error if the service is lost during it."""

    during: str  # "the upload"
    outcome: str  # what became of the call, and what to do
    idempotent: bool = False  # safe to send again after a lost answer


UPLOAD = Call("the upload", "the upload did not complete: run it again")
WRITE = Call("the write", "the file was not written: write it again")
DOWNLOAD = Call("the download", "the download did not complete: run it again")
READ = Call("the read", "nothing was read: read the file again")
COMMAND = Call(
    "the command",
    "the command was stopped with it and its output from then on is lost: run it again "
    "(work started with spawn() outlives the service)",
)
LOGS = Call("the log stream", "the sandbox's log is kept: read or follow it again", True)
CREATE = Call(
    "the creation of a sandbox",
    "the sandbox may or may not have been created: check Sandbox.list() before creating another",
)
SPAWN = Call(
    "the start of a background process",
    "it may or may not have started: check processes() before starting it again",
)


def plain_call(method: str, url: str) -> Call:
    """The description of a request no caller described."""
    if method in _SAFE_METHODS:
        return Call(f"the request {method} {url}", "nothing was changed: try again", True)
    return Call(
        f"the request {method} {url}",
        "it may or may not have taken effect: check before trying again",
    )


class Transport:
    """An HTTP client bound to the service; finds it again after it restarts.

    It uses the system service at `system` or the user's own at `paths`, as
    JUPYTER_SANDBOX_MODE says (see ``_service``); `paths` is the one connected to.
    """

    def __init__(self, paths: Paths | None = None, system: Paths | None = None) -> None:
        self.user_paths = paths or Paths.default()
        self.system_paths = system or Paths.system()
        self.paths = self.user_paths
        self.remote = os.environ.get("JUPYTER_SANDBOX_URL")
        self._client: httpx.AsyncClient | None = None
        # Connections of their own for lease renewals: behind a pool busy with a thousand
        # commands they would wait past the lease, and the sandbox would end.
        self._leases: httpx.AsyncClient | None = None
        self._service_pid: int | None = None  # of the local service connected to
        self._lock = asyncio.Lock()

    async def client(self) -> httpx.AsyncClient:
        if self._client is not None and not self._service_alive():
            # Its connections lead to a dead process: a request sent on one would be
            # lost (and, if not safe to repeat, reported so) although it never got there.
            await self.reset()
        if self._client is None:
            async with self._lock:
                if self._client is None:
                    self._client = await self._connect()
        return self._client

    async def lease_client(self) -> httpx.AsyncClient:
        """A client for lease renewals, with connections no other request waits for."""
        await self.client()  # the service is found (or started) there
        if self._leases is None:
            self._leases = self._new_client(_LEASE_POOL)
        return self._leases

    def _new_client(self, limits: httpx.Limits = _POOL) -> httpx.AsyncClient:
        if self.remote:
            return httpx.AsyncClient(
                base_url=self.remote,
                timeout=_TIMEOUT,
                headers=remote_credentials()[0],
                limits=limits,
            )
        return httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=str(self.paths.socket), limits=limits),
            base_url="http://sandbox-service",
            timeout=_TIMEOUT,
        )

    async def _connect(self) -> httpx.AsyncClient:
        if self.remote:
            return self._new_client()
        mode = service_mode()
        if mode != "user":
            self.paths = self.system_paths
            client = await find_system(self.paths, mode, self._try_socket)
            if client is not None:
                return client
        self.paths = self.user_paths
        return await find_or_start(self.paths, self._try_socket)

    async def _try_socket(self) -> httpx.AsyncClient | None:
        if not self.paths.socket.exists():
            return None
        client = self._new_client()
        try:
            response = await client.get("/v1/status")
            response.raise_for_status()
            pid = int(response.json()["pid"])
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            await client.aclose()
            return None
        self._service_pid = pid if _is_service(pid) else None  # None: in another pid namespace
        return client

    def _service_alive(self) -> bool:
        """Is the local service this client connected to still running (not a zombie)?"""
        if self._service_pid is None:
            return True  # a remote service: its connections say so themselves
        try:
            with open(f"/proc/{self._service_pid}/stat", "rb") as f:
                return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
        except (OSError, IndexError):
            return False

    async def reset(self) -> None:
        """Forget the connection, so the next request finds or starts the service again."""
        clients, self._client, self._leases = (self._client, self._leases), None, None
        self._service_pid = None
        for client in clients:
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.aclose()

    async def close(self) -> None:
        await self.reset()

    async def request(
        self, method: str, url: str, *, call: Call | None = None, lease: bool = False, **kwargs: Any
    ) -> Any:
        """A request whose JSON answer is returned, or whose error is raised typed;
        `lease`: a lease renewal, sent through `lease_client`."""
        call = call or plain_call(method, url)
        for attempt in (1, 2):
            client = await (self.lease_client() if lease else self.client())
            try:
                response = await client.request(method, url, **kwargs)
            except httpx.TransportError as e:
                await self._give_up_or_retry(e, call, attempt, answered=False)
                continue
            await self._raise_for_error(response)
            return response.json()
        raise AssertionError("unreachable")

    @contextlib.asynccontextmanager
    async def stream(
        self, method: str, url: str, *, call: Call | None = None, **kwargs: Any
    ) -> AsyncIterator[httpx.Response]:
        """A streamed response; losing the service while it is read raises typed too."""
        call = call or plain_call(method, url)
        for attempt in (1, 2):
            client = await self.client()
            answered = False
            try:
                async with client.stream(method, url, **kwargs) as response:
                    answered = True
                    await self._raise_for_error(response)
                    yield response
                    return
            except httpx.TransportError as e:
                await self._give_up_or_retry(e, call, attempt, answered)

    async def _raise_for_error(self, response: httpx.Response) -> None:
        """`raise_for_error`; a remote service's 401 also says which credential was sent
        and what to check."""
        if response.status_code == 401 and self.remote:
            try:
                await raise_for_error(response)
            except PermissionDenied as e:
                hint = remote_credentials()[1]
                raise PermissionDenied(
                    f"the sandbox service at {self.remote} refused the request: {e} ({hint})"
                ) from None
        await raise_for_error(response)

    async def _give_up_or_retry(
        self, error: httpx.TransportError, call: Call, attempt: int, answered: bool
    ) -> None:
        """Return if the request may be sent again; else raise what a person can act on."""
        if isinstance(error, httpx.TimeoutException):
            raise ServiceUnavailable(
                f"the sandbox service stopped answering during {call.during} "
                f"({type(error).__name__}); {call.outcome}; if this keeps happening, see "
                f"{self.log_hint()}"
            ) from None
        await self.reset()
        # A refused connection sent nothing, so any request may go again; an answer lost
        # halfway may go again only if repeating it changes nothing.
        never_sent = isinstance(error, httpx.ConnectError)
        if attempt == 1 and not answered and (never_sent or call.idempotent):
            return
        raise ServiceUnavailable(f"{self._lost(call)}; {call.outcome}") from None

    def _lost(self, call: Call) -> str:
        if self.remote:
            return (
                f"lost the connection to the sandbox service at {self.remote} during {call.during}"
            )
        if self.paths.mode == "system":
            then = (
                "its supervisor or systemd starts it again, and it keeps the sandboxes and "
                "their files"
            )
        elif is_supervised(self.paths):
            then = "it is restarting, and keeps the sandboxes and their files"
        else:
            then = "the next call starts it again, and it keeps the sandboxes and their files"
        return f"the sandbox service stopped during {call.during}; {then}"

    def log_hint(self) -> str:
        """Where the service connected to logs."""
        if self.paths.mode == "system":
            return "the system service's log (journalctl -u jupyter-sandbox)"
        return str(self.paths.log_file)


def _is_service(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"jupyter_sandbox" in f.read()
    except OSError:
        return False


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
