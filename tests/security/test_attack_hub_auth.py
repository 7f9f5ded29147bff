"""Attacks on hub token authentication (`serve --tcp ... --hub-auth`).

A real JupyterHub (DummyAuthenticator, no servers spawned: only its REST API and the
tokens it issues) and the real service in hub mode; every request is plain HTTP as a
user pod would send it.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import stop_process, storage_parent, wait_for
from tests.hub_fixtures import HUB_BASICS, hub_api, hub_basic_settings, wait_hub_answers
from tests.serverext_fixtures import free_port

pytest.importorskip("jupyterhub")
if shutil.which("configurable-http-proxy") is None:
    pytest.skip("needs the npm package configurable-http-proxy", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]
ADMIN, STUDENT, OTHER_SERVICE, SANDBOX_SERVICE = "boss", "alice", "other", "jupyter-sandbox"

HUB_CONFIG = (
    """
s = SETTINGS
c = get_config()  # noqa
"""
    + HUB_BASICS
    + """c.Authenticator.admin_users = {s["admin_user"]}
c.JupyterHub.services = [
    {"name": "hub-tests", "api_token": s["admin_token"]},
    {"name": s["other"]},
    {"name": s["sandbox"], "api_token": s["sandbox_token"]},
]
c.JupyterHub.load_roles = [
    {"name": "user", "scopes": ["self", f"access:services!service={s['sandbox']}"]},
    {"name": "hub-tests", "scopes": ["admin:users", "tokens", "list:users"],
     "services": ["hub-tests"]},
    {"name": "sandbox-service", "scopes": ["read:users:name", "read:users:groups"],
     "services": [s["sandbox"]]},
]
"""
)


@dataclass
class MiniHub:
    api_url: str
    admin_token: str
    sandbox_token: str

    def token(self, user: str, scopes: list[str] | None = None) -> str:
        """A token of `user` made through the hub's API (default scopes: the user's)."""
        body: dict = {"note": "attack tests"}
        if scopes is not None:
            body["scopes"] = scopes
        made = hub_api(
            self.api_url, self.admin_token, "POST", f"users/{user}/tokens", 30, json=body
        )
        return made["token"]


@pytest.fixture(scope="module")
def hub() -> Iterator[MiniHub]:
    base = Path(tempfile.mkdtemp(prefix="attack-hub-"))
    ports = {name: free_port() for name in ("public", "hub", "proxy_api")}
    settings = {
        **hub_basic_settings(base, ports, secrets.token_urlsafe(12)),
        "admin_token": secrets.token_hex(24),
        "sandbox_token": secrets.token_hex(24),
        "admin_user": ADMIN,
        "other": OTHER_SERVICE,
        "sandbox": SANDBOX_SERVICE,
    }
    config = base / "jupyterhub_config.py"
    config.write_text(HUB_CONFIG.replace("SETTINGS", repr(settings)))
    with open(base / "hub.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jupyterhub", "-f", str(config)],
            cwd=base,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    api_url = f"{settings['bind_url']}/hub/api"

    try:
        wait_hub_answers(proc, api_url, base / "hub.log")
        hub_api(
            api_url,
            settings["admin_token"],
            "POST",
            "users",
            30,
            json={"usernames": [ADMIN, STUDENT]},
        )
        yield MiniHub(api_url, settings["admin_token"], settings["sandbox_token"])
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(base, ignore_errors=True)


@dataclass
class HubService:
    url: str
    log: Path

    def get(self, path: str, token: str | None) -> httpx.Response:
        headers = {"Authorization": f"token {token}"} if token else {}
        return httpx.get(f"{self.url}{path}", headers=headers, timeout=30)


@pytest.fixture(scope="module")
def service(hub: MiniHub) -> Iterator[HubService]:
    base = Path(tempfile.mkdtemp(prefix="attack-hub-service-"))
    storage = Path(tempfile.mkdtemp(prefix="jsb-", dir=storage_parent()))
    os.chmod(storage, 0o711)
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "JUPYTER_RUNTIME_DIR": str(base / "rt"),
        "JUPYTER_DATA_DIR": str(base / "data"),
        "JUPYTER_SANDBOX_DIR": str(storage),
        "JUPYTER_SANDBOX_BACKEND": "local",
        "JUPYTERHUB_API_URL": hub.api_url,
        "JUPYTERHUB_API_TOKEN": hub.sandbox_token,
        "JUPYTERHUB_SERVICE_NAME": SANDBOX_SERVICE,
        "JUPYTER_SANDBOX_HUB_CACHE": "0",
    }
    for key in ("JUPYTER_SANDBOX_URL", "JUPYTER_SANDBOX_TOKEN", "JUPYTER_SANDBOX_AUTH"):
        env.pop(key, None)
    port = free_port()
    serve = ["serve", "--no-supervisor", "--tcp", f"127.0.0.1:{port}", "--hub-auth"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyter_sandbox", *serve],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, f"the service exited {proc.returncode}"
        try:
            return httpx.get(f"{url}/v1/status", timeout=2).status_code == 401
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, 60, interval=0.2, message="the hub-mode service to listen")
        yield HubService(url, base / "data" / "sandbox" / "service.log")
    finally:
        stop_process(proc, 30)
        left = list((storage / "sandboxes").iterdir()) if (storage / "sandboxes").exists() else []
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(storage, ignore_errors=True)
        assert not left, f"sandbox directories left: {left}"


def _usage(service: HubService, token: str) -> httpx.Response:
    return service.get("/v1/usage", token)


def test_a_users_own_token_and_notebook_server_token_are_taken(
    hub: MiniHub, service: HubService
) -> None:
    """The tokens the design names still work: the user's own API token, and the one a
    notebook server gets (access to its own server and activity)."""
    for token in (
        hub.token(STUDENT),
        hub.token(STUDENT, ["access:servers!server=alice/", "users:activity!user"]),
        hub.token(STUDENT, [f"access:services!service={SANDBOX_SERVICE}"]),
    ):
        reply = _usage(service, token)
        assert reply.status_code == 200, reply.text
        assert reply.json()["user"] == STUDENT
    reply = _usage(service, hub.token(ADMIN))
    assert reply.status_code == 200 and reply.json()["instructor"] is True, reply.text


@pytest.mark.parametrize(
    "scopes",
    [[], ["read:users:activity!user"], [f"access:services!service={OTHER_SERVICE}"]],
    ids=["no-scopes", "activity-only", "another-service"],
)
def test_a_hub_admins_token_made_for_something_else_is_refused(
    hub: MiniHub, service: HubService, scopes: list[str]
) -> None:
    """A token the admin scoped down for another use (a token given to another hub
    service, or one that may only read activity) still names the admin at GET /user: it
    must not open every sandbox of the service as an instructor."""
    reply = _usage(service, hub.token(ADMIN, scopes))
    assert reply.status_code == 401, reply.text
    assert "scope" in reply.json()["message"]


def test_an_admins_token_for_a_students_server_is_not_the_admins_own(
    hub: MiniHub, service: HubService
) -> None:
    """Access to alice's server lets its holder act as alice there, not as the admin."""
    reply = _usage(service, hub.token(ADMIN, ["access:servers!user=alice"]))
    assert reply.status_code == 401, reply.text


def test_a_students_token_scoped_for_another_service_is_refused(
    hub: MiniHub, service: HubService
) -> None:
    """What another hub service holds of a user (its OAuth token: the identity scopes and
    access to that service) does not open the user's sandboxes."""
    reply = _usage(service, hub.token(STUDENT, ["read:users:name!user"]))
    assert reply.status_code == 401, reply.text


def test_no_route_method_or_spelling_answers_without_a_token(service: HubService) -> None:
    """Every way in that a user pod could try without a token gets 401, never data."""
    paths = [
        "/v1/status",
        "/v1/openapi.json",
        "/v1/events",
        "/v1/sandboxes",
        "/v1/sandboxes/x/logs?follow=1",
        "/v1/sandboxes/x/files/read?path=/etc/passwd",
        "/v1/sandboxes/x/agent",
        "/v1/%73andboxes",
        "//v1/sandboxes",
        "/v1/sandboxes/",
        "/v1/./sandboxes",
        "/nothing-here",
    ]
    with httpx.Client(base_url=service.url, timeout=30) as client:
        for path in paths:
            for method in ("GET", "HEAD", "OPTIONS", "POST", "PUT", "DELETE"):
                reply = client.request(method, path)
                assert reply.status_code == 401, (method, path, reply.status_code, reply.text)
        upgrade = {
            "Connection": "Upgrade",
            "Upgrade": "websocket",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        }
        reply = client.get("/v1/events", headers=upgrade)
        assert reply.status_code == 401, reply.text
        for header in ("token", "Bearer", "Basic dXNlcjpwYXNz", "token a b"):
            reply = client.get("/v1/sandboxes", headers={"Authorization": header})
            assert reply.status_code == 401, (header, reply.text)
