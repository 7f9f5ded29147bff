"""The SSH widget in a real JupyterLab, driven by headless Chromium (Playwright).

Needs Debian's chromium (/usr/bin/chromium); Playwright's own browser download is
not used. Screenshots go to tests/artifacts/.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nbformat
import pytest
from conftest import sandbox_pids, wait_for

from jupyter_sandbox import Sandbox

pytest.register_assert_rewrite("kernel_fixtures")
from kernel_fixtures import LOAD  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
LOG_LINES = 10_000

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian chromium")
playwright = pytest.importorskip("playwright.sync_api")

CELLS = [
    LOAD,
    "%sandbox_ssh",
    "%%sandbox --bg\nfor i in 1 2 3; do echo browser-line-$i; sleep 0.3; done",
    f"%%sandbox --bg\nseq 1 {LOG_LINES}",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def lab(service_env, tmp_path: Path) -> Iterator[str]:
    """A JupyterLab server (token auth) with the test notebook; yields its notebook URL."""
    ARTIFACTS.mkdir(exist_ok=True)
    nb = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell(c) for c in CELLS],
        metadata={
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}
        },
    )
    nbformat.write(nb, tmp_path / "widget.ipynb")
    port, token = free_port(), secrets.token_hex(16)
    log = (tmp_path / "lab.log").open("wb")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyterlab",
            "--allow-root",
            "--no-browser",
            f"--port={port}",
            "--ip=127.0.0.1",
            f"--IdentityProvider.token={token}",
            f"--ServerApp.root_dir={tmp_path}",
            "--LabApp.expose_app_in_browser=True",
            "--ServerApp.disable_check_xsrf=True",
        ],
        env={**os.environ, "JUPYTER_CONFIG_DIR": str(tmp_path / "config")},
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{base}/api/status", params={"token": token}).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, timeout=60, interval=0.2, message="JupyterLab to start")
        yield f"{base}/lab/tree/widget.ipynb?token={token}"
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
        shutil.copy(tmp_path / "lab.log", ARTIFACTS / "lab.log")


def test_ssh_widget_in_jupyterlab(lab: str, tmp_path: Path) -> None:
    notebook = tmp_path / "widget.ipynb"
    with notebook_page(lab) as page:
        run_cells(page, 0, 1, 2)

        # The live view shows the full command (the saved state has it masked).
        command = page.locator(".jsbw-command")
        command.wait_for(timeout=30_000)
        page.wait_for_function(
            "(() => { const c = document.querySelector('.jsbw-command')?.textContent;"
            " return c && c.startsWith('ssh ') && !c.includes('…'); })()",
            timeout=30_000,
        )
        assert page.locator("button.jsbw-button", has_text="Copy").is_enabled()
        token = command.inner_text().split()[-1].split("@")[0]
        page.locator(".jsbw-logs", has_text="browser-line-1").wait_for(timeout=30_000)
        page.screenshot(path=ARTIFACTS / "widget-live.png", full_page=True)

        elapsed = page.evaluate(SHOW_LINES_JS, {"cell": 3, "last": str(LOG_LINES)})
        print(f"{LOG_LINES} log lines shown in the widget view in {elapsed:.0f} ms")
        (ARTIFACTS / "widget-10k-lines.txt").write_text(f"{elapsed:.0f} ms\n")
        assert elapsed < 2000
        page.screenshot(path=ARTIFACTS / "widget-10k-lines.png", full_page=True)

        sandbox_id = page.locator(".jsbw-title").inner_text().split("(")[1].rstrip(")")
        page.locator("button.jsbw-button", has_text="Kill").click()
        page.locator(".jsbw-status", has_text="killed").wait_for(timeout=30_000)
        assert page.locator(".jsbw-command").get_attribute("class").count("jsbw-inactive")
        assert sandbox_id not in {s.id for s in Sandbox.list()}
        page.screenshot(path=ARTIFACTS / "widget-killed.png", full_page=True)
        # What JupyterLab saves has the widget's text fallback, with the token masked.
        page.evaluate("window.jupyterapp.commands.execute('docmanager:save')")
        saved = wait_for(
            lambda: (
                "application/vnd.jupyter.widget-view+json" in (text := notebook.read_text())
                and text
            ),
            timeout=30,
            message="the save",
        )
        assert token[:4] + "…" in saved and token not in saved


def test_ssh_widget_shows_a_failure_and_restarts(lab: str, service_env) -> None:
    """The host kills the sandbox's agent: the widget says it failed and why, offers
    Restart (which brings it back running) and Kill."""
    with notebook_page(lab) as page:
        run_cells(page, 0, 1)
        status = page.locator(".jsbw-status")
        status.filter(has_text="running").wait_for(timeout=30_000)
        sandbox_id = page.locator(".jsbw-title").inner_text().split("(")[1].rstrip(")")
        restart = page.locator("button.jsbw-button", has_text="Restart")
        assert restart.is_hidden()
        os.kill(sandbox_pids(service_env.storage, sandbox_id)["agent"], signal.SIGKILL)
        status.filter(has_text="failed: its agent was killed by signal 9").wait_for(timeout=30_000)
        assert "files are kept" in page.locator(".jsbw-sandbox-left").inner_text()
        assert page.locator("button.jsbw-button", has_text="Kill").is_enabled()
        page.screenshot(path=ARTIFACTS / "widget-failed.png", full_page=True)
        page.evaluate(
            "window.jupyterapp.commands.execute('apputils:change-theme',"
            " {theme: 'JupyterLab Dark'})"
        )
        page.wait_for_function("document.body.dataset.jpThemeName === 'JupyterLab Dark'")
        page.wait_for_selector("#jupyterlab-splash", state="detached")
        page.screenshot(path=ARTIFACTS / "widget-failed-dark.png", full_page=True)
        restart.click()
        status.filter(has_text="running").wait_for(timeout=30_000)
        assert restart.is_hidden()
        assert {s.id: s.status for s in Sandbox.list()}[sandbox_id] == "running"
        page.locator("button.jsbw-button", has_text="Kill").click()
        status.filter(has_text="killed").wait_for(timeout=30_000)


@contextlib.contextmanager
def notebook_page(lab: str) -> Iterator[Any]:
    """A browser page on the test notebook, once its kernel is idle; a screenshot of it
    goes to the artifacts if the test fails."""
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            page.goto(lab)
            page.wait_for_function(
                "window.jupyterapp?.shell.currentWidget?.sessionContext?.session?.kernel"
                " && window.jupyterapp.shell.currentWidget.sessionContext"
                ".session.kernel.status === 'idle'",
                timeout=60_000,
            )
            yield page
        except Exception:
            page.screenshot(path=ARTIFACTS / "widget-failure.png", full_page=True)
            raise
        finally:
            browser.close()


def run_cells(page, *indexes: int) -> None:
    """Run notebook cells through JupyterLab's own commands, waiting for each."""
    page.evaluate(
        """async (indexes) => {
        const panel = window.jupyterapp.shell.currentWidget;
        for (const index of indexes) {
            panel.content.activeCellIndex = index;
            await window.jupyterapp.commands.execute('notebook:run-cell');
        }
    }""",
        list(indexes),
    )


# Runs a cell and times, in the page, until the widget's log view shows the line
# `last` (among its last few lines: the process's exit event may follow it).
SHOW_LINES_JS = """async ({cell, last}) => {
    const start = performance.now();
    const panel = window.jupyterapp.shell.currentWidget;
    panel.content.activeCellIndex = cell;
    window.jupyterapp.commands.execute('notebook:run-cell');
    await new Promise((resolve, reject) => {
        const check = () => {
            let line = document.querySelector('.jsbw-logs')?.lastChild;
            for (let i = 0; line && i < 5; i++, line = line.previousSibling) {
                if (line.textContent === last) return resolve();
            }
            if (performance.now() - start > 30000) reject(new Error('line not shown'));
            else requestAnimationFrame(check);
        };
        check();
    });
    return performance.now() - start;
}"""
