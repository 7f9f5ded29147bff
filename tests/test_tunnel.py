"""``ssh -o ProxyCommand='jupyter-sandbox tunnel ...'`` through a Jupyter server with a base_url."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from serverext_fixtures import JupyterProcess

from jupyter_sandbox import Sandbox
from jupyter_sandbox.cli.tunnel import tunnel_url
from tests.conftest import UNPINNED_SSH

pytestmark = pytest.mark.skipif(shutil.which("ssh") is None, reason="needs OpenSSH's ssh")
TUNNEL = f"{sys.executable} -m jupyter_sandbox.cli.tunnel"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, service_env: Any) -> Iterator[JupyterProcess]:
    """`jupyter server` under a JupyterHub-like base_url."""
    jupyter = JupyterProcess(
        tmp_path_factory.mktemp("tunnel"), service_env, "/user/t%40x/", app="server"
    )
    yield jupyter
    jupyter.stop()


def proxy_url(server: JupyterProcess) -> str:
    """The server URL as a ProxyCommand needs it: ssh expands %-sequences there."""
    return server.url.replace("%", "%%")


def ssh(
    proxy: str, target: str, command: str, stdin: bytes = b"", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            "ssh",
            "-o",
            f"ProxyCommand={proxy}",
            *UNPINNED_SSH,
            target,
            command,
        ],
        input=stdin,
        capture_output=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_tunnel_url_keeps_the_base_url() -> None:
    assert tunnel_url("https://hub.example/user/me", "sb-1") == (
        "wss://hub.example/user/me/sandbox/api/tunnel/sb-1"
    )
    assert tunnel_url("http://h:8888/a%40b/", "x y") == (
        "ws://h:8888/a%40b/sandbox/api/tunnel/x%20y"
    )
    with pytest.raises(ValueError):
        tunnel_url("ftp://h/", "sb")


def test_ssh_shell_through_the_jupyter_url(server: JupyterProcess) -> None:
    with Sandbox.create(timeout="2m") as sandbox:
        access = sandbox.expose_ssh()
        proxy = f"{TUNNEL} --url {proxy_url(server)} --token {server.token} %h"
        target = f"{access.username}@{sandbox.id}"
        result = ssh(proxy, target, "hostname; id -un")
        assert result.returncode == 0, result.stderr
        assert result.stdout.decode().split()[0] == sandbox.id

        payload = os.urandom(3 << 20)  # both directions, well past any buffer
        result = ssh(proxy, target, "cat > blob && sha256sum < blob && cat blob", payload)
        assert result.returncode == 0, result.stderr
        digest = hashlib.sha256(payload).hexdigest()
        assert result.stdout.startswith(digest.encode())
        assert result.stdout.endswith(payload)


def test_token_from_the_environment(server: JupyterProcess) -> None:
    with Sandbox.create(timeout="1m") as sandbox:
        access = sandbox.expose_ssh()
        result = ssh(
            f"{TUNNEL} %h",
            f"{access.username}@{sandbox.id}",
            "hostname",
            env={"JUPYTER_SERVER_URL": server.url, "JUPYTER_TOKEN": server.token},
        )
        assert result.stdout.decode().strip() == sandbox.id, result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ("--token wrong", b"not authenticated"),
        ("--token {token} --url {url}nope/", b"no such sandbox or server"),
    ],
)
def test_tunnel_refusals_are_explained(server: JupyterProcess, args: str, message: bytes) -> None:
    with Sandbox.create(timeout="1m") as sandbox:
        access = sandbox.expose_ssh()
        extra = args.format(token=server.token, url=proxy_url(server))
        proxy = f"{TUNNEL} --url {proxy_url(server)} {extra} %h"
        result = ssh(proxy, f"{access.username}@{sandbox.id}", "true")
        assert result.returncode == 255
        assert message in result.stderr


def test_unknown_sandbox_is_refused(server: JupyterProcess) -> None:
    proxy = f"{TUNNEL} --url {proxy_url(server)} --token {server.token} %h"
    result = ssh(proxy, "whoever@sb-nonexistent", "true")
    assert result.returncode == 255
    assert b"no such sandbox" in result.stderr
