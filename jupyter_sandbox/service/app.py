"""Running the service: one per OS user, on a 0600 Unix socket, found through a runtime file.

It holds an exclusive lock for its whole life so a second one cannot start,
writes the runtime file once it is listening, and exits by itself after an
idle period with no sandboxes. Sandboxes are not stopped when the service
stops: a service started later re-adopts them.

In system mode (`serve --system`, as root) one service serves every user of the
machine: its socket is 0666 and each request's caller is the socket peer's uid; the
runtime file is world-readable and holds no token; it never exits for being idle.
Its config file (instructor groups, quotas) is read at start and again on SIGHUP.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from .. import __version__
from .._config import Paths, Settings
from ..backends import make_backend
from . import config_file
from .api import make_app
from .connections import BoundedSockSite, BoundedUnixSite
from .hub_auth import HubDirectory, HubSettings, open_hub_directory
from .identity import Directory
from .locks import try_lock
from .manager import Manager
from .quotas import Quotas
from .ssh_access import SshAccessManager
from .ssh_port import API_LISTEN_FD_ENV, bind_listener, inherited_socket
from .state import State

log = logging.getLogger("jupyter_sandbox.service")
# A request line long enough for any path a sandbox can hold (4,096 bytes, each of which
# may take 3 characters to quote), with room for the rest of the URL.
MAX_REQUEST_LINE = 64 << 10


def private_log(paths: Paths) -> None:
    """Make the service log (which may have been created by a shell redirect) 0600."""
    with contextlib.suppress(FileNotFoundError):
        os.chmod(paths.log_file, 0o600)


class AlreadyRunning(RuntimeError):
    """Another service of this user holds the lock."""


class NotRoot(PermissionError):
    """System mode was asked for by a user other than root."""


def check_system_mode_allowed(tcp: object) -> None:
    """`serve --system` runs as root and on its Unix socket only; else a clear error."""
    if os.geteuid() != 0:
        raise NotRoot(
            "serve --system runs as root only (it serves every user of the machine and "
            "runs their sandboxes as uids of their own): start it with sudo or its systemd "
            "unit (systemctl start jupyter-sandbox), or run `jupyter-sandbox serve` for a "
            "service of your own"
        )
    if tcp:
        raise ValueError(
            "serve --system cannot listen on TCP: it tells its callers apart by the peer "
            "credentials of its Unix socket, which a TCP connection does not carry. Leave "
            "out --tcp (remote users reach sandboxes through the SSH gateway)"
        )


class Service:
    def __init__(
        self,
        paths: Paths | None = None,
        settings: Settings | None = None,
        tcp: tuple[str, int] | None = None,
        hub: HubSettings | None = None,
    ) -> None:
        self.paths = paths or Paths.default()
        self.settings = settings or Settings.from_env()
        self.tcp = tcp
        self.hub = hub  # hub mode: TCP callers are hub users, named by their tokens
        self.stopping = asyncio.Event()
        self._lock_fd: int | None = None
        self.config_path = config_file.path(self.shared)
        # Called with the config file's tables at start and after each SIGHUP reload.
        self.config_listeners: list[Callable[[dict[str, Any]], None]] = []
        self.directory: Directory | HubDirectory | None = None

    @property
    def system(self) -> bool:
        return self.paths.mode == "system"

    @property
    def shared(self) -> bool:
        """Serving many users (system or hub mode): an administrator's config file and
        quotas, a cap on each user's SSH connections, no exit when idle."""
        return self.system or self.hub is not None

    def _read_config(self) -> dict[str, Any]:
        """The config file's tables (see config_file.path for where it is)."""
        return config_file.load(self.config_path)

    def _quotas(self, config: dict[str, Any]) -> Quotas:
        return Quotas.parse(config, self.config_path, administered=self.shared)

    def _apply_config(self, config: dict[str, Any]) -> None:
        groups = config_file.instructor_groups(config, self.config_path)
        if self.directory is not None:
            self.directory.set_instructor_groups(groups)
        for listener in self.config_listeners:
            listener(config)

    def _reload_config(self) -> None:
        """SIGHUP: read the config file again; a bad one is logged and the old one kept."""
        try:
            config = self._read_config()
            config_file.instructor_groups(config, self.config_path)
            self._quotas(config)
            self._apply_config(config)
        except ValueError as e:
            log.error("%s; keeping the configuration read before", e)
            return
        log.info("read the config file %s again", self.config_path)

    def _lock(self) -> None:
        self._lock_fd = try_lock(self.paths.lock_file)
        if self._lock_fd is None:
            raise AlreadyRunning("a sandbox service is already running for this user")

    def _api_token(self) -> str:
        """The TCP API's bearer token, kept (mode 0600) so that clients holding it keep
        working after a restart; made at the first start, again once removed."""
        path = self.paths.data_dir / "api-token"
        with contextlib.suppress(FileNotFoundError):
            if token := path.read_text().strip():
                return token
        token = secrets.token_urlsafe(32)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(token)  # 0600: the umask is 077
        os.replace(tmp, path)
        return token

    async def run(self, ready: Callable[[], None] | None = None) -> None:
        """Serve until SIGTERM/SIGINT or until idle; `ready()` is called once listening."""
        os.umask(0o077)
        if self.system:
            check_system_mode_allowed(self.tcp)
            self.paths.make_system_dirs()
        config = self._read_config()  # a bad file stops the start, saying where and why
        quotas = self._quotas(config)
        if self.system:
            self.directory = Directory(config_file.instructor_groups(config, self.config_path))
        self._lock()
        private_log(self.paths)
        backend = make_backend(self.settings, self.paths.storage_dir)
        # Claims the storage (and host uids, or the cluster's objects) for as long as
        # this process lives.
        await backend.prepare(self.paths.data_dir, self.settings.uid_base)
        if backend.unavailable:
            log.error("isolation unavailable: %s", backend.unavailable)
        state = await State.open(self.paths.database, backend, self.settings.lease_ttl)
        manager = Manager(state, backend, self.settings)
        manager.quotas = quotas
        self.config_listeners.append(
            lambda config: setattr(manager, "quotas", self._quotas(config))
        )
        await manager.start()
        ssh = SshAccessManager(manager, self.paths.data_dir / "ssh", system=self.shared)
        await ssh.start()
        token = self._api_token() if self.tcp and not self.hub else None
        if self.hub:
            self.directory = open_hub_directory(self.hub, self.paths.data_dir, manager)
        app = make_app(manager, ssh, token, self.directory)
        self._apply_config(config)
        app["pid"], app["version"], app["started_at"] = os.getpid(), __version__, time.time()
        runner = web.AppRunner(
            app, handler_cancellation=True, access_log=None, max_line_size=MAX_REQUEST_LINE
        )
        await runner.setup()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.paths.socket)
        site = BoundedUnixSite if self.system else web.UnixSite  # 0666: a bound per user
        await site(runner, str(self.paths.socket)).start()
        os.chmod(self.paths.socket, 0o666 if self.system else 0o600)
        runtime = {
            "pid": os.getpid(),
            "socket": str(self.paths.socket),
            "version": __version__,
            "ssh_port": ssh.gateway.port,
            "mode": self.paths.mode,
        }
        if self.tcp:
            sock = inherited_socket(API_LISTEN_FD_ENV)  # held by the supervisor
            if self.hub:  # every hub user's port: a bound per peer address
                site = BoundedSockSite(runner, sock or bind_listener(*self.tcp))
            else:
                site = web.SockSite(runner, sock) if sock else web.TCPSite(runner, *self.tcp)
            await site.start()
            host, port = site._server.sockets[0].getsockname()[:2]
            runtime.update(url=f"http://{host}:{port}", token=token)
        tmp = self.paths.runtime_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(runtime))
        os.chmod(tmp, 0o644 if self.system else 0o600)
        os.replace(tmp, self.paths.runtime_file)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload_config)
        log.info("serving on %s (pid %d, %s mode)", self.paths.socket, os.getpid(), self.paths.mode)
        if ready:
            ready()
        idle = asyncio.create_task(
            asyncio.Event().wait()  # the machine's service stays, idle or not
            if self.shared
            else self._idle_watch(manager, app["activity"])
        )
        try:
            await self.stopping.wait()
        finally:
            idle.cancel()
            with contextlib.suppress(FileNotFoundError):
                self.paths.runtime_file.unlink()
            await runner.cleanup()
            if isinstance(self.directory, HubDirectory):
                await self.directory.close()
            await ssh.close()
            await manager.close()
            await backend.close()
            await asyncio.to_thread(state.close)
            log.info("service stopped")

    async def _idle_watch(self, manager: Manager, activity) -> None:
        while True:
            await asyncio.sleep(min(5.0, self.settings.idle_timeout / 4))
            if not manager.live and activity.idle_for() > self.settings.idle_timeout:
                log.info("idle for %.0f s with no sandboxes: exiting", activity.idle_for())
                self.stopping.set()
                return
