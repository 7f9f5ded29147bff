"""A real JupyterHub that only issues and checks tokens, and a sandbox service that
authenticates its TCP callers with them (`serve --tcp HOST:PORT --hub-auth`).

The hub runs DummyAuthenticator and starts no servers: its users need no OS accounts,
so this runs unprivileged too. Users: two students, an instructor (hub group
"teachers", the config file's instructor group), a hub admin, a student in the group
"limited" (a quota of one sandbox), a user named like a number and one named like the
service's own OS user. Hub services: the sandbox service itself (``read:users:name``,
``read:users:groups``: what deploy/kubernetes/z2jh-values.yaml gives it), the
tests' own admin service, and another service whose token must not pass for a user.

Needs the npm package configurable-http-proxy and PyPI jupyterhub.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import sandbox_mounts, sandbox_processes, stop_process, storage_parent, wait_for
from tests.hub_fixtures import HUB_BASICS, hub_api, hub_basic_settings, wait_hub_answers
from tests.serverext_fixtures import free_port

ROOT = Path(__file__).resolve().parents[2]
PROXY = "configurable-http-proxy"
STUDENTS = ("alice", "bob")
INSTRUCTOR, ADMIN, LIMITED, NUMERIC = "carol", "hubadmin", "dave", "0"
OS_NAMED = pwd.getpwuid(os.getuid()).pw_name  # the service's own OS user's name
TEACHERS, LIMITED_GROUP = "teachers", "limited"
CACHE_SECONDS = 3.0  # JUPYTER_SANDBOX_HUB_CACHE of the service under test
CONFIG = f"""
instructors = ["{TEACHERS}"]
[quota.default]
sandboxes = 3
[quota.group.{LIMITED_GROUP}]
sandboxes = 1
"""


def requirements() -> None:
    """Skip (with the reason) where a hub cannot run."""
    if shutil.which(PROXY) is None:
        pytest.skip(f"needs the npm package {PROXY} (npm install -g {PROXY})")
    pytest.importorskip("jupyterhub")


HUB_CONFIG = (
    """
s = SETTINGS
c = get_config()  # noqa
"""
    + HUB_BASICS
    + """c.Authenticator.admin_users = {s["admin"]}
c.JupyterHub.load_groups = s["groups"]
c.JupyterHub.services = [
    {"name": "sandboxes", "api_token": s["service_token"]},
    {"name": "hub-tests", "api_token": s["admin_token"]},
    {"name": "other-service", "api_token": s["other_token"]},
]
c.JupyterHub.load_roles = [
    {"name": "sandboxes", "scopes": ["read:users:name", "read:users:groups"],
     "services": ["sandboxes"]},
    {"name": "hub-tests", "scopes": ["admin:users", "tokens", "admin:groups", "list:users"],
     "services": ["hub-tests"]},
]
"""
)


@dataclass
class TokenHub:
    """A running JupyterHub: its API, the tokens it issued, and stop/start."""

    base: Path
    api_url: str  # the hub's own API, as the service calls it (not through the proxy)
    admin_token: str
    service_token: str
    other_token: str  # of the hub service "other-service"
    proc: subprocess.Popen | None = None
    tokens: dict[str, tuple[str, str]] = field(default_factory=dict)  # user: (token, id)

    @property
    def log(self) -> str:
        return (self.base / "hub.log").read_text(errors="replace")

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        return hub_api(self.api_url, self.admin_token, method, path, 30, **kwargs)

    def token(self, user: str) -> str:
        """An API token of `user` (one per user, made once)."""
        if user not in self.tokens:
            made = self.api("POST", f"users/{user}/tokens", json={"note": "hub token tests"})
            self.tokens[user] = (made["token"], made["id"])
        return self.tokens[user][0]

    def new_token(self, user: str) -> tuple[str, str]:
        """A fresh token of `user` and its id, for revoking."""
        made = self.api("POST", f"users/{user}/tokens", json={"note": "to revoke"})
        return made["token"], made["id"]

    def revoke(self, user: str, token_id: str) -> None:
        self.api("DELETE", f"users/{user}/tokens/{token_id}")

    def start(self) -> None:
        with open(self.base / "hub.log", "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "jupyterhub", "-f", str(self.base / "jupyterhub_config.py")],
                cwd=self.base,
                env={**os.environ, "JUPYTERHUB_CRYPT_KEY": ""},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_hub_answers(self.proc, self.api_url, self.base / "hub.log")

    def stop(self) -> None:
        """Stop the hub and its proxy; nothing of them is left."""
        if self.proc is None:
            return
        stop_process(self.proc, 30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # the proxy, should it linger
        self.proc = None


def start_token_hub(base: Path) -> TokenHub:
    ports = {k: free_port() for k in ("public", "hub", "proxy_api")}
    hub = TokenHub(
        base=base,
        api_url=f"http://127.0.0.1:{ports['hub']}/hub/api",
        admin_token=secrets.token_hex(24),
        service_token=secrets.token_hex(24),
        other_token=secrets.token_hex(24),
    )
    settings = {
        **hub_basic_settings(base, ports, secrets.token_urlsafe(12)),
        "admin": ADMIN,
        "groups": {TEACHERS: {"users": [INSTRUCTOR]}, LIMITED_GROUP: {"users": [LIMITED]}},
        "service_token": hub.service_token,
        "admin_token": hub.admin_token,
        "other_token": hub.other_token,
    }
    config = base / "jupyterhub_config.py"
    config.write_text(HUB_CONFIG.replace("SETTINGS", repr(settings)))
    config.chmod(0o600)
    hub.start()
    hub.api("POST", "users", json={"usernames": [*STUDENTS, NUMERIC, OS_NAMED]})
    return hub


@dataclass
class HubAuthService:
    """`jupyter-sandbox serve --tcp ... --hub-auth` under its supervisor."""

    env: dict[str, str]
    url: str
    log_file: Path
    storage: Path
    flag: bool = True  # `--hub-auth` (else JUPYTER_SANDBOX_AUTH=hub in `env` says it)
    proc: subprocess.Popen | None = None

    @property
    def data_dir(self) -> Path:
        return Path(self.env["JUPYTER_DATA_DIR"]) / "sandbox"

    @property
    def socket(self) -> Path:
        return Path(self.env["JUPYTER_RUNTIME_DIR"]) / "jupyter-sandbox.sock"

    def start(self) -> None:
        runtime_file = Path(self.env["JUPYTER_RUNTIME_DIR"]) / "jupyter-sandbox.json"
        with contextlib.suppress(FileNotFoundError):
            runtime_file.unlink()
        serve = [sys.executable, "-m", "jupyter_sandbox", "serve"]
        serve += ["--tcp", self.url.removeprefix("http://")]
        serve += ["--hub-auth"] if self.flag else []
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen(
                serve,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

        def listening() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"the service exited {self.proc.returncode}: {self.log}")
            try:
                return json.loads(runtime_file.read_text()).get("url") == self.url
            except (OSError, ValueError):
                return False

        wait_for(listening, 60, message="the hub-auth service to listen")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 30)
            self.proc = None

    @property
    def log(self) -> str:
        texts = [self.log_file.read_text(errors="replace")]
        texts += [p.read_text(errors="replace") for p in self.data_dir.glob("*.log")]
        return "\n".join(texts)

    def operator(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """A request over the service's own Unix socket (the operator: sees every sandbox)."""
        transport = httpx.HTTPTransport(uds=str(self.socket))
        with httpx.Client(transport=transport, base_url="http://sandbox", timeout=30) as client:
            return client.request(method, path, **kwargs)

    def call(self, method: str, path: str, token: str | None, **kwargs: Any) -> httpx.Response:
        """A request over TCP with `token` as a hub token (None: no Authorization)."""
        headers = kwargs.pop("headers", {})
        if token is not None:
            headers["Authorization"] = f"token {token}"
        return httpx.request(method, self.url + path, headers=headers, timeout=30, **kwargs)

    def client(self, token: str | None, code: str, check: bool = True) -> Any:
        """Run `code` with the real client as the hub user whose token is `token`, as a
        notebook server's kernel would (JUPYTER_SANDBOX_URL and JUPYTERHUB_API_TOKEN
        only); it prints one JSON value, returned here."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTER", "PYTHON"))}
        env.update(PYTHONPATH=str(ROOT), JUPYTER_SANDBOX_URL=self.url)
        if token is not None:
            env["JUPYTERHUB_API_TOKEN"] = token
        prelude = "import json\nimport jupyter_sandbox as js\nfrom jupyter_sandbox import Sandbox\n"
        done = subprocess.run(
            [sys.executable, "-c", prelude + code],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and done.returncode != 0:
            raise AssertionError(f"client failed ({done.returncode}):\n{done.stderr[-3000:]}")
        return json.loads(done.stdout) if done.returncode == 0 else done.stderr

    def sandboxes(self) -> list[dict[str, Any]]:
        reply = self.operator("GET", "/v1/sandboxes")
        reply.raise_for_status()
        return reply.json()["sandboxes"]

    def clean_up(self) -> list[tuple[str, str]]:
        """End every sandbox; (user, id) of those there were."""
        left = [(s["user"], s["id"]) for s in self.sandboxes()]
        for _, sandbox_id in left:
            self.operator("DELETE", f"/v1/sandboxes/{sandbox_id}")
        wait_for(lambda: not sandbox_processes(self.storage), 20, message="sandboxes to end")
        assert not sandbox_mounts(self.storage)
        return left


@contextlib.contextmanager
def hub_auth_service(
    hub: TokenHub, flag: bool = True, **extra_env: str
) -> Iterator[HubAuthService]:
    base = Path(tempfile.mkdtemp(prefix="jsb-hubauth-"))
    storage = Path(tempfile.mkdtemp(prefix="jsb-", dir=storage_parent()))
    os.chmod(storage, 0o711)
    (base / "config.toml").write_text(CONFIG)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("JUPYTERHUB_")},
        "PYTHONPATH": str(ROOT),
        "JUPYTER_RUNTIME_DIR": str(base / "rt"),
        "JUPYTER_DATA_DIR": str(base / "data"),
        "JUPYTER_SANDBOX_DIR": str(storage),
        "JUPYTER_SANDBOX_SSH_PORT": "0",
        "JUPYTER_SANDBOX_POOL": "0",
        "JUPYTER_SANDBOX_CONFIG": str(base / "config.toml"),
        "JUPYTER_SANDBOX_HUB_CACHE": str(CACHE_SECONDS),
        "JUPYTERHUB_API_URL": hub.api_url,
        "JUPYTERHUB_API_TOKEN": hub.service_token,
        **extra_env,
    }
    url = f"http://127.0.0.1:{free_port()}"
    service = HubAuthService(env, url, base / "serve.log", storage, flag)
    service.start()
    try:
        yield service
    finally:
        try:
            service.clean_up()
        finally:
            service.stop()
            left = (
                list((storage / "sandboxes").iterdir()) if (storage / "sandboxes").exists() else []
            )
            shutil.rmtree(storage, ignore_errors=True)
            kept = Path(tempfile.gettempdir()) / f"jupyter-sandbox-tests-{os.getuid()}-hubauth.log"
            with contextlib.suppress(OSError):
                kept.write_text(service.log)
            shutil.rmtree(base, ignore_errors=True)
        assert not left, f"directories of ended sandboxes left: {left}"
