"""The service's HTTP API: REST for sandboxes, framed streams for exec, files and logs.

Streamed bodies use the agent's framing (``agent.protocol``) or newline-
delimited JSON for logs. Errors are JSON ``{"error": <class>, "message": ...}``
with the class's HTTP status, so the client can raise the same typed error.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from .._errors import CommandTimeout, FileError, InvalidRequest, PermissionDenied, SandboxError
from ..agent.protocol import CHUNK, Frame, encode, encode_json
from ..agent.remote import AgentStream, parse_result
from ..untrusted import messages
from ..untrusted.streams import ANSWER_TIMEOUT, GRACE, INACTIVITY, AgentTimeout
from .manager import Live, Manager
from .ssh_access import SshAccessManager
from .state import SandboxRecord

log = logging.getLogger("jupyter_sandbox.service")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# The arguments each file operation takes and their types; the paths (str) are required.
FILE_OPS: dict[str, dict[str, type]] = {
    "stat": {"path": str},
    "list": {"path": str},
    "mkdir": {"path": str, "parents": bool, "exist_ok": bool, "mode": int},
    "remove": {"path": str, "recursive": bool},
    "rename": {"src": str, "dst": str},
}
REMOVE_TIMEOUT = 600.0  # a recursive remove of a large tree may take that long
FRAMED = "application/x-sandbox-frames"


def record_json(record: SandboxRecord, live: Live | None = None) -> dict[str, Any]:
    """A sandbox as clients see it."""
    data = {
        "id": record.id,
        "name": record.name,
        "status": record.status,
        "created_at": record.created_at,
        "timeout": "session" if record.timeout is None else record.timeout,
        "expires_at": record.expires_at,
        "owner": record.owner,
        "labels": record.labels,
        "limits": record.limits,
        "network": record.network,
        "ended_at": record.ended_at,
        "end_reason": record.end_reason,
    }
    if live is not None:
        data["limits_note"] = live.runtime.limits_note
        data["syscall_filter"] = live.runtime.syscall_filter
        data["hostname"] = record.id
    return data


def make_app(manager: Manager, ssh: SshAccessManager, token: str | None = None) -> web.Application:
    app = web.Application(
        middlewares=[_errors_middleware, _auth_middleware(token)], client_max_size=1 << 20
    )
    app["manager"] = manager
    app["activity"] = Activity()
    api = Api(manager, ssh)
    app.add_routes(
        [
            web.get("/v1/status", api.status),
            web.get("/v1/events", api.events),
            web.get("/v1/sandboxes", api.list),
            web.post("/v1/sandboxes", api.create),
            web.get("/v1/sandboxes/{ref}", api.info),
            web.delete("/v1/sandboxes/{ref}", api.kill),
            web.post("/v1/sandboxes/{ref}/timeout", api.extend),
            web.post("/v1/sandboxes/{ref}/lease", api.renew),
            web.post("/v1/sandboxes/{ref}/ssh", api.expose_ssh),
            web.post("/v1/sandboxes/{ref}/ssh/revoke", api.revoke_ssh),
            web.post("/v1/sandboxes/{ref}/exec", api.exec),
            web.post("/v1/sandboxes/{ref}/spawn", api.spawn),
            web.get("/v1/sandboxes/{ref}/agent", api.agent_socket),
            web.get("/v1/sandboxes/{ref}/procs", api.procs),
            web.get("/v1/sandboxes/{ref}/procs/{pid}/wait", api.proc_wait),
            web.post("/v1/sandboxes/{ref}/procs/{pid}/signal", api.proc_signal),
            web.get("/v1/sandboxes/{ref}/logs", api.logs),
            web.post("/v1/sandboxes/{ref}/files/{op}", api.file_op),
            web.get("/v1/sandboxes/{ref}/files/read", api.read_file),
            web.put("/v1/sandboxes/{ref}/files/write", api.write_file),
            web.get("/v1/sandboxes/{ref}/files/tar", api.read_tar),
            web.put("/v1/sandboxes/{ref}/files/tar", api.write_tar),
        ]
    )
    return app


class Activity:
    """When the service was last used, for the idle shutdown."""

    def __init__(self) -> None:
        self.active = 0
        self.last = time.monotonic()

    def idle_for(self) -> float:
        return 0.0 if self.active else time.monotonic() - self.last


@web.middleware
async def _errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    activity: Activity = request.app["activity"]
    activity.active += 1
    try:
        return await handler(request)
    except SandboxError as e:
        return web.json_response(
            {"error": type(e).__name__, "message": str(e)},
            status=e.status if e.status >= 400 else 500,
        )
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return web.json_response(
            {"error": "InvalidRequest", "message": f"bad JSON: {e}"}, status=400
        )
    finally:
        activity.active -= 1
        activity.last = time.monotonic()


def _auth_middleware(token: str | None):
    """TCP listeners require the bearer token; the Unix socket is guarded by its mode."""

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        peer = request.transport.get_extra_info("sockname") if request.transport else None
        if isinstance(peer, tuple):
            given = request.headers.get("Authorization", "")
            if token is None or not secrets.compare_digest(given, f"Bearer {token}"):
                return web.json_response(
                    {"error": "PermissionDenied", "message": "missing or wrong bearer token"},
                    status=401,
                )
        return await handler(request)

    return auth


async def _json(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    body = await request.json()
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    return body


def _query_path(request: web.Request) -> str:
    path = request.query.get("path")
    if not path:
        raise InvalidRequest("the 'path' parameter is required")
    return path


def _int(value: str | None, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise InvalidRequest(f"{name} must be a whole number") from None


class Api:
    def __init__(self, manager: Manager, ssh: SshAccessManager) -> None:
        self.manager = manager
        self.ssh = ssh

    def _live(self, request: web.Request) -> Live:
        return self.manager.get(request.match_info["ref"])

    # -- sandboxes ---------------------------------------------------------------------

    async def status(self, request: web.Request) -> web.Response:
        backend = self.manager.backend
        return web.json_response(
            {
                "pid": request.app["pid"],
                "version": request.app["version"],
                "started_at": request.app["started_at"],
                "sandboxes": len(self.manager.live),
                "pool": sorted({*self.manager.pool, *self.manager.pool_starting}),
                "ssh": {
                    "host": self.ssh.host,
                    "port": self.ssh.gateway.port if self.ssh.gateway else None,
                },
                "isolation": backend.unavailable or "ok",
                "cgroups": backend.cgroups.unavailable or f"v{backend.cgroups.version}",
            }
        )

    async def list(self, request: web.Request) -> web.Response:
        include_ended = request.query.get("all") in ("1", "true")
        records = self.manager.list(include_ended)
        return web.json_response(
            {"sandboxes": [record_json(r, self.manager.live.get(r.id)) for r in records]}
        )

    async def events(self, request: web.Request) -> web.StreamResponse:
        """Sandbox lifecycle events as JSON lines ("created", "updated", "ended")."""
        queue: asyncio.Queue = asyncio.Queue(maxsize=1000)

        def listener(event: str, record: SandboxRecord) -> None:
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait({"event": event, "sandbox": record_json(record)})

        self.manager.listeners.append(listener)
        try:
            response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
            await response.prepare(request)
            await response.write(b'{"event":"hello"}\n')
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), 15)
                except asyncio.TimeoutError:
                    item = {"event": "keepalive"}
                await response.write(json.dumps(item).encode() + b"\n")
        finally:
            self.manager.listeners.remove(listener)

    async def create(self, request: web.Request) -> web.Response:
        body = await _json(request)
        allowed = {"name", "timeout", "memory", "cpus", "pids", "fds", "disk", "network"}
        allowed |= {"env", "labels", "owner"}
        unknown = set(body) - allowed
        if unknown:
            raise InvalidRequest(f"unknown option(s): {', '.join(sorted(unknown))}")
        record = await self.manager.create(**body)
        data = record_json(record, self.manager.live.get(record.id))
        data["lease"] = record.lease_id
        data["lease_ttl"] = self.manager.settings.lease_ttl
        return web.json_response(data, status=201)

    async def info(self, request: web.Request) -> web.Response:
        live = self._live(request)
        data = record_json(live.record, live)
        data["usage"] = self.manager.usage(live)
        return web.json_response(data)

    async def kill(self, request: web.Request) -> web.Response:
        record = await self.manager.kill(request.match_info["ref"])
        return web.json_response(record_json(record))

    async def extend(self, request: web.Request) -> web.Response:
        body = await _json(request)
        record = self.manager.extend(request.match_info["ref"], body.get("timeout"))
        return web.json_response(record_json(record))

    async def renew(self, request: web.Request) -> web.Response:
        body = await _json(request)
        record = self.manager.renew(request.match_info["ref"], body.get("lease", ""))
        return web.json_response({"lease_expires": record.lease_expires})

    # -- SSH -------------------------------------------------------------------------

    async def expose_ssh(self, request: web.Request) -> web.Response:
        body = await _json(request)
        unknown = set(body) - {"ttl", "single_use", "public_key"}
        if unknown:
            raise InvalidRequest(f"unknown option(s): {', '.join(sorted(unknown))}")
        return web.json_response(self.ssh.expose(request.match_info["ref"], **body))

    async def revoke_ssh(self, request: web.Request) -> web.Response:
        body = await _json(request)
        count = self.ssh.revoke(request.match_info["ref"], body.get("token"))
        return web.json_response({"revoked": count})

    # -- processes ---------------------------------------------------------------------

    @staticmethod
    def _command(live: Live, body: dict[str, Any]) -> dict[str, Any]:
        """What to run, where, with the sandbox's environment plus the request's."""
        extra = body.get("env")
        if extra is not None and not isinstance(extra, dict):
            raise InvalidRequest("env must be a mapping of names to values")
        env = {**live.record.env, **{str(k): str(v) for k, v in (extra or {}).items()}}
        return {
            "cmd": body.get("cmd"),
            "argv": body.get("argv"),
            "cwd": body.get("cwd"),
            "env": env,
        }

    async def exec(self, request: web.Request) -> web.StreamResponse:
        """Run a command; the response streams RESULT, STDOUT/STDERR and EXIT frames.

        A command with a timeout ends within that timeout plus GRACE even if the
        agent stops answering: the stream then ends with an ERROR frame.
        """
        live = self._live(request)
        body = await _json(request)
        stdin = body.get("input_b64")
        timeout = body.get("timeout")
        if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
            raise InvalidRequest("timeout must be a positive number of seconds")
        deadline = _Deadline(None if timeout is None else timeout + GRACE)
        agent = await live.agent.open(
            "exec",
            **self._command(live, body),
            timeout=timeout,
            stdin=stdin is not None,
        )
        async with agent:
            try:
                started = await agent.result(deadline.left(ANSWER_TIMEOUT))
                if stdin is not None:
                    with contextlib.suppress(ConnectionError):  # its frames below say why
                        await agent.send(Frame.STDIN, base64.b64decode(stdin), deadline.left())
                        await agent.send(Frame.EOF, b"", deadline.left())
            except AgentTimeout as e:
                raise _command_timeout(timeout, deadline, e) from None
            response = await _framed_response(request)
            await response.write(encode_json(Frame.RESULT, started))
            try:
                await _relay_command(agent, response, deadline)
            except SandboxError as e:
                await response.write(_error_frame(_command_timeout(timeout, deadline, e)))
            await response.write_eof()
            return response

    async def agent_socket(self, request: web.Request) -> web.Response:
        """Where the agent listens, for bulk transfers by a client on this machine."""
        if request.transport is None or not isinstance(
            request.transport.get_extra_info("sockname"), str
        ):
            raise PermissionDenied("the agent socket is offered over the Unix socket only")
        return web.json_response({"socket": self._live(request).runtime.socket})

    async def spawn(self, request: web.Request) -> web.Response:
        live = self._live(request)
        body = await _json(request)
        info = await live.agent.call("spawn", **self._command(live, body))
        return web.json_response(info)

    async def procs(self, request: web.Request) -> web.Response:
        return web.json_response(await self._live(request).agent.call("procs"))

    async def proc_wait(self, request: web.Request) -> web.Response:
        live = self._live(request)
        timeout = request.query.get("timeout")
        seconds = _number(timeout, "timeout")
        info = await live.agent.call(
            "proc_wait",
            answer_timeout=None if seconds is None else seconds + GRACE,
            pid=_int(request.match_info["pid"], "pid"),
            timeout=seconds,
        )
        return web.json_response(info)

    async def proc_signal(self, request: web.Request) -> web.Response:
        live = self._live(request)
        body = await _json(request)
        info = await live.agent.call(
            "proc_signal",
            pid=_int(request.match_info["pid"], "pid"),
            signal=int(body.get("signal", 15)),
        )
        return web.json_response(info)

    async def logs(self, request: web.Request) -> web.StreamResponse:
        """Log entries as JSON lines; `follow=1` keeps streaming new ones."""
        live = self._live(request)
        query = request.query
        follow = query.get("follow") in ("1", "true")
        silence = None if follow else ANSWER_TIMEOUT  # following may wait for new entries
        agent = await live.agent.open(
            "logs",
            after=_int(query.get("after"), "after") or 0,
            tail=_int(query.get("tail"), "tail"),
            follow=follow,
            pid=_int(query.get("pid"), "pid"),
        )
        async with agent:
            entry = await _next_log_entry(agent, silence)
            response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
            await response.prepare(request)
            try:
                while entry is not None:
                    await response.write(json.dumps(entry).encode() + b"\n")
                    entry = await _next_log_entry(agent, silence)
            except SandboxError as e:
                log.warning("log stream of %s ended: %s", live.record.id, e)
            await response.write_eof()
            return response

    # -- files -------------------------------------------------------------------------

    async def file_op(self, request: web.Request) -> web.Response:
        op = request.match_info["op"]
        if op not in FILE_OPS:
            raise web.HTTPNotFound()
        body = _file_op_args(op, await _json(request))
        answer_timeout = REMOVE_TIMEOUT if op == "remove" else ANSWER_TIMEOUT
        agent = self._live(request).agent
        return web.json_response(await agent.call(op, answer_timeout=answer_timeout, **body))

    async def read_file(self, request: web.Request) -> web.StreamResponse:
        return await self._download(request, "read")

    async def read_tar(self, request: web.Request) -> web.StreamResponse:
        return await self._download(request, "tar_out")

    async def _download(self, request: web.Request, op: str) -> web.StreamResponse:
        """A file's bytes (or a tree's tar stream) as frames: RESULT, DATA..., END or ERROR.

        A file may not send more than the size it announced; a silent agent ends
        the transfer with an ERROR frame after INACTIVITY seconds.
        """
        live = self._live(request)
        async with await live.agent.open(op, path=_query_path(request)) as agent:
            info = await agent.result()
            if op == "read" and info["type"] != "file":
                raise FileError(f"not a regular file: {info['path']}")
            response = await _framed_response(request)
            await response.write(encode_json(Frame.RESULT, info))
            try:
                async for chunk in agent.data(info["size"] if op == "read" else None):
                    await response.write(encode(Frame.DATA, chunk))
                await response.write(encode(Frame.END))
            except SandboxError as e:
                await response.write(_error_frame(e))
            await response.write_eof()
            return response

    async def write_file(self, request: web.Request) -> web.Response:
        mode = request.query.get("mode")
        return await self._upload(request, "write", mode=int(mode, 8) if mode else None)

    async def write_tar(self, request: web.Request) -> web.Response:
        return await self._upload(request, "tar_in")

    async def _upload(self, request: web.Request, op: str, **args: Any) -> web.Response:
        live = self._live(request)
        async with await live.agent.open(op, path=_query_path(request), **args) as agent:
            try:
                while chunk := await request.content.read(CHUNK):
                    await agent.send(Frame.DATA, chunk, INACTIVITY)
                await agent.send(Frame.END, b"", INACTIVITY)
            except ConnectionError:
                pass  # the agent refused early; its answer below says why
            return web.json_response(await agent.result(INACTIVITY))


def _file_op_args(op: str, body: dict[str, Any]) -> dict[str, Any]:
    """`body` if it has exactly the arguments `op` takes, of their types; else InvalidRequest."""
    arguments = FILE_OPS[op]
    unknown = set(body) - set(arguments)
    if unknown:
        raise InvalidRequest(f"unknown argument(s) for {op}: {', '.join(sorted(unknown))}")
    missing = [name for name, kind in arguments.items() if kind is str and name not in body]
    if missing:
        raise InvalidRequest(f"{op} needs the argument(s) {', '.join(missing)}")
    for name, value in body.items():
        kind = arguments[name]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise InvalidRequest(f"{op}: {name!r} must be of type {kind.__name__}")
    return body


def _number(value: str | None, name: str) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value)
    except ValueError:
        raise InvalidRequest(f"{name} must be a number of seconds") from None


class _Deadline:
    """Seconds left of an optional overall limit."""

    def __init__(self, seconds: float | None) -> None:
        loop = asyncio.get_running_loop()
        self.clock = loop.time
        self.end = None if seconds is None else loop.time() + seconds

    def left(self, cap: float | None = None) -> float | None:
        if self.end is None:
            return cap
        remaining = max(0.0, self.end - self.clock())
        return remaining if cap is None else min(cap, remaining)


def _command_timeout(
    timeout: float | None, deadline: _Deadline, error: SandboxError
) -> SandboxError:
    """CommandTimeout if the agent went silent past the command's timeout, else `error`."""
    if timeout is None or not isinstance(error, AgentTimeout) or deadline.left():
        return error
    return CommandTimeout(
        f"the command did not end within its timeout of {timeout:g} s (+{GRACE:g} s): {error}"
    )


async def _relay_command(
    agent: AgentStream, response: web.StreamResponse, deadline: _Deadline
) -> None:
    """The command's output and EXIT frames, checked, until EXIT or the agent's end."""
    while (frame := await agent.recv(deadline.left())) is not None:
        kind, payload = frame
        if kind == Frame.ERROR:
            raise messages.agent_error(payload)
        if kind == Frame.RESULT:
            raise messages.ProtocolViolation("the sandbox's agent sent a second RESULT frame")
        await response.write(encode(kind, payload))
        if kind == Frame.EXIT:
            return


async def _next_log_entry(agent: AgentStream, silence: float | None) -> dict[str, Any] | None:
    """The next checked log entry, or None at the end of the log."""
    frame = await agent.recv(silence)
    if frame is None or frame[0] == Frame.END:
        return None
    if frame[0] == Frame.ERROR:
        raise messages.agent_error(frame[1])
    return await parse_result("logs", frame[1])


def _error_frame(error: SandboxError) -> bytes:
    return encode_json(Frame.ERROR, {"type": type(error).__name__, "message": str(error)})


async def _framed_response(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": FRAMED})
    await response.prepare(request)
    return response
