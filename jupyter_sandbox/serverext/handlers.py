"""REST and websocket endpoints under ``<base_url>sandbox/api/``; all require Jupyter's auth.

REST changes (POST, DELETE) go through Jupyter's XSRF check when authenticated by
cookie. Websockets: ``events`` (list snapshot, lifecycle changes, usage samples),
``sandboxes/<ref>/logs`` (live log entries) and ``tunnel/<ref>`` (raw bytes to the
service's SSH gateway, for ``jupyter-sandbox tunnel``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import secrets
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jupyter_server.auth.decorator import authorized, ws_authenticated
from jupyter_server.base.handlers import APIHandler, JupyterHandler
from jupyter_server.base.websocket import WebSocketMixin
from tornado import web
from tornado.websocket import WebSocketClosedError, WebSocketHandler

from .._errors import SandboxError
from .._models import SshAccess
from .._ssh_config import HOST_ALIAS, write_ssh_config
from .._tunnel_socket import GatewayTunnel
from ..ssh.recording import MEDIA_TYPE
from .hub import Message, SandboxHub

AUTH_RESOURCE = "sandboxes"
LOG_TAIL = 500


@contextlib.contextmanager
def service_errors() -> Iterator[None]:
    """Report the service's typed errors with their HTTP status."""
    try:
        yield
    except SandboxError as e:
        status = e.status if e.status >= 400 else 500
        raise web.HTTPError(status, str(e), reason=type(e).__name__) from e
    except ValueError as e:
        raise web.HTTPError(400, str(e)) from e


class _Base(JupyterHandler):
    auth_resource = AUTH_RESOURCE

    def initialize(self, hub: SandboxHub, ssh_dir: Path | None = None) -> None:
        self.hub = hub
        self.ssh_dir = ssh_dir


class _Api(_Base, APIHandler):
    def body(self) -> dict[str, Any]:
        data = self.get_json_body() or {}
        if not isinstance(data, dict):
            raise web.HTTPError(400, "the request body must be a JSON object")
        return data

    def reply(self, data: Any, status: int = 200) -> None:
        self.set_status(status)
        self.finish(json.dumps(data))


class SandboxesHandler(_Api):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        with service_errors():
            self.reply({"sandboxes": await self.hub.list()})

    @web.authenticated
    @authorized
    async def post(self) -> None:
        options = self.body()
        image = options.pop("image", None)
        if image is not None:
            image = image_dir(self.settings["server_root_dir"], image)
        with service_errors():
            self.reply(await self.hub.create(options, image=image), 201)


def image_dir(root_dir: str, path: Any) -> Path:
    """The directory `path` (relative to the server's root) as an absolute path.

    It must be a directory inside `root_dir` once symlinks and ``..`` are resolved;
    otherwise the request fails with 400.
    """
    if not isinstance(path, str) or not path.strip():
        raise web.HTTPError(400, "'image' must be a directory path relative to the server root")
    root = Path(os.path.expanduser(root_dir)).resolve()
    target = (root / path.strip()).resolve()
    if not target.is_relative_to(root):
        raise web.HTTPError(400, f"image directory {path!r} is outside the server's root directory")
    if not target.exists():
        raise web.HTTPError(400, f"image directory {path!r} does not exist")
    if not target.is_dir():
        raise web.HTTPError(400, f"image {path!r} is not a directory")
    return target


class SandboxHandler(_Api):
    @web.authenticated
    @authorized
    async def get(self, ref: str) -> None:
        with service_errors():
            self.reply(await self.hub.get(ref))

    @web.authenticated
    @authorized
    async def delete(self, ref: str) -> None:
        with service_errors():
            await self.hub.kill(ref)
        self.set_status(204)
        self.finish()


class TimeoutHandler(_Api):
    """POST ``{"add": "10m"}``: more time on top of what is left (the panel's Extend);
    ``{"timeout": "30m"}``: a new deadline counted from now."""

    @web.authenticated
    @authorized
    async def post(self, ref: str) -> None:
        body = self.body()
        if ("add" in body) == ("timeout" in body):
            raise web.HTTPError(
                400, 'give either "add" (time to add, e.g. "10m") or "timeout" (from now)'
            )
        with service_errors():
            if "add" in body:
                self.reply(await self.hub.extend_by(ref, body["add"]))
            else:
                self.reply(await self.hub.extend(ref, body["timeout"]))


class UsageHandler(_Api):
    """GET: the user's sandboxes, memory and CPUs against their quota, from the service.

    ``{"available": false}`` when the service keeps no such account (an older one).
    """

    @web.authenticated
    @authorized
    async def get(self) -> None:
        with service_errors():
            usage = await self.hub.usage()
        self.reply({"available": False} if usage is None else {"available": True, **usage})


class RecordingsHandler(_Api):
    """GET: the sandbox's terminal recordings, oldest first: [{name, started_at, size}]."""

    @web.authenticated
    @authorized
    async def get(self, ref: str) -> None:
        with service_errors():
            self.reply(await self.hub.recordings(ref))


class RecordingHandler(_Api):
    """GET: one recording, the asciicast v2 file (application/x-asciicast)."""

    @web.authenticated
    @authorized
    async def get(self, ref: str, name: str) -> None:
        with service_errors():
            data = await self.hub.recording(ref, name)
        self.finish(data, set_content_type=MEDIA_TYPE)


class RestartHandler(_Api):
    """POST: start a failed sandbox again, with its files."""

    @web.authenticated
    @authorized("execute")
    async def post(self, ref: str) -> None:
        with service_errors():
            self.reply(await self.hub.restart(ref))


def access_json(access: SshAccess) -> Message:
    data = dataclasses.asdict(access)
    data["token"] = access.username
    return data


class SshHandler(_Api):
    """POST: the SSH access (reused while valid; ``{"fresh": true}`` for a new one).

    DELETE: revoke every credential of the sandbox.
    """

    @web.authenticated
    @authorized("execute")
    async def post(self, ref: str) -> None:
        with service_errors():
            access = await self.hub.ssh_access(ref, fresh=bool(self.body().get("fresh")))
        self.set_header("Cache-Control", "no-store")
        self.reply(access_json(access))

    @web.authenticated
    @authorized
    async def delete(self, ref: str) -> None:
        with service_errors():
            self.reply({"revoked": await self.hub.revoke_ssh(ref)})


class TerminalHandler(_Api):
    """POST: a new JupyterLab terminal running ``ssh`` into the sandbox.

    The terminal's process is OpenSSH with a private config file holding a
    single-use credential, so the token never shows on screen or in ``ps``.
    """

    @web.authenticated
    @authorized("execute")
    async def post(self, ref: str) -> None:
        manager = self.settings.get("terminal_manager")
        if manager is None or self.ssh_dir is None:
            raise web.HTTPError(503, "terminals are not available on this server")
        with service_errors():
            access = await self.hub.terminal_access(ref)
            gateway = await self.hub.gateway()
        script = ssh_script(access, gateway, self.ssh_dir)
        model = manager.create(shell_command=["sh", "-c", *script])
        self.reply({"name": model["name"], "sandbox": access.sandbox_id}, 201)


def ssh_script(access: SshAccess, gateway: tuple[str, int], ssh_dir: Path) -> tuple[str, str]:
    """A ``sh -c`` script (and its $0) that SSHes in with `access`, then removes its files.

    It connects to the gateway's local address and pins the gateway's host key.
    """
    ssh_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    stem = ssh_dir / f"{access.sandbox_id}-{secrets.token_hex(8)}"  # argv shows its name
    known_hosts, config = stem.with_suffix(".known_hosts"), stem.with_suffix(".config")
    host, port = gateway
    key = access.known_hosts_line.split(maxsplit=1)[1]
    known_hosts.write_text(f"{host if port == 22 else f'[{host}]:{port}'} {key}\n")
    write_ssh_config(config, host, port, access.username, known_hosts)
    script = f'ssh -F "$0" {HOST_ALIAS}; rm -f "$0" {shlex.quote(str(known_hosts))}'
    return script, str(config)


class _Socket(WebSocketMixin, WebSocketHandler, _Base):
    """A websocket that needs Jupyter's auth, and the sandboxes' permission."""

    async def _send(self, message: Message | bytes) -> None:
        binary = isinstance(message, bytes)
        await self.write_message(message if binary else json.dumps(message), binary=binary)


class EventsSocket(_Socket):
    """Pushes ``snapshot``, ``created``/``updated``/``ended`` and ``usage`` messages."""

    @ws_authenticated
    @authorized
    async def get(self, *args: Any, **kwargs: Any) -> None:
        await super().get(*args, **kwargs)

    async def open(self, *args: str, **kwargs: str) -> None:
        with service_errors():
            await self.hub.subscribe(self._push)

    def _push(self, message: Message) -> None:
        with contextlib.suppress(WebSocketClosedError):
            self.write_message(json.dumps(message))

    def on_close(self) -> None:
        self.hub.unsubscribe(self._push)


class LogsSocket(_Socket):
    """Streams the sandbox's log entries as JSON, following until it ends."""

    @ws_authenticated
    @authorized
    async def get(self, ref: str) -> None:
        with service_errors():
            self.sandbox = await self.hub.handle(ref)
        await super().get(ref)

    def open(self, *args: str, **kwargs: str) -> None:
        tail = self.get_query_argument("tail", str(LOG_TAIL))
        self._task = asyncio.create_task(self._stream(int(tail) if tail.isdigit() else LOG_TAIL))

    async def _stream(self, tail: int) -> None:
        try:
            async for entry in self.sandbox.logs(follow=True, tail=tail):
                await self._send(dataclasses.asdict(entry))
        except SandboxError as e:
            with contextlib.suppress(WebSocketClosedError):
                await self._send({"error": type(e).__name__, "message": str(e)})
        except WebSocketClosedError:
            return
        self.close()

    def on_close(self) -> None:
        self._task.cancel()


class TunnelSocket(GatewayTunnel, _Socket):
    """Carries an SSH connection to the service's gateway, which picks the sandbox by token."""

    @ws_authenticated
    @authorized("execute")
    async def get(self, ref: str) -> None:
        with service_errors():
            await self.hub.handle(ref)  # 404 now rather than a dead connection later
            self.address = await self.hub.gateway()
        await super().get(ref)


def handlers(hub: SandboxHub, ssh_dir: Path) -> list[tuple[str, type, dict[str, Any]]]:
    """URL patterns (relative to base_url) and their handlers."""
    one = r"sandbox/api/sandboxes/(?P<ref>[\w.-]+)"
    kwargs = {"hub": hub, "ssh_dir": ssh_dir}
    return [
        (pattern, handler, kwargs)
        for pattern, handler in (
            (r"sandbox/api/sandboxes", SandboxesHandler),
            (r"sandbox/api/usage", UsageHandler),
            (one, SandboxHandler),
            (f"{one}/timeout", TimeoutHandler),
            (f"{one}/restart", RestartHandler),
            (f"{one}/ssh", SshHandler),
            (f"{one}/terminal", TerminalHandler),
            (f"{one}/recordings", RecordingsHandler),
            (f"{one}/recordings/(?P<name>[^/]+)", RecordingHandler),
            (f"{one}/logs", LogsSocket),
            (r"sandbox/api/events", EventsSocket),
            (r"sandbox/api/tunnel/(?P<ref>[\w.-]+)", TunnelSocket),
        )
    ]
