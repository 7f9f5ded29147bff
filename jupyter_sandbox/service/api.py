"""The service's HTTP API: REST for sandboxes, framed streams for exec, files and logs.

Streamed bodies use the agent's framing (``agent.protocol``) or newline-
delimited JSON for logs. Errors are JSON ``{"error": <class>, "message": ...}``
with the class's HTTP status, so the client can raise the same typed error.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import heapq
import json
import logging
import os
import pwd
import re
import secrets
import shlex
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from .._durations import MAX_SECONDS, shown
from .._errors import (
    CommandTimeout,
    FileError,
    InvalidRequest,
    PermissionDenied,
    SandboxError,
    SandboxExpired,
    SandboxFailed,
)
from ..agent.protocol import CHUNK, COMMAND_WITH_INPUT, Frame, encode, encode_json
from ..agent.remote import AgentStream, parse_result
from ..backends import space
from ..ssh import recording
from ..untrusted import messages
from ..untrusted.messages import MAX_PID, MAX_SIZE
from ..untrusted.streams import ANSWER_TIMEOUT, GRACE, INACTIVITY, AgentTimeout
from . import openapi
from .command_input import CommandInput, read_request_line
from .hub_auth import UNKNOWN_TOKEN, HubDirectory, HubUnavailable, Unauthenticated
from .identity import ACTING_FOR_HEADER, Caller, Directory, acting_for, peer_uid, service_caller
from .manager import Live, Manager, check_env, failed_message
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
# How an audit line names each file operation ("instructor bob: read the file notes.txt").
FILE_OP_WORDS = {
    "stat": "looked at",
    "list": "listed the directory",
    "mkdir": "made the directory",
    "remove": "removed",
    "rename": "renamed",
    "read": "read the file",
    "write": "wrote the file",
    "tar_out": "downloaded",
    "tar_in": "uploaded into",
}
AUDIT_SOURCE = "audit"  # the log source of instructors' actions
AUDITED_TEXT = 200  # characters of a command or path an audit line quotes
CREATE_OPTIONS = ("name", "timeout", "memory", "cpus", "pids", "fds", "disk", "network")
CREATE_OPTIONS += ("env", "labels", "owner", "record_terminals")
COMMAND_OPTIONS = ("cmd", "argv", "cwd", "env", "timeout")
EXEC_OPTIONS = (*COMMAND_OPTIONS, "input_b64")  # the input goes in the JSON body
FLAGS = ("1", "true", "0", "false")
_INTEGER = re.compile(r"-?[0-9]{1,30}")
_DECIMAL = re.compile(r"-?[0-9]{1,30}(\.[0-9]{1,30})?([eE][-+]?[0-9]{1,3})?")
REMOVE_TIMEOUT = 600.0  # a recursive remove of a large tree may take that long
FRAMED = "application/x-sandbox-frames"
MAX_BODY = 1 << 20  # bytes of a JSON request body (uploads stream and have no such bound)
MAX_SIGNAL = signal.NSIG - 1


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
        "user": record.user,
        "uid": record.uid,
        "labels": record.labels,
        "limits": record.limits,
        "network": record.network,
        "ended_at": record.ended_at,
        "end_reason": record.end_reason,
        "failure": record.failure,
        "failed_at": record.failed_at,
        "recording": record.recording,
        # Its files outlive a failure (a failed one: they are there until its deadline or
        # a kill); an ended sandbox's are gone.
        "files_kept": live is not None and live.runtime.files_survive_failure,
    }
    if live is not None:
        data["limits_note"] = live.runtime.limits_note
        data["syscall_filter"] = live.runtime.syscall_filter
        data["hostname"] = record.id
    return data


def make_app(
    manager: Manager,
    ssh: SshAccessManager,
    token: str | None = None,
    directory: Directory | HubDirectory | None = None,
) -> web.Application:
    """The API; `directory` identifies callers by their peer credentials (system mode) or
    TCP callers by their JupyterHub token (hub mode), else every caller is the service's
    own user."""
    hub = directory if isinstance(directory, HubDirectory) else None
    _quiet_unparsed_requests()
    app = web.Application(
        middlewares=[
            _errors_middleware,
            _auth_middleware(token, hub),
            _caller_middleware(None if hub else directory, hub is not None),
        ],
        client_max_size=MAX_BODY,
    )
    app["manager"] = manager
    app["activity"] = Activity()
    app["mode"] = "user" if directory is None else "hub" if hub else "system"
    app["directory"] = directory
    api = Api(manager, ssh)
    app.add_routes(
        [
            web.get("/v1/openapi.json", api.openapi),
            web.get("/v1/status", api.status),
            web.get("/v1/usage", api.usage),
            web.get("/v1/events", api.events),
            web.get("/v1/sandboxes", api.list),
            web.post("/v1/sandboxes", api.create),
            web.get("/v1/sandboxes/{ref}", api.info),
            web.delete("/v1/sandboxes/{ref}", api.kill),
            web.post("/v1/sandboxes/{ref}/restart", api.restart),
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
            web.get("/v1/sandboxes/{ref}/recordings", api.recordings),
            web.get("/v1/sandboxes/{ref}/recordings/{name}", api.recording),
            *(web.post(f"/v1/sandboxes/{{ref}}/files/{op}", api.file_op) for op in FILE_OPS),
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
        try:
            return await handler(request)
        except SandboxExpired as e:
            raise await _failed_instead(request, e) from None
        except OSError as e:  # the service's own writes: the sandboxes' records, say
            if isinstance(e, SandboxError) or not space.is_full(e):
                raise
            raise space.unsaved_error(request.app["manager"].backend.storage) from None
    except SandboxError as e:
        return web.json_response(
            {"error": type(e).__name__, "message": str(e)},
            status=e.status if e.status >= 400 else 500,
        )
    except web.HTTPException as e:
        if e.status < 400:
            raise
        message = _HTTP_MESSAGES.get(e.status) or e.text or e.reason
        return web.json_response({"error": "InvalidRequest", "message": message}, status=e.status)
    except Exception:
        log.exception("request %s %s failed", request.method, request.path)
        return web.json_response(
            {
                "error": "SandboxError",
                "message": "the sandbox service failed to handle this request; "
                "its log says why (jupyter-sandbox status shows where it is)",
            },
            status=500,
        )
    finally:
        activity.active -= 1
        activity.last = time.monotonic()


async def _failed_instead(request: web.Request, error: SandboxExpired) -> SandboxError:
    """SandboxFailed if the sandbox's agent went away because the sandbox failed, else `error`.

    A call that finds the agent gone is often the first to notice a failure."""
    manager: Manager = request.app["manager"]
    live = manager.find(request.match_info.get("ref", ""), request.get("caller"))
    if live is not None and await manager.check(live, agent_lost=True):
        return SandboxFailed(failed_message(live))
    return error


_HTTP_MESSAGES = {
    404: "no such endpoint: the service's API is described at GET /v1/openapi.json",
    405: "this endpoint does not take that method (see GET /v1/openapi.json)",
    413: f"the request body is larger than {MAX_BODY >> 20} MiB",
}


class _UnparsedRequests(logging.Filter):
    """aiohttp logs a request it cannot parse with the bytes it stopped at, which may be
    an Authorization header's token (one too long, or with a control character): log
    what was wrong, never those bytes."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            record.msg = "answered %d to a request that is not valid HTTP (%s)"
            record.args, record.exc_info = (error.code, type(error).__name__), None
        return True


def _quiet_unparsed_requests() -> None:
    logger = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _UnparsedRequests) for f in logger.filters):
        logger.addFilter(_UnparsedRequests())


def _auth_middleware(token: str | None, hub: HubDirectory | None = None):
    """TCP listeners require the bearer token, or in hub mode a hub user's token (which
    names the caller); the Unix socket is guarded by its mode."""

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        peer = request.transport.get_extra_info("sockname") if request.transport else None
        if isinstance(peer, tuple) and hub is not None:
            authorization = request.headers.getall("Authorization", [])
            try:
                request["caller"] = await hub.caller(authorization)
            except (Unauthenticated, HubUnavailable) as e:
                return _hub_refusal(e)
            return await _while_token_holds(request, handler, hub, authorization)
        elif isinstance(peer, tuple):
            given = request.headers.get("Authorization", "")
            if token is None or not secrets.compare_digest(given, f"Bearer {token}"):
                return web.json_response(
                    {"error": "PermissionDenied", "message": "missing or wrong bearer token"},
                    status=401,
                )
        return await handler(request)

    return auth


def _hub_refusal(error: Unauthenticated | HubUnavailable) -> web.Response:
    kind = "PermissionDenied" if error.status == 401 else "ServiceUnavailable"
    return web.json_response({"error": kind, "message": str(error)}, status=error.status)


async def _while_token_holds(
    request: web.Request, handler: Handler, hub: HubDirectory, authorization: list[str]
) -> web.StreamResponse:
    """`handler`'s answer, unless the hub stops knowing the request's token while it runs
    (a followed log, the event feed, a long command): then the request ends, with 401 if
    nothing of its answer was sent yet, else by closing its connection."""
    handling = asyncio.ensure_future(handler(request))
    watching = asyncio.ensure_future(hub.until_unknown(authorization))
    try:
        await asyncio.wait((handling, watching), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watching.cancel()
        if not handling.done():
            handling.cancel()
            await asyncio.gather(handling, return_exceptions=True)
    if not handling.cancelled():
        return handling.result()
    log.info("ended %s %s: the hub no longer knows its token", request.method, request.path)
    if request.writer is None or not request.writer.output_size:
        return _hub_refusal(Unauthenticated(UNKNOWN_TOKEN))
    request.transport.close()
    raise asyncio.CancelledError  # as for a client gone: aiohttp ends the request quietly


def _caller_middleware(directory: Directory | None, hub: bool = False):
    """Set ``request["caller"]``: from SO_PEERCRED of the Unix socket in system mode; in
    hub mode as the hub token named it, and on the Unix socket (0600) the service's own
    user as an instructor (the operator's view); else the service's own user."""
    own = service_caller()
    if hub:
        own = replace(own, instructor=True)

    @web.middleware
    async def identify(request: web.Request, handler: Handler) -> web.StreamResponse:
        caller = request.get("caller", own)
        if directory is not None:
            sock = request.transport.get_extra_info("socket") if request.transport else None
            if sock is None or sock.family != socket.AF_UNIX:
                raise PermissionDenied(
                    "a system service identifies callers over its Unix socket only: connect "
                    "to its socket (see jupyter-sandbox status)"
                )
            caller = directory.caller(peer_uid(sock))
        request["caller"] = acting_for(caller, request.headers.get(ACTING_FOR_HEADER))
        return await handler(request)

    return identify


async def _json(request: web.Request, allowed: Iterable[str]) -> dict[str, Any]:
    """The request's JSON object (empty if there is no body); only the `allowed` keys."""
    if not request.can_read_body:
        return {}
    data = await request.read()
    try:
        text = data.decode(request.charset or "utf-8")
    except (UnicodeDecodeError, LookupError) as e:
        raise InvalidRequest(f"the request body is not text: {shown(e, 200)}") from None
    return _object(text, allowed)


def _object(text: str, allowed: Iterable[str]) -> dict[str, Any]:
    """`text` as a JSON object with only the `allowed` keys, or InvalidRequest."""
    try:
        body = json.loads(text, parse_constant=_no_constant)
    except InvalidRequest:
        raise
    except ValueError as e:  # not JSON, or an integer of thousands of digits
        raise InvalidRequest(f"the request body is not valid JSON: {shown(e, 200)}") from None
    except RecursionError:
        raise InvalidRequest("the request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    unknown = set(body) - set(allowed)
    if unknown:
        raise InvalidRequest(
            f"unknown option(s): {', '.join(sorted(unknown))} (accepted: {', '.join(allowed)})"
        )
    return body


def _no_constant(name: str) -> NoReturn:
    raise InvalidRequest(f"the request body contains {name}, which is not a JSON number")


def _optional(body: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    """`body[name]` if it is absent, null or of type `kind` (never a bool for numbers)."""
    value = body.get(name)
    numeric = kind in (int, float) or kind == (int, float)
    if value is None or (isinstance(value, kind) and not (numeric and isinstance(value, bool))):
        return value
    what = {str: "a string", bool: "true or false", int: "a whole number"}.get(kind, "a number")
    raise InvalidRequest(f"{name} must be {what}")


def _query_path(request: web.Request) -> str:
    path = request.query.get("path")
    if not path:
        raise InvalidRequest("the 'path' parameter is required")
    return path


def _int(value: str | None, name: str, low: int = 0, high: int = MAX_SIZE) -> int | None:
    """A whole-number query or path parameter from `low` to `high`, or None if not given."""
    if value is None:
        return None
    number = int(value) if _INTEGER.fullmatch(value) else None
    if number is None or not low <= number <= high:
        raise InvalidRequest(f"{name} must be a whole number from {low} to {high}")
    return number


def _flag(request: web.Request, name: str) -> bool:
    """A true/false query parameter: 1 or true, 0 or false (absent: false)."""
    value = request.query.get(name, "0").lower()
    if value not in FLAGS:
        raise InvalidRequest(f"{name} must be 1, true, 0 or false, not {shown(value)}")
    return value in ("1", "true")


async def _usage_subject(request: web.Request) -> Caller:
    """Whose usage a request asks for: the caller's own, or (an instructor's request with
    `user=NAME`) that user's."""
    caller: Caller = request["caller"]
    name = request.query.get("user")
    if name is None or name == caller.user:
        return caller
    if not caller.instructor:
        raise PermissionDenied(
            "only an instructor may see another user's usage: leave out user= for your own"
        )
    directory = request.app["directory"]
    if isinstance(directory, HubDirectory):
        return await directory.named(name)
    try:
        uid = pwd.getpwnam(name).pw_uid
    except (KeyError, ValueError):  # ValueError: a NUL in the name
        raise InvalidRequest(f"no user named {shown(name)} on this machine") from None
    return directory.caller(uid)  # instructors exist in system mode only


class Api:
    def __init__(self, manager: Manager, ssh: SshAccessManager) -> None:
        self.manager = manager
        self.ssh = ssh

    def _sandbox(self, request: web.Request) -> Live:
        """The sandbox of the request, if its caller may see it (else SandboxNotFound)."""
        return self.manager.get(request.match_info["ref"], request["caller"])

    def _live(self, request: web.Request) -> Live:
        """The sandbox of the request, to run something in: SandboxFailed if it failed."""
        return self.manager.running(request.match_info["ref"], request["caller"])

    async def _files(self, request: web.Request) -> Live:
        """The sandbox of the request, for its files and logs (also when it failed)."""
        return await self.manager.files(request.match_info["ref"], request["caller"])

    async def _audit(self, request: web.Request, live: Live, what: str) -> None:
        """An instructor acting on another user's sandbox: one line in that sandbox's log,
        "instructor bob: <what>", which its user reads with logs()."""
        caller: Caller = request["caller"]
        if live.record.uid == caller.uid:
            return
        line = f"instructor {caller.actor}: {what}"
        log.info("sandbox %s of %s: %s", live.record.id, live.record.user, line)
        self.manager.audit_log(live).note(AUDIT_SOURCE, line)

    # -- sandboxes ---------------------------------------------------------------------

    async def openapi(self, request: web.Request) -> web.Response:
        """The OpenAPI document of this API, with this host's limits."""
        return web.json_response(openapi.document(openapi.Bounds.of(self.manager)))

    async def status(self, request: web.Request) -> web.Response:
        backend = self.manager.backend
        caller: Caller = request["caller"]
        # Pooled sandboxes become users' sandboxes: their ids are nobody else's business.
        pool = {*self.manager.pool, *self.manager.pool_starting}
        shown_pool = pool if caller.instructor or caller.uid == self.manager.own_user.uid else set()
        return web.json_response(
            {
                "pid": request.app["pid"],
                "version": request.app["version"],
                "started_at": request.app["started_at"],
                "sandboxes": len(self.manager.list(caller=caller)),
                "pool": sorted(shown_pool),
                "ssh": {
                    "host": self.ssh.host,
                    "port": self.ssh.gateway.port if self.ssh.gateway else None,
                },
                "isolation": backend.unavailable or "ok",
                "cgroups": backend.limits_status(),
            }
        )

    async def usage(self, request: web.Request) -> web.Response:
        """The caller's quota (null: unlimited), where each key of it is set, and what the
        caller's running and failed sandboxes hold against it; an instructor may ask for
        another user's with `user=NAME`."""
        caller = await _usage_subject(request)
        quota = self.manager.quotas.of(caller.user, caller.groups)
        return web.json_response(
            {
                "user": caller.user,
                "uid": caller.uid,
                "instructor": caller.instructor,
                "mode": request.app["mode"],
                "quota": quota.as_json(),
                "source": quota.sources(),
                "usage": self.manager.use_of(caller.uid).as_json(),
            }
        )

    async def list(self, request: web.Request) -> web.Response:
        """The caller's sandboxes (an instructor's: everyone's); `user=NAME` only that
        user's, `mine=1` only the caller's own."""
        caller: Caller = request["caller"]
        records = self.manager.list(_flag(request, "all"), caller)
        user = request.query.get("user")
        if user is not None:
            records = [r for r in records if r.user == user]
        if _flag(request, "mine"):
            records = [r for r in records if r.uid == caller.uid]
        return web.json_response(
            {"sandboxes": [record_json(r, self.manager.live.get(r.id)) for r in records]}
        )

    async def events(self, request: web.Request) -> web.StreamResponse:
        """Sandbox lifecycle events as JSON lines: "created", "updated", "failed",
        "restarted", "ended"."""
        queue: asyncio.Queue = asyncio.Queue(maxsize=1000)
        caller: Caller = request["caller"]

        def listener(event: str, record: SandboxRecord) -> None:
            if not self.manager.visible(record, caller):
                return
            with contextlib.suppress(asyncio.QueueFull):
                sandbox = record_json(record, self.manager.live.get(record.id))
                queue.put_nowait({"event": event, "sandbox": sandbox})

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
        body = await _json(request, CREATE_OPTIONS)
        record = await self.manager.create(**body, caller=request["caller"])
        data = record_json(record, self.manager.live.get(record.id))
        data["lease"] = record.lease_id
        data["lease_ttl"] = self.manager.settings.lease_ttl
        return web.json_response(data, status=201)

    async def info(self, request: web.Request) -> web.Response:
        live = self._sandbox(request)
        await self.manager.check(live)
        data = record_json(live.record, live)
        data["usage"] = self.manager.usage(live)
        return web.json_response(data)

    async def kill(self, request: web.Request) -> web.Response:
        live = self._sandbox(request)
        await self._audit(request, live, "killed the sandbox")
        record = await self.manager.kill(live.record.id)
        return web.json_response(record_json(record))

    async def restart(self, request: web.Request) -> web.Response:
        live = self._sandbox(request)
        record = await self.manager.restart(live.record.id)
        await self._audit(request, live, "restarted the sandbox")
        return web.json_response(record_json(record, self.manager.live.get(record.id)))

    async def extend(self, request: web.Request) -> web.Response:
        body = await _json(request, ("timeout",))
        live = self._sandbox(request)
        record = self.manager.extend(live.record.id, body.get("timeout"), request["caller"])
        if record.expires_at is not None:
            deadline = time.strftime("%H:%M UTC", time.gmtime(record.expires_at))
            await self._audit(
                request, live, f"extended by {_given(body.get('timeout'))} (deadline {deadline})"
            )
        return web.json_response(record_json(record, live))

    async def renew(self, request: web.Request) -> web.Response:
        body = await _json(request, ("lease",))
        live = self._sandbox(request)
        record = self.manager.renew(live.record.id, _optional(body, "lease", str) or "")
        return web.json_response({"lease_expires": record.lease_expires})

    # -- SSH -------------------------------------------------------------------------

    async def expose_ssh(self, request: web.Request) -> web.Response:
        body = await _json(request, ("ttl", "single_use", "public_key"))
        _optional(body, "single_use", bool)
        _optional(body, "public_key", str)
        caller: Caller = request["caller"]
        live = self._live(request)
        access = self.ssh.expose(live.record.id, **body, uid=caller.uid)
        await self._audit(request, live, "exposed SSH access (a credential of their own)")
        return web.json_response(access)

    async def revoke_ssh(self, request: web.Request) -> web.Response:
        body = await _json(request, ("token",))
        live = self._sandbox(request)
        count = self.ssh.revoke(live.record.id, _optional(body, "token", str))
        await self._audit(request, live, f"revoked SSH access ({count} credential(s))")
        return web.json_response({"revoked": count})

    # -- processes ---------------------------------------------------------------------

    @staticmethod
    def _command(live: Live, body: dict[str, Any]) -> dict[str, Any]:
        """What to run, where, with the sandbox's environment plus the request's."""
        cmd, argv = _optional(body, "cmd", str), _optional(body, "argv", list)
        if argv is not None and not all(isinstance(a, str) for a in argv):
            raise InvalidRequest("argv must be a list of strings")
        if not cmd and not argv:
            raise InvalidRequest("give the command to run: cmd (a shell command) or argv")
        cwd = _optional(body, "cwd", str)
        if any("\0" in text for text in [cmd or "", *(argv or ()), cwd or ""]):
            raise InvalidRequest("a command and its working directory cannot contain NUL bytes")
        env = {**live.record.env, **check_env(_optional(body, "env", dict) or {})}
        return {"cmd": cmd, "argv": argv, "cwd": cwd, "env": env}

    async def exec(self, request: web.Request) -> web.StreamResponse:
        """Run a command; the response streams RESULT, STDOUT/STDERR and EXIT frames.

        A command with a timeout ends within that timeout plus GRACE even if the
        agent stops answering: the stream then ends with an ERROR frame.
        """
        live = self._live(request)
        if request.content_type == COMMAND_WITH_INPUT:
            body = _object(await read_request_line(request), COMMAND_OPTIONS)
            stdin = CommandInput(request.content)
        else:
            body = await _json(request, EXEC_OPTIONS)
            data = _stdin(body)
            stdin = None if data is None else CommandInput(None, data)
        timeout = _optional(body, "timeout", (int, float))
        if timeout is not None and not 0 < timeout <= MAX_SECONDS:
            raise InvalidRequest(
                f"timeout must be a number of seconds, more than 0 and at most {MAX_SECONDS}"
            )
        deadline = _Deadline(None if timeout is None else timeout + GRACE)
        command = self._command(live, body)
        await self._audit(request, live, f"ran {_quoted_command(command)}")
        agent = await live.agent.open("exec", **command, timeout=timeout, stdin=stdin is not None)
        async with agent:
            try:
                started = await agent.result(deadline.left(ANSWER_TIMEOUT))
            except AgentTimeout as e:
                raise _command_timeout(timeout, deadline, e) from None
            response = await _framed_response(request)
            await response.write(encode_json(Frame.RESULT, started))
            async with stdin.feeding(agent) if stdin is not None else contextlib.nullcontext():
                try:
                    await _relay_command(agent, response, deadline)
                except SandboxError as e:
                    await response.write(_error_frame(_command_timeout(timeout, deadline, e)))
            await response.write_eof()
            return response

    async def agent_socket(self, request: web.Request) -> web.Response:
        """Where the agent listens, for bulk transfers by a client on this machine.

        Only for the service's own user: other users cannot open the agent's socket, and
        an instructor's transfers must go through the service, which notes them."""
        if request.transport is None or not isinstance(
            request.transport.get_extra_info("sockname"), str
        ):
            raise PermissionDenied("the agent socket is offered over the Unix socket only")
        live = await self._files(request)
        own_uid = self.manager.own_user.uid
        if (request["caller"].uid, live.record.uid) != (own_uid, own_uid):
            raise PermissionDenied(
                "the agent socket is offered to the service's own user only: transfers go "
                "through the service's API"
            )
        socket_path = live.agent.endpoint().get("unix")
        if socket_path is None:
            raise PermissionDenied(
                "this service's sandboxes do not run on this host, so their agents have no "
                "socket here: transfers go through the service's API"
            )
        return web.json_response({"socket": socket_path})

    async def spawn(self, request: web.Request) -> web.Response:
        live = self._live(request)
        body = await _json(request, ("cmd", "argv", "cwd", "env"))
        command = self._command(live, body)
        await self._audit(request, live, f"started {_quoted_command(command)} in the background")
        info = await live.agent.call("spawn", **command)
        return web.json_response(info)

    async def procs(self, request: web.Request) -> web.Response:
        return web.json_response(await self._live(request).agent.call("procs"))

    async def proc_wait(self, request: web.Request) -> web.Response:
        live = self._live(request)
        seconds = _number(request.query.get("timeout"), "timeout")
        info = await live.agent.call(
            "proc_wait",
            answer_timeout=None if seconds is None else seconds + GRACE,
            pid=_int(request.match_info["pid"], "pid", 1, MAX_PID),
            timeout=seconds,
        )
        return web.json_response(info)

    async def proc_signal(self, request: web.Request) -> web.Response:
        live = self._live(request)
        body = await _json(request, ("signal",))
        number = _optional(body, "signal", int)
        if number is not None and not 1 <= number <= MAX_SIGNAL:
            raise InvalidRequest(f"signal must be a signal number from 1 to {MAX_SIGNAL}")
        pid = _int(request.match_info["pid"], "pid", 1, MAX_PID)
        number = signal.SIGTERM if number is None else number
        await self._audit(request, live, f"sent signal {int(number)} to process {pid}")
        info = await live.agent.call("proc_signal", pid=pid, signal=number)
        return web.json_response(info)

    async def logs(self, request: web.Request) -> web.StreamResponse:
        """Log entries as JSON lines, the sandbox's own merged in time order with the
        service's audit entries (stream "audit"); `follow=1` keeps streaming new ones.

        `after` and `pid` choose among the sandbox's entries (a process's output has no
        audit entries); `tail` counts both. The sandbox's entries are read until its
        agent fails or misbehaves; the audit entries are given whatever it does."""
        live = await self._files(request)
        query = request.query
        follow = _flag(request, "follow")
        after = _int(query.get("after"), "after") or 0
        tail = _int(query.get("tail"), "tail")
        pid = _int(query.get("pid"), "pid", 1, MAX_PID)
        audit = self.manager.audit_log(live)
        watch = audit.watch() if follow and pid is None else None
        try:
            ask = {"after": after, "tail": tail, "pid": pid}
            backlog, intact = await _sandbox_entries(live, ask, follow=False)
            last = backlog[-1]["seq"] if backlog else None
            noted = await asyncio.to_thread(audit.entries) if pid is None else []
            if pid is None:
                backlog = _merged(backlog, noted, tail)
            response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
            await response.prepare(request)
            for entry in backlog:
                await response.write(_ndjson(entry))
            if follow and intact:
                if last is not None:  # on from where the backlog ended
                    ask |= {"after": last, "tail": None}
                elif tail != 0:  # the log had none of these yet: all that come
                    ask |= {"tail": None}
                await _follow_logs(response, live, ask, watch, noted[-1]["seq"] if noted else 0)
            if follow:  # a sandbox being stopped: its info() tells why once its log ends
                await self.manager.end_recorded(live.record.id)
            await response.write_eof()
            return response
        finally:
            if watch is not None:
                audit.unwatch(watch)

    # -- files -------------------------------------------------------------------------

    async def file_op(self, request: web.Request) -> web.Response:
        op = request.path.rsplit("/", 1)[1]
        body = _file_op_args(op, await _json(request, FILE_OPS[op]))
        answer_timeout = REMOVE_TIMEOUT if op == "remove" else ANSWER_TIMEOUT
        live = await self._files(request)
        paths = " to ".join(_quoted(body[name]) for name in ("path", "src", "dst") if name in body)
        await self._audit(request, live, f"{FILE_OP_WORDS[op]} {paths}")
        return web.json_response(await live.agent.call(op, answer_timeout=answer_timeout, **body))

    async def read_file(self, request: web.Request) -> web.StreamResponse:
        return await self._download(request, "read")

    async def read_tar(self, request: web.Request) -> web.StreamResponse:
        return await self._download(request, "tar_out")

    async def _download(self, request: web.Request, op: str) -> web.StreamResponse:
        """A file's bytes (or a tree's tar stream) as frames: RESULT, DATA..., END or ERROR.

        A file may not send more than the size it announced; a silent agent ends
        the transfer with an ERROR frame after INACTIVITY seconds.
        """
        live = await self._files(request)
        path = _query_path(request)
        await self._audit(request, live, f"{FILE_OP_WORDS[op]} {_quoted(path)}")
        async with await live.agent.open(op, path=path) as agent:
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

    # -- terminal recordings -----------------------------------------------------------

    async def recordings(self, request: web.Request) -> web.Response:
        """The sandbox's terminal recordings, oldest first (also when it failed)."""
        directory = Path(self._sandbox(request).runtime.directory)
        found = await asyncio.to_thread(recording.list_recordings, directory)
        return web.json_response([info.to_json() for info in found])

    async def recording(self, request: web.Request) -> web.StreamResponse:
        """One recording, as the asciicast v2 file it is (up to where a live one has got)."""
        live = self._sandbox(request)
        name = request.match_info["name"]
        fd = await asyncio.to_thread(recording.open_recording, Path(live.runtime.directory), name)
        with open(fd, "rb") as file:
            await self._audit(request, live, f"replayed the terminal recording {name}")
            response = web.StreamResponse(headers={"Content-Type": recording.MEDIA_TYPE})
            left = response.content_length = os.fstat(fd).st_size
            await response.prepare(request)
            while left and (chunk := await asyncio.to_thread(file.read, min(CHUNK, left))):
                await response.write(chunk)
                left -= len(chunk)
            await response.write_eof()
            return response

    async def write_file(self, request: web.Request) -> web.Response:
        return await self._upload(request, "write", mode=_mode(request.query.get("mode")))

    async def write_tar(self, request: web.Request) -> web.Response:
        return await self._upload(request, "tar_in")

    async def _upload(self, request: web.Request, op: str, **args: Any) -> web.Response:
        live = await self._files(request)
        path = _query_path(request)
        await self._audit(request, live, f"{FILE_OP_WORDS[op]} {_quoted(path)}")
        async with await live.agent.open(op, path=path, **args) as agent:
            try:
                while chunk := await request.content.read(CHUNK):
                    await agent.send(Frame.DATA, chunk, INACTIVITY)
                await agent.send(Frame.END, b"", INACTIVITY)
            except ConnectionError:
                pass  # the agent refused early; its answer below says why
            return web.json_response(await agent.result(INACTIVITY))


def _quoted_command(command: dict[str, Any]) -> str:
    """A command as an audit line quotes it: "ls -la"."""
    return _quoted(command["cmd"] or shlex.join(command["argv"]))


def _quoted(text: str) -> str:
    """A command or path as an audit line quotes it, in double quotes (long ones cut)."""
    return json.dumps(text if len(text) <= AUDITED_TEXT else text[:AUDITED_TEXT] + "...")


def _given(timeout: Any) -> str:
    """A timeout as its caller gave it: "10m", or seconds as "600s"."""
    return timeout if isinstance(timeout, str) else f"{timeout:g}s"


def _file_op_args(op: str, body: dict[str, Any]) -> dict[str, Any]:
    """`body` if it has the arguments `op` needs, of their types; else InvalidRequest."""
    arguments = FILE_OPS[op]
    missing = [name for name, kind in arguments.items() if kind is str and name not in body]
    if missing:
        raise InvalidRequest(f"{op} needs the argument(s) {', '.join(missing)}")
    for name, value in body.items():
        kind = arguments[name]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise InvalidRequest(f"{op}: {name!r} must be of type {kind.__name__}")
    if not 0 <= body.get("mode", 0) <= 0o7777:
        raise InvalidRequest(f"{op}: 'mode' must be permission bits from 0 to 0o7777")
    return body


def _mode(value: str | None) -> int | None:
    """Permission bits given in octal ("644"), or None if not given."""
    if value is None:
        return None
    if not re.fullmatch(r"[0-7]{1,4}", value):
        raise InvalidRequest(f"mode must be octal permission bits such as 644, not {shown(value)}")
    return int(value, 8)


def _stdin(body: dict[str, Any]) -> bytes | None:
    """The command's input, sent base64-encoded as `input_b64`; None if there is none."""
    text = _optional(body, "input_b64", str)
    if text is None:
        return None
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise InvalidRequest("input_b64 must be base64 (RFC 4648, standard alphabet)") from None


def _number(value: str | None, name: str) -> float | None:
    """Seconds from 0 to a year given as a query parameter, or None if not given."""
    if value is None:
        return None
    seconds = float(value) if _DECIMAL.fullmatch(value) else -1.0
    if not 0 <= seconds <= MAX_SECONDS:
        raise InvalidRequest(f"{name} must be a number of seconds from 0 to {MAX_SECONDS}")
    return seconds


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


async def _sandbox_entries(
    live: Live, ask: dict[str, Any], follow: bool
) -> tuple[list[dict[str, Any]], bool]:
    """The sandbox's own log entries asked for, and whether its agent gave them all
    (an agent that fails or sends what it may not ends the list, logged)."""
    found: list[dict[str, Any]] = []
    try:
        async with await live.agent.open("logs", follow=follow, **ask) as agent:
            while (entry := await _next_log_entry(agent, ANSWER_TIMEOUT)) is not None:
                found.append(entry)
    except SandboxError as e:
        log.warning("the log of sandbox %s could not be read: %s", live.record.id, e)
        return found, False
    return found, True


def _merged(
    sandbox: list[dict[str, Any]], audit: list[dict[str, Any]], tail: int | None
) -> list[dict[str, Any]]:
    """Both lists in time order (each already is), the last `tail` of them if asked."""
    entries = list(heapq.merge(sandbox, audit, key=lambda e: e["time"]))
    if tail is not None:
        entries = entries[-tail:] if tail else []
    return entries


async def _follow_logs(
    response: web.StreamResponse,
    live: Live,
    ask: dict[str, Any],
    watch: asyncio.Queue | None,
    audit_seen: int,
) -> None:
    """New entries of the sandbox and of its audit log as each comes, until the
    sandbox's log ends; if its agent fails, the audit entries noted meanwhile still come.
    Audit entries up to `audit_seen` were in the backlog already."""
    try:
        agent = await live.agent.open("logs", follow=True, **ask)
    except SandboxError as e:
        log.warning("log stream of %s ended: %s", live.record.id, e)
        return
    async with agent:
        sandbox = asyncio.ensure_future(_next_log_entry(agent, None))
        audit = asyncio.ensure_future(watch.get()) if watch is not None else None
        try:
            while True:
                waiting = {sandbox} if audit is None else {sandbox, audit}
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if audit in done:
                    if audit.result()["seq"] > audit_seen:
                        await response.write(_ndjson(audit.result()))
                    audit = asyncio.ensure_future(watch.get())
                if sandbox in done:
                    entry = await _settled(sandbox, live.record.id)
                    if entry is None:
                        break
                    await response.write(_ndjson(entry))
                    sandbox = asyncio.ensure_future(_next_log_entry(agent, None))
        finally:
            for task in (sandbox, audit):
                if task is not None:
                    task.cancel()
    while watch is not None and not watch.empty():
        if (entry := watch.get_nowait())["seq"] > audit_seen:
            await response.write(_ndjson(entry))


async def _settled(task: asyncio.Future, sandbox_id: str) -> dict[str, Any] | None:
    """The entry a finished read got; None at the end of the log or if it failed."""
    try:
        return task.result()
    except SandboxError as e:
        log.warning("log stream of %s ended: %s", sandbox_id, e)
        return None


def _ndjson(entry: dict[str, Any]) -> bytes:
    return json.dumps(entry).encode() + b"\n"


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
