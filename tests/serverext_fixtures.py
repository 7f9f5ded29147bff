"""Fixtures for the server extension tests: a pytest-jupyter server wired to the test service.

Import the fixtures into a test module (``from serverext_fixtures import ...``); the
module must also declare ``pytest_plugins = ["pytest_jupyter.jupyter_server"]``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import stop_process

ROOT = Path(__file__).resolve().parent.parent
EXTENSION = {"jupyter_sandbox.serverext": True}
SERVICE_VARS = ("JUPYTER_RUNTIME_DIR", "JUPYTER_DATA_DIR", "JUPYTER_SANDBOX_DIR")


@pytest.fixture
def jp_environ(jp_environ: None, service_env: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """pytest-jupyter's private Jupyter dirs, but this session's sandbox service."""
    for name in SERVICE_VARS:
        monkeypatch.setenv(name, service_env.env[name])


@pytest.fixture
def jp_server_config() -> dict[str, Any]:
    return {
        "ServerApp": {"jpserver_extensions": EXTENSION},
        "SandboxExtension": {"usage_interval": 0.3, "reconcile_interval": 0.3},
    }


async def until(predicate: Callable[[], Any], timeout: float = 15.0, what: str = "it") -> Any:
    """Await until `predicate()` (sync or async) is truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def labextension_dir() -> Path:
    """The built labextension; build it (npm) if it is missing."""
    built = ROOT / "jupyter_sandbox" / "labextension"
    if not (built / "package.json").exists():
        if shutil.which("npm") is None:
            pytest.skip("the labextension is not built and npm is missing")
        source = ROOT / "labextension"
        subprocess.run(["npm", "install", "--no-audit", "--no-fund"], cwd=source, check=True)
        subprocess.run(["npm", "run", "build"], cwd=source, check=True)
    return built


class JupyterProcess:
    """A real ``jupyter lab`` (or ``jupyter notebook``) subprocess with the extension."""

    def __init__(self, tmp: Path, service_env: Any, base_url: str, app: str = "lab") -> None:
        self.port = free_port()
        self.token = os.urandom(12).hex()
        self.base_url = base_url
        self.url = f"http://127.0.0.1:{self.port}{base_url}"
        labext = tmp / "share" / "jupyter" / "labextensions"
        labext.mkdir(parents=True)
        if app != "server":
            (labext / "jupyter-sandbox").symlink_to(labextension_dir())
        self.root = tmp / "notebooks"
        self.root.mkdir()
        terminal_settings = tmp / "config/lab/user-settings/@jupyterlab/terminal-extension"
        terminal_settings.mkdir(parents=True)  # text in the DOM, for the browser tests
        (terminal_settings / "plugin.jupyterlab-settings").write_text('{"screenReaderMode": true}')
        news = tmp / "config/lab/user-settings/@jupyterlab/apputils-extension"
        news.mkdir(parents=True)  # no "news?" toast over the panel's buttons
        (news / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')
        config_d = tmp / "config" / "jupyter_server_config.d"  # as the wheel ships it
        config_d.mkdir(parents=True)
        shutil.copy(ROOT / "jupyter-config" / "server-config" / "jupyter_sandbox.json", config_d)
        env = {
            **os.environ,
            **service_env.env,
            "JUPYTER_CONFIG_DIR": str(tmp / "config"),
            "JUPYTER_PATH": str(tmp / "share" / "jupyter"),
            "HOME": str(tmp),
        }
        self.log_path = tmp / f"jupyter-{app}.log"
        self.log = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jupyter",
                app,
                "--allow-root",
                "--no-browser",
                f"--port={self.port}",
                "--ip=127.0.0.1",
                f"--ServerApp.base_url={base_url}",
                f"--IdentityProvider.token={self.token}",
                f"--ServerApp.root_dir={self.root}",
                *(["--expose-app-in-browser"] if app != "server" else []),
            ],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.wait_ready()

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = self.log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"jupyter exited with {self.proc.returncode}:\n{log}")
            try:
                self.api("GET", "api/status")
                return
            except OSError:
                time.sleep(0.3)
        raise TimeoutError("jupyter did not come up")

    def api(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"Authorization": f"token {self.token}"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            text = response.read()
        return json.loads(text) if text else None

    def stop(self) -> None:
        stop_process(self.proc, 20)
        self.log.close()


@pytest.fixture
def jupyter_lab(tmp_path: Path, service_env: Any) -> Iterator[JupyterProcess]:
    server = JupyterProcess(tmp_path, service_env, "/user/tester/")
    yield server
    server.stop()
