"""The asyncio client API: ``AsyncSandbox``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal as signals
import socket
import sys
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import quote

import httpx

from .._config import Paths
from .._durations import parse_timeout
from .._errors import (
    CommandError,
    CommandTimeout,
    InvalidRequest,
    SandboxError,
    ServiceUnavailable,
    error_from,
)
from .._models import (
    CommandResult,
    LogEntry,
    OutputLine,
    Recording,
    SandboxInfo,
    SshAccess,
    Usage,
)
from ..agent.protocol import COMMAND_WITH_INPUT, MAX_INPUT, Frame
from ..untrusted.streams import GRACE
from ._files import AsyncFileSystem
from ._transport import COMMAND, CREATE, LOGS, SPAWN, Transport, read_frames

LINE_PIECE = 64 << 10  # bytes: a longer line reaches callbacks and stream() in pieces

_shared: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, dict[tuple[Paths, Paths], Transport]
] = weakref.WeakKeyDictionary()


def shared_transport() -> Transport:
    """One connection to the service per event loop (HTTP clients are bound to a loop)."""
    paths = (Paths.default(), Paths.system())
    per_loop = _shared.setdefault(asyncio.get_running_loop(), {})
    if paths not in per_loop:
        per_loop[paths] = Transport(*paths)
    return per_loop[paths]


def default_owner() -> str:
    program = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
    return f"{program} (pid {os.getpid()} on {socket.gethostname()})"


class AsyncProcess:
    """A background process started with ``spawn``."""

    def __init__(self, sandbox: AsyncSandbox, info: dict[str, Any]) -> None:
        self.sandbox = sandbox
        self.pid: int = info["pid"]
        self.command: str = info["command"]
        self.exit_code: int | None = info.get("exit_code")

    def __repr__(self) -> str:
        return f"<AsyncProcess pid={self.pid} {self.command!r}>"

    def _url(self, action: str) -> str:
        return f"/v1/sandboxes/{self.sandbox.id}/procs/{self.pid}/{action}"

    async def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the process to exit; its exit code (None if still running at timeout)."""
        params = {"timeout": timeout} if timeout is not None else {}
        info = await self.sandbox._transport.request(
            "GET", self._url("wait"), params=params, timeout=_backstop(timeout)
        )
        self.exit_code = info["exit_code"]
        return self.exit_code

    async def kill(self, signal: int = signals.SIGTERM) -> None:
        """Send `signal` to the process's group."""
        await self.sandbox._transport.request(
            "POST", self._url("signal"), json={"signal": int(signal)}
        )

    async def is_running(self) -> bool:
        info = await self.sandbox._transport.request(
            "GET", self._url("wait"), params={"timeout": 0}
        )
        self.exit_code = info["exit_code"]
        return bool(info["running"])

    def output(self, follow: bool = True) -> AsyncIterator[OutputLine]:
        """The process's stdout and stderr lines, following until it exits."""
        return self.sandbox._log_stream(follow=follow, pid=self.pid, output_only=True)


class AsyncSandbox:
    """A handle on one sandbox. Create, connect or list through the class methods."""

    def __init__(
        self,
        info: dict[str, Any],
        transport: Transport,
        lease: str | None = None,
        lease_ttl: float = 10.0,
    ) -> None:
        self._transport = transport
        self._info = SandboxInfo.from_json(info)
        self.id: str = self._info.id
        self.name: str = self._info.name
        self.fs = AsyncFileSystem(self)
        self._lease = lease
        self._renewer: asyncio.Task | None = None
        if lease is not None:
            self._renewer = asyncio.create_task(self._renew_forever(lease_ttl / 3))

    def __repr__(self) -> str:
        return f"<AsyncSandbox {self.id} name={self.name!r}>"

    @property
    def owns_lease(self) -> bool:
        """True while this handle keeps a "session" sandbox alive."""
        return self._lease is not None

    # -- construction ------------------------------------------------------------------

    @classmethod
    async def create(
        cls,
        *,
        name: str | None = None,
        timeout: str | float = "session",
        memory: str | int | None = None,
        cpus: float | None = None,
        pids: int | None = None,
        fds: int | None = None,
        disk: str | int | None = None,
        network: str = "none",
        env: dict[str, str] | None = None,
        labels: dict[str, str] | None = None,
        owner: str | None = None,
        record_terminals: bool = False,
    ) -> AsyncSandbox:
        """Start a sandbox. ``timeout`` is "session" (lives with this handle) or a duration;
        `record_terminals` records its SSH terminal sessions (``recordings()``)."""
        parse_timeout(timeout)  # fail here, before any service is started
        transport = shared_transport()
        body = {
            "name": name,
            "timeout": timeout,
            "memory": memory,
            "cpus": cpus,
            "pids": pids,
            "fds": fds,
            "disk": disk,
            "network": network,
            "env": env,
            "labels": labels,
            "owner": owner or default_owner(),
            "record_terminals": record_terminals or None,
        }
        info = await transport.request(
            "POST",
            "/v1/sandboxes",
            json={k: v for k, v in body.items() if v is not None},
            timeout=None,
            call=CREATE,
        )
        return cls(info, transport, info.get("lease"), info.get("lease_ttl", 10.0))

    @classmethod
    async def connect(cls, ref: str) -> AsyncSandbox:
        """Attach to a running sandbox by id or name (it does not become yours to end)."""
        transport = shared_transport()
        return cls(await transport.request("GET", f"/v1/sandboxes/{ref}"), transport)

    @classmethod
    async def list(cls, include_ended: bool = False, mine: bool = False) -> list[SandboxInfo]:
        """The sandboxes this caller may see; `mine`: only its own (an instructor of a
        system service sees everyone's otherwise)."""
        params = {"all": "1"} if include_ended else {}
        if mine:
            params["mine"] = "1"
        data = await shared_transport().request("GET", "/v1/sandboxes", params=params)
        return [SandboxInfo.from_json(s) for s in data["sandboxes"]]

    @classmethod
    async def usage(cls, user: str | None = None) -> Usage:
        """Your quota and what your sandboxes hold against it (a quota of None: unlimited);
        an instructor may name another `user`."""
        params = {} if user is None else {"user": user}
        return Usage.from_json(await shared_transport().request("GET", "/v1/usage", params=params))

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.kill()

    # -- lifetime ----------------------------------------------------------------------

    async def _renew_forever(self, interval: float) -> None:
        while self._lease is not None:
            await asyncio.sleep(interval)
            try:
                await self._transport.request(
                    "POST",
                    f"/v1/sandboxes/{self.id}/lease",
                    json={"lease": self._lease},
                    lease=True,
                )
            except ServiceUnavailable:
                continue  # the next attempt restarts the service, which re-adopts us
            except SandboxError:
                self._lease = None

    def _stop_renewing(self) -> None:
        self._lease = None
        if self._renewer is not None:
            self._renewer.cancel()
            self._renewer = None

    async def info(self) -> SandboxInfo:
        """Current state, limits and live CPU and memory use."""
        self._info = SandboxInfo.from_json(
            await self._transport.request("GET", f"/v1/sandboxes/{self.id}")
        )
        return self._info

    async def extend_timeout(self, timeout: str | float) -> SandboxInfo:
        """Set the deadline to `timeout` from now; the sandbox then outlives this handle."""
        info = await self._transport.request(
            "POST", f"/v1/sandboxes/{self.id}/timeout", json={"timeout": timeout}
        )
        self._stop_renewing()
        self._info = SandboxInfo.from_json(info)
        return self._info

    async def restart(self) -> SandboxInfo:
        """Start a failed sandbox again: the same id, name, home, limits and deadline.

        A sandbox fails when it ends unexpectedly (``info().failure`` says why); its
        files stay until then. Restarting a running sandbox raises InvalidRequest.
        """
        self._info = SandboxInfo.from_json(
            await self._transport.request("POST", f"/v1/sandboxes/{self.id}/restart", timeout=None)
        )
        return self._info

    async def kill(self) -> None:
        """End the sandbox now: its processes, files and credentials go."""
        self._stop_renewing()
        with contextlib.suppress(SandboxError):
            await self._transport.request("DELETE", f"/v1/sandboxes/{self.id}")

    # -- SSH -------------------------------------------------------------------------

    async def expose_ssh(
        self,
        *,
        ttl: str | float | None = None,
        single_use: bool = False,
        public_key: str | None = None,
    ) -> SshAccess:
        """A fresh SSH credential: ``ssh <token>@host`` lands in this sandbox.

        It is valid until `ttl` passes, ``revoke_ssh()`` or the sandbox's end, whichever
        comes first. `single_use` allows exactly one connection; `public_key` (an
        OpenSSH public key line) must also be presented by the client.
        """
        body = {"ttl": ttl, "single_use": single_use, "public_key": public_key}
        return SshAccess.from_json(
            await self._transport.request("POST", f"/v1/sandboxes/{self.id}/ssh", json=body)
        )

    async def revoke_ssh(self, access: SshAccess | str | None = None) -> int:
        """Revoke one credential (an SshAccess or its token) or, by default, all of them.

        Live sessions opened with them are closed. Returns how many were revoked.
        """
        token = access.username if isinstance(access, SshAccess) else access
        body = {"token": token} if token else {}
        data = await self._transport.request(
            "POST", f"/v1/sandboxes/{self.id}/ssh/revoke", json=body
        )
        return int(data["revoked"])

    # -- commands ----------------------------------------------------------------------

    async def sh(
        self,
        cmd: str,
        *,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        input: str | bytes | None = None,
        timeout: float | None = None,
        check: bool = True,
        on_stdout: Callable[[str], None] | None = None,
        on_stderr: Callable[[str], None] | None = None,
    ) -> CommandResult:
        """Run `cmd` with /bin/sh; raise CommandError on a non-zero exit unless check=False.

        `on_stdout` / `on_stderr` are called with each line as it is produced.
        """
        out, err = bytearray(), bytearray()
        callbacks = {"stdout": on_stdout, "stderr": on_stderr}
        status: dict[str, Any] = {}
        async for kind, data in self._exec(
            cmd, cwd=cwd, env=env, input=input, timeout=timeout, status=status
        ):
            (out if kind == "stdout" else err).extend(data)
            if callbacks[kind] is not None:
                callbacks[kind](data.decode(errors="replace"))
        result = CommandResult(
            out.decode(errors="replace"),
            err.decode(errors="replace"),
            status["exit_code"],
            bytes(out),
            bytes(err),
        )
        _raise_for_status(cmd, status, timeout, check, result)
        return result

    async def stream(
        self,
        cmd: str,
        *,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        input: str | bytes | None = None,
        timeout: float | None = None,
        check: bool = True,
    ) -> AsyncIterator[OutputLine]:
        """Yield the command's output line by line as it is produced."""
        status: dict[str, Any] = {}
        async for kind, data in self._exec(
            cmd, cwd=cwd, env=env, input=input, timeout=timeout, status=status
        ):
            yield OutputLine(kind, data.decode(errors="replace"))
        _raise_for_status(cmd, status, timeout, check, CommandResult("", "", status["exit_code"]))

    async def _exec(
        self,
        cmd: str,
        *,
        cwd: str | None,
        env: dict[str, str] | None,
        input: str | bytes | None,
        timeout: float | None,
        status: dict[str, Any],
    ) -> AsyncIterator[tuple[str, bytes]]:
        """(stream, line) pairs of a command's output; fills `status` at the end."""
        body: dict[str, Any] = {"cmd": cmd, "cwd": cwd, "env": env, "timeout": timeout}
        request: dict[str, Any] = {"json": body}
        if input is not None:  # the request on one line, then the input as it is
            data = input.encode() if isinstance(input, str) else input
            if len(data) > MAX_INPUT:
                raise InvalidRequest(
                    f"a command's input can be at most {MAX_INPUT >> 20} MiB; upload a larger "
                    "one as a file (sandbox.fs) and redirect the command's input from it"
                )
            request = {
                "content": json.dumps(body).encode() + b"\n" + data,
                "headers": {"Content-Type": COMMAND_WITH_INPUT},
            }
        lines = {Frame.STDOUT: _LineSplitter("stdout"), Frame.STDERR: _LineSplitter("stderr")}
        async with self._transport.stream(
            "POST",
            f"/v1/sandboxes/{self.id}/exec",
            timeout=_backstop(timeout),
            call=COMMAND,
            **request,
        ) as response:
            async for kind, payload in read_frames(response):
                if kind in lines:
                    for line in lines[kind].feed(payload):
                        yield lines[kind].name, line
                elif kind == Frame.EXIT:
                    status.update(json.loads(payload))
                elif kind == Frame.ERROR:
                    error = json.loads(payload)
                    raise error_from(error["type"], error["message"])
        for splitter in lines.values():
            for line in splitter.flush():
                yield splitter.name, line
        if "exit_code" not in status:
            raise SandboxError(
                "the command's connection ended before it exited (the sandbox may have been killed)"
            )

    async def spawn(
        self, cmd: str, *, cwd: str | None = None, env: dict[str, str] | None = None
    ) -> AsyncProcess:
        """Start `cmd` in the background; its output goes to the sandbox log."""
        info = await self._transport.request(
            "POST",
            f"/v1/sandboxes/{self.id}/spawn",
            json={"cmd": cmd, "cwd": cwd, "env": env},
            call=SPAWN,
        )
        return AsyncProcess(self, info)

    async def processes(self) -> list[AsyncProcess]:
        data = await self._transport.request("GET", f"/v1/sandboxes/{self.id}/procs")
        return [AsyncProcess(self, p) for p in data["processes"]]

    def logs(self, follow: bool = False, tail: int | None = None) -> AsyncIterator[LogEntry]:
        """Log entries (background output and events); `follow` waits for new ones."""
        return self._log_stream(follow=follow, tail=tail)

    async def recordings(self) -> list[Recording]:
        """The sandbox's terminal recordings, oldest first (none unless ``info().recording``)."""
        data = await self._transport.request("GET", f"/v1/sandboxes/{self.id}/recordings")
        return [Recording.from_json(r) for r in data]

    async def recording(self, name: str | Recording) -> bytes:
        """One recording's asciicast v2 file (a header line, then one event a line)."""
        name = name.name if isinstance(name, Recording) else name
        url = f"/v1/sandboxes/{self.id}/recordings/{quote(name, safe='')}"
        async with self._transport.stream("GET", url) as response:
            return await response.aread()

    async def _log_stream(
        self,
        follow: bool,
        tail: int | None = None,
        pid: int | None = None,
        output_only: bool = False,
    ) -> AsyncIterator[Any]:
        params = {"follow": "1" if follow else "0"}
        if tail is not None:
            params["tail"] = str(tail)
        if pid is not None:
            params["pid"] = str(pid)
        async with self._transport.stream(
            "GET", f"/v1/sandboxes/{self.id}/logs", params=params, timeout=None, call=LOGS
        ) as response:
            async for line in response.aiter_lines():
                if not line:
                    continue
                entry = LogEntry.from_json(json.loads(line))
                if not output_only:
                    yield entry
                elif entry.stream in ("stdout", "stderr"):
                    yield OutputLine(entry.stream, entry.text)


def _backstop(timeout: float | None) -> httpx.Timeout | None:
    """How long to wait for the service to answer a command with a timeout.

    The service itself ends such a command within its timeout plus GRACE even if
    the agent is silent; this only guards against a service that hangs.
    """
    if timeout is None:
        return None
    return httpx.Timeout(timeout + 3 * GRACE, connect=5.0)


def _raise_for_status(
    cmd: str, status: dict[str, Any], timeout: float | None, check: bool, result: CommandResult
) -> None:
    """CommandTimeout if the command was killed for its timeout, CommandError if it failed."""
    if status.get("timed_out"):
        raise CommandTimeout(f"command timed out after {timeout} s: {cmd!r}", result)
    if check and result.exit_code != 0:
        raise CommandError(
            f"command exited with code {result.exit_code}: {cmd!r}\n{result.stderr[-2000:]}",
            result,
        )


class _LineSplitter:
    """Splits a byte stream into lines, keeping the newline; a longer line comes in pieces.

    Each byte is copied a bounded number of times however long its line, and a piece
    of a long line never ends inside a UTF-8 character.
    """

    def __init__(self, name: str) -> None:
        self.name, self.pending = name, bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        pieces = []
        end = data.rfind(b"\n") + 1
        if end:
            head = bytes(self.pending + data[:end])
            self.pending = bytearray(data[end:])
            pieces = [line + b"\n" for line in head.split(b"\n")[:-1]]
        else:
            self.pending += data
        if len(self.pending) >= LINE_PIECE:
            cut = _utf8_prefix(self.pending)
            pieces.append(bytes(self.pending[:cut]))
            del self.pending[:cut]
        return pieces

    def flush(self) -> list[bytes]:
        rest, self.pending = bytes(self.pending), bytearray()
        return [rest] if rest else []


def _utf8_prefix(data: bytearray) -> int:
    """Length of the longest prefix of `data` that does not end inside a UTF-8 character."""
    for back in range(1, min(4, len(data)) + 1):
        lead = data[-back]
        if lead & 0xC0 != 0x80:  # not a continuation byte: a character starts here
            length = 1 if lead < 0xC0 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
            return len(data) if length <= back else len(data) - back
    return len(data)
