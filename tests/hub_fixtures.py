"""A real JupyterHub for the tests: local users' servers, the system sandbox service and
the instructor dashboard, all driven through the hub's HTTP API.

* `system_service`: ``jupyter-sandbox serve --system`` as root, with private run, data
  and config directories (the contract's test rule), so no other test's client finds it.
* `hub`: JupyterHub on free ports with configurable-http-proxy, ``DummyAuthenticator``
  with a password, ``LocalProcessSpawner`` (each user's server runs as that OS user,
  from the world-readable shared venv), the system service passed to the servers in
  ``JUPYTER_SANDBOX_SYSTEM_RUN``, and the dashboard as the hub service ``sandboxes``.
  Teardown stops the hub (which stops the proxy, every user's server and the dashboard)
  and checks that no process of the test users is left.

Needs root, the npm package configurable-http-proxy and PyPI jupyterhub.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import _alive, _children, stop_process, wait_for
from tests.serverext_fixtures import free_port
from tests.system_fixtures import (
    SHARED_VENV,
    OsUser,
    SystemService,
    os_users,
    start_system_service,
    user_processes,
)

ROOT = Path(__file__).resolve().parent.parent
PROXY = "configurable-http-proxy"
DASHBOARD = "sandboxes"
PASSWORD = secrets.token_urlsafe(12)
# A short lease: a user's server stopped from the hub leaves its kernels' sandboxes to
# lapse (FIELD_NOTES: Jupyter Server exits on SIGINT without shutting kernels down).
LEASE_TTL = 4.0
# Hub users with no OS account (they never start a server): a hub admin, and a teaching
# assistant who holds the dashboard's instructor role.
HUB_ADMIN, HUB_TA, TA_ROLE = "hub-admin", "hub-ta", "sandbox-ta"


def requirements() -> None:
    """Skip (with the reason) where a real hub cannot run."""
    if os.geteuid() != 0:
        pytest.skip("a hub with local users' servers needs root")
    if shutil.which(PROXY) is None:
        pytest.skip(f"needs the npm package {PROXY} (npm install -g {PROXY})")
    pytest.importorskip("jupyterhub")


def hub_api(api_url: str, token: str, method: str, path: str, timeout: float, **kwargs: Any) -> Any:
    """A call with `token` to the hub REST API at `api_url` (``.../hub/api``); the JSON reply,
    None if empty."""
    reply = httpx.request(
        method,
        f"{api_url}/{path}",
        headers={"Authorization": f"token {token}"},
        timeout=timeout,
        **kwargs,
    )
    reply.raise_for_status()
    return reply.json() if reply.content else None


def wait_hub_answers(proc: subprocess.Popen, api_url: str, log: Path) -> None:
    """Wait until the hub started as `proc` answers at `api_url`; should it exit first, fail
    with the tail of its `log`."""

    def up() -> bool:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-4000:]
            raise AssertionError(f"jupyterhub exited {proc.returncode}:\n{tail}")
        try:
            return httpx.get(f"{api_url}/", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, 60, interval=0.2, message="the hub to answer")


@dataclass
class Hub:
    """A running JupyterHub; `users` are its students, `instructor` its teacher."""

    url: str  # the proxy's public URL, no trailing slash
    admin_token: str
    proc: subprocess.Popen
    base: Path
    students: list[OsUser]
    instructor: OsUser
    instructor_group: str
    service: SystemService
    tokens: dict[str, str] = field(default_factory=dict)

    @property
    def log(self) -> str:
        return (self.base / "hub.log").read_text(errors="replace")

    def api(self, method: str, path: str, token: str | None = None, **kwargs: Any) -> Any:
        """A call to the hub's REST API (``/hub/api/...``), by default as the admin."""
        return hub_api(f"{self.url}/hub/api", token or self.admin_token, method, path, 60, **kwargs)

    def token(self, user: OsUser) -> str:
        """An API token of `user`, made through the hub's API."""
        if user.name not in self.tokens:
            reply = self.api("POST", f"users/{user.name}/tokens", json={"note": "hub tests"})
            self.tokens[user.name] = reply["token"]
        return self.tokens[user.name]

    def start_servers(self, *users: OsUser) -> list[str]:
        """Start the users' servers at once (those not running); their URLs."""
        for user in users:
            response = httpx.post(
                f"{self.url}/hub/api/users/{user.name}/server",
                headers={"Authorization": f"token {self.admin_token}"},
                timeout=60,
            )
            assert response.status_code in (201, 202, 400), response.text  # 400: running

        def ready(user: OsUser) -> bool:
            model = self.api("GET", f"users/{user.name}")
            return bool(model.get("servers", {}).get("", {}).get("ready"))

        for user in users:
            wait_for(lambda u=user: ready(u), 90, interval=0.3, message=f"{user.name}'s server")
        return [f"{self.url}/user/{user.name}/" for user in users]

    def stop_server(self, user: OsUser) -> None:
        response = httpx.delete(
            f"{self.url}/hub/api/users/{user.name}/server",
            headers={"Authorization": f"token {self.admin_token}"},
            timeout=60,
        )
        assert response.status_code in (202, 204), response.text

        def stopped() -> bool:
            model = self.api("GET", f"users/{user.name}")
            return not model.get("servers") and not user_processes(user.uid)

        wait_for(stopped, 60, interval=0.3, message=f"{user.name}'s server to stop")

    def server(self, user: OsUser) -> UserServer:
        return UserServer(self.start_servers(user)[0], self.token(user))

    def login(self, user: OsUser) -> httpx.Client:
        """A browser-like session of `user`, logged in with the hub's login form."""
        client = httpx.Client(base_url=self.url, follow_redirects=True, timeout=60)
        client.get("/hub/login")
        form = {"username": user.name, "password": PASSWORD, "_xsrf": client.cookies["_xsrf"]}
        reply = client.post("/hub/login", data=form)
        assert "jupyterhub-session-id" in client.cookies, reply.text[:500]
        return client

    def stop(self) -> list[int]:
        """Stop the hub (it stops the proxy, the dashboard and the users' servers); the
        pids of its own children (proxy, dashboard) that are still alive after it."""
        children = descendants(self.proc.pid)
        stop_process(self.proc, 60)
        with contextlib.suppress(AssertionError):  # the proxy may still be on its way out
            wait_for(lambda: not any(map(_alive, children)), 15, message="the hub's children")
        left = [pid for pid in children if _alive(pid)]
        for pid in left:  # reported by the caller; never left running
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return left


def descendants(pid: int) -> list[int]:
    """Pids of `pid`'s children, theirs, and so on."""
    found: list[int] = []
    for child in _children(pid):
        found += [child, *descendants(child)]
    return found


@dataclass
class UserServer:
    """A user's single-user server behind the hub, reached with the user's token."""

    url: str  # .../user/<name>/
    token: str

    def api(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.request(
            method,
            self.url + path,
            headers={"Authorization": f"token {self.token}"},
            timeout=60,
            **kwargs,
        )

    def run_cell(self, kernel_id: str, code: str, timeout: float = 90) -> dict[str, Any]:
        """Execute `code` in the kernel through the server's websocket; its outputs."""
        return asyncio.run(_execute(self, kernel_id, code, timeout))

    def start_kernel(self) -> str:
        response = self.api("POST", "api/kernels", json={"name": "python3"})
        assert response.status_code == 201, response.text
        return response.json()["id"]


async def _execute(server: UserServer, kernel_id: str, code: str, timeout: float) -> dict:
    import aiohttp

    url = server.url.replace("http", "ws", 1) + f"api/kernels/{kernel_id}/channels"
    msg_id = uuid.uuid4().hex
    request = {
        "header": {
            "msg_id": msg_id,
            "msg_type": "execute_request",
            "username": "test",
            "session": uuid.uuid4().hex,
            "version": "5.3",
            "date": "",
        },
        "parent_header": {},
        "metadata": {},
        "content": {"code": code, "silent": False, "store_history": True, "allow_stdin": False},
        "channel": "shell",
        "buffers": [],
    }
    result: dict[str, Any] = {"stdout": "", "stderr": "", "error": None, "reply": None}
    headers = {"Authorization": f"token {server.token}"}
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(url, headers=headers, max_msg_size=0) as ws,
    ):
        await ws.send_str(json.dumps(request))
        idle = False
        async with asyncio.timeout(timeout):
            while not (idle and result["reply"]):
                message = json.loads((await ws.receive()).data)
                if message.get("parent_header", {}).get("msg_id") != msg_id:
                    continue
                kind, content = message["msg_type"], message["content"]
                if kind == "stream":
                    result[content["name"]] += content["text"]
                elif kind == "error":
                    result["error"] = content
                elif kind == "execute_reply":
                    result["reply"] = content
                elif kind == "status" and content["execution_state"] == "idle":
                    idle = True
    return result


# What every test hub's jupyterhub_config.py says first (after `c = get_config()`, with
# its settings as `s`): its local ports and files, DummyAuthenticator, all users allowed.
HUB_BASICS = """c.JupyterHub.bind_url = s["bind_url"]
c.JupyterHub.hub_bind_url = s["hub_bind_url"]
c.ConfigurableHTTPProxy.api_url = s["proxy_api"]
c.ConfigurableHTTPProxy.pid_file = s["pid_file"]
c.JupyterHub.db_url = s["db_url"]
c.JupyterHub.cookie_secret_file = s["cookie_secret_file"]
c.JupyterHub.authenticator_class = "dummy"
c.DummyAuthenticator.password = s["password"]
c.Authenticator.allow_all = True
"""


def hub_basic_settings(base: Path, ports: dict[str, int], password: str) -> dict[str, str]:
    """The settings HUB_BASICS reads: the hub's ports, its files in `base`, the password."""
    return {
        "bind_url": f"http://127.0.0.1:{ports['public']}",
        "hub_bind_url": f"http://127.0.0.1:{ports['hub']}",
        "proxy_api": f"http://127.0.0.1:{ports['proxy_api']}",
        "pid_file": str(base / "proxy.pid"),
        "db_url": f"sqlite:///{base / 'jupyterhub.sqlite'}",
        "cookie_secret_file": str(base / "cookie_secret"),
        "password": password,
    }


def hub_config(
    base: Path,
    ports: dict[str, int],
    admin_token: str,
    instructor_group: str,
    instructor: str,
    service: SystemService,
    venv: Path,
) -> str:
    """The text of jupyterhub_config.py for these tests."""
    server_config = base / "server-config"
    (server_config / "jupyter_server_config.d").mkdir(parents=True)
    shutil.copy(
        ROOT / "jupyter-config" / "server-config" / "jupyter_sandbox.json",
        server_config / "jupyter_server_config.d",
    )
    for path in (base, server_config, server_config / "jupyter_server_config.d"):
        path.chmod(0o755)
    (server_config / "jupyter_server_config.d" / "jupyter_sandbox.json").chmod(0o644)
    user_env = {
        "PYTHONPATH": str(ROOT),
        "PATH": f"{venv / 'bin'}:/usr/local/bin:/usr/bin:/bin",
        "JUPYTER_CONFIG_PATH": str(server_config),
        "JUPYTER_SANDBOX_SYSTEM_RUN": str(service.run_dir),
        "JUPYTER_SANDBOX_MODE": "system",
    }
    dashboard_env = {
        "PYTHONPATH": str(ROOT),
        "JUPYTER_SANDBOX_SYSTEM_RUN": str(service.run_dir),
    }
    settings = {
        **hub_basic_settings(base, ports, PASSWORD),
        "dashboard_url": f"http://127.0.0.1:{ports['dashboard']}",
        "singleuser": str(singleuser(venv)),
        "python": sys.executable,
        "admin_token": admin_token,
        "group": instructor_group,
        "instructor": instructor,
        "hub_admin": HUB_ADMIN,
        "hub_ta": HUB_TA,
        "ta_role": TA_ROLE,
        "user_env": user_env,
        "dashboard_env": dashboard_env,
    }
    return CONFIG_TEMPLATE.replace("SETTINGS", repr(settings))


CONFIG_TEMPLATE = (
    """
s = SETTINGS
HUB_ADMIN, HUB_TA, TA_ROLE = s["hub_admin"], s["hub_ta"], s["ta_role"]
c = get_config()  # noqa
"""
    + HUB_BASICS
    + """c.JupyterHub.spawner_class = "jupyterhub.spawner.LocalProcessSpawner"
c.Spawner.cmd = [s["singleuser"]]
c.Spawner.environment = s["user_env"]
c.Spawner.start_timeout = 90
c.Spawner.http_timeout = 90
c.JupyterHub.load_groups = {s["group"]: {"users": [s["instructor"]]}}
c.Authenticator.admin_users = {HUB_ADMIN}
c.JupyterHub.services = [
    {
        "name": "sandboxes",
        "url": s["dashboard_url"],
        "command": [s["python"], "-m", "jupyter_sandbox.dashboard",
                    "--instructor-group", s["group"], "--instructor-role", TA_ROLE,
                    "--usage-interval", "1"],
        "environment": s["dashboard_env"],
        "oauth_no_confirm": True,
    },
    {"name": "hub-tests", "api_token": s["admin_token"]},
]
c.JupyterHub.load_roles = [
    {"name": "user", "scopes": ["self", "access:services!service=sandboxes"]},
    {"name": TA_ROLE, "scopes": ["access:services!service=sandboxes"], "users": [HUB_TA]},
    {"name": "sandboxes-dashboard", "scopes": ["read:users:name", "read:roles:users"],
     "services": ["sandboxes"]},
    {"name": "hub-tests", "scopes": ["admin:users", "admin:servers", "tokens",
     "admin:groups", "access:servers", "access:services", "list:users"],
     "services": ["hub-tests"]},
]
"""
)


def singleuser(venv: Path) -> Path:
    """The venv's ``jupyterhub-singleuser``; installed there if a venv made before
    jupyterhub joined the test extra lacks it."""
    command = venv / "bin" / "jupyterhub-singleuser"
    if not command.exists():
        with open(venv.parent / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not command.exists():
                pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "jupyterhub"]
                subprocess.run(pip, check=True, timeout=600)
    return command


def start_hub(
    base: Path, students: list[OsUser], instructor: OsUser, group: str, service: SystemService
) -> Hub:
    ports = {k: free_port() for k in ("public", "hub", "proxy_api", "dashboard")}
    admin_token = secrets.token_hex(24)
    config = base / "jupyterhub_config.py"
    config.write_text(
        hub_config(base, ports, admin_token, group, instructor.name, service, SHARED_VENV)
    )
    config.chmod(0o600)  # it holds the admin token
    log = open(base / "hub.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterhub", "-f", str(config)],
        cwd=base,
        env={**os.environ, "PYTHONPATH": str(ROOT), "JUPYTERHUB_CRYPT_KEY": ""},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    hub = Hub(
        url=f"http://127.0.0.1:{ports['public']}",
        admin_token=admin_token,
        proc=proc,
        base=base,
        students=students,
        instructor=instructor,
        instructor_group=group,
        service=service,
    )

    try:
        wait_hub_answers(proc, f"{hub.url}/hub/api", base / "hub.log")
    except BaseException:
        hub.stop()
        raise
    names = [user.name for user in [*students, instructor]]
    hub.api("POST", "users", json={"usernames": names})
    return hub


@pytest.fixture(scope="package")
def hub_users() -> Iterator[tuple[list[OsUser], OsUser, str]]:
    """Three real students and an instructor in the instructor group."""
    requirements()
    with os_users(students=3, instructors=1) as (students, instructors, group):
        yield students, instructors[0], group


@pytest.fixture(scope="package")
def system_service(hub_users: Any) -> Iterator[SystemService]:
    """The system service of the hub's machine; stopping it checks nothing is left."""
    _, _, group = hub_users
    service = start_system_service([group], JUPYTER_SANDBOX_LEASE_TTL=str(LEASE_TTL))
    yield service
    service.stop()


@pytest.fixture(scope="package")
def hub(hub_users: Any, system_service: SystemService, shared_venv: Path) -> Iterator[Hub]:
    students, instructor, group = hub_users
    base = Path(tempfile.mkdtemp(prefix="jsb-hub-"))
    started = start_hub(base, students, instructor, group, system_service)
    yield started
    left = started.stop()
    try:
        assert not left, f"processes of the hub (proxy, dashboard) outlived it: {left}"
        for user in [*students, instructor]:
            wait_for(
                lambda user=user: not user_processes(user.uid),
                30,
                message=f"{user.name}'s processes to end with the hub",
            )
    finally:
        kept = Path(tempfile.gettempdir()) / f"jupyter-sandbox-tests-{os.getuid()}-hub.log"
        shutil.copy(base / "hub.log", kept)
        shutil.rmtree(base, ignore_errors=True)


def as_root(service: SystemService, method: str, path: str, **kwargs: Any) -> httpx.Response:
    """A request to the system service as root (an instructor: it sees every sandbox)."""
    transport = httpx.HTTPTransport(uds=str(service.socket))
    with httpx.Client(transport=transport, base_url="http://sandbox", timeout=30) as client:
        response = client.request(method, path, **kwargs)
    response.raise_for_status()
    return response


def system_sandboxes(service: SystemService) -> list[dict[str, Any]]:
    """Every live sandbox of the system service."""
    return as_root(service, "GET", "/v1/sandboxes").json()["sandboxes"]


def wait_no_sandboxes(service: SystemService, timeout: float = 3 * LEASE_TTL + 10) -> float:
    """Seconds until the system service has no sandbox left."""
    start = time.monotonic()
    wait_for(lambda: not system_sandboxes(service), timeout, message="every sandbox to end")
    return time.monotonic() - start
