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
from conftest import sandbox_pids, stop_process, wait_for

from jupyter_sandbox import Sandbox

pytest.register_assert_rewrite("kernel_fixtures")
from kernel_fixtures import LOAD  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
LOG_LINES = 10_000

pytest_plugins = ["tests.kube_fixtures"]
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


def write_notebook(path: Path, cells: list[str]) -> None:
    nb = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell(c) for c in cells],
        metadata={
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}
        },
    )
    nbformat.write(nb, path)


@contextlib.contextmanager
def jupyterlab(root: Path, notebook: str) -> Iterator[str]:
    """A JupyterLab server (token auth) on `root`; yields the URL of `notebook` in it.

    Each server is fresh (its own port, config and no widget state), but they share
    this session's Jupyter data dir, where notebook signatures live: a notebook saved
    by one is trusted by the next, as it is for a user who comes back the next day."""
    ARTIFACTS.mkdir(exist_ok=True)
    port, token = free_port(), secrets.token_hex(16)
    config = root.parent / f"config-{port}"
    news = config / "lab/user-settings/@jupyterlab/apputils-extension"
    news.mkdir(parents=True)  # no "news?" toast over the screenshots
    (news / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')
    log_path = root.parent / f"lab-{port}.log"
    log = log_path.open("wb")
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
            f"--ServerApp.root_dir={root}",
            "--LabApp.expose_app_in_browser=True",
            "--ServerApp.disable_check_xsrf=True",
        ],
        env={**os.environ, "JUPYTER_CONFIG_DIR": str(config)},
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
        yield f"{base}/lab/tree/{notebook}?token={token}"
    finally:
        stop_process(server, 30)
        log.close()
        shutil.copy(log_path, ARTIFACTS / "lab.log")


@pytest.fixture
def lab(service_env, tmp_path: Path) -> Iterator[str]:
    """A JupyterLab server with the test notebook; yields its notebook URL."""
    root = tmp_path / "root"
    root.mkdir()
    write_notebook(root / "widget.ipynb", CELLS)
    with jupyterlab(root, "widget.ipynb") as url:
        yield url


def test_ssh_widget_in_jupyterlab(lab: str, tmp_path: Path) -> None:
    notebook = tmp_path / "root" / "widget.ipynb"
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
        full_command = command.inner_text()
        token = full_command.split()[-1].split("@")[0]
        page.locator(".jsbw-logs", has_text="browser-line-1").wait_for(timeout=30_000)
        # A line of the service's audit log is marked as the service's, apart from output.
        audited = Sandbox.connect(sandbox_id_of(page))
        audited.revoke_ssh(audited.expose_ssh())  # another credential than the widget's
        audit = page.locator(".jsbw-logs .jsbw-audit")
        audit.wait_for(timeout=30_000)
        assert audit.inner_text() == "[service] SSH access revoked (1 credential(s))"
        page.screenshot(path=ARTIFACTS / "widget-live.png", full_page=True)

        # In a narrow window the command is cut with an ellipsis inside its card, and
        # Copy still copies all of it.
        page.set_viewport_size({"width": 560, "height": 1000})
        page.evaluate("window.jupyterapp.commands.execute('application:toggle-left-area')")
        page.wait_for_function(
            "(() => { const c = document.querySelector('.jsbw-command');"
            " return c.scrollWidth > c.clientWidth; })()"
        )
        fits = page.evaluate(
            """() => {
            const card = document.querySelector('.jsbw-ssh').getBoundingClientRect();
            return [...document.querySelectorAll('.jsbw-ssh *')].every((n) => {
                const r = n.getBoundingClientRect();
                return r.width === 0 || (r.left >= card.left - 0.5 && r.right <= card.right + 0.5);
            });
        }"""
        )
        assert fits, "something sticks out of the widget's card"
        assert page.locator(".jsbw-command").evaluate("c => getComputedStyle(c).textOverflow")
        page.context.grant_permissions(["clipboard-read", "clipboard-write"])
        page.get_by_role("button", name="Copy", exact=True).click()
        page.locator("button.jsbw-button", has_text="Copied").wait_for()
        assert page.evaluate("navigator.clipboard.readText()") == full_command
        page.screenshot(path=ARTIFACTS / "widget-narrow.png", full_page=True)
        page.evaluate("window.jupyterapp.commands.execute('application:toggle-left-area')")
        page.set_viewport_size({"width": 1400, "height": 1000})

        elapsed = page.evaluate(SHOW_LINES_JS, {"cell": 3, "last": str(LOG_LINES)})
        print(f"{LOG_LINES} log lines shown in the widget view in {elapsed:.0f} ms")
        (ARTIFACTS / "widget-10k-lines.txt").write_text(f"{elapsed:.0f} ms\n")
        assert elapsed < 2000
        page.screenshot(path=ARTIFACTS / "widget-10k-lines.png", full_page=True)

        sandbox_id = sandbox_id_of(page)
        # Kill asks first, in the widget; Cancel leaves the sandbox alone.
        page.get_by_role("button", name="Kill", exact=True).click()
        confirm = page.locator(".jsbw-confirm")
        assert 'Kill sandbox "default"? Its files are deleted.' in confirm.inner_text()
        page.screenshot(path=ARTIFACTS / "widget-kill-confirm.png", full_page=True)
        confirm.locator("button", has_text="Cancel").click()
        assert confirm.is_hidden() and sandbox_id in {s.id for s in Sandbox.list()}
        kill_from_widget(page)
        page.locator(".jsbw-status", has_text="ended: killed").wait_for(timeout=30_000)
        assert page.locator(".jsbw-command").get_attribute("class").count("jsbw-inactive")
        assert sandbox_id not in {s.id for s in Sandbox.list()}
        page.screenshot(path=ARTIFACTS / "widget-killed.png", full_page=True)
        # What JupyterLab saves has the widget's text forms only, with the token masked.
        page.evaluate("window.jupyterapp.commands.execute('docmanager:save')")
        saved = wait_for(
            lambda: "SSH into sandbox" in (text := notebook.read_text()) and text,
            timeout=30,
            message="the save",
        )
        assert token[:4] + "…" in saved and token not in saved
        assert "application/vnd.jupyter.widget-view+json" not in saved


def test_ssh_widget_shows_a_failure_and_restarts(lab: str, service_env) -> None:
    """The host kills the sandbox's agent: the widget says it failed and why, offers
    Restart (which brings it back running) and Kill."""
    with notebook_page(lab) as page:
        run_cells(page, 0, 1)
        status = page.locator(".jsbw-status")
        status.filter(has_text="running").wait_for(timeout=30_000)
        sandbox_id = sandbox_id_of(page)
        restart = page.locator("button.jsbw-button", has_text="Restart")
        assert restart.is_hidden()
        os.kill(sandbox_pids(service_env.storage, sandbox_id)["agent"], signal.SIGKILL)
        status.filter(has_text="failed: its agent was killed by signal 9").wait_for(timeout=30_000)
        assert "files are kept" in page.locator(".jsbw-sandbox-left").inner_text()
        assert page.get_by_role("button", name="Kill", exact=True).is_enabled()
        page.screenshot(path=ARTIFACTS / "widget-failed.png", full_page=True)
        set_theme(page, "JupyterLab Dark")
        page.screenshot(path=ARTIFACTS / "widget-failed-dark.png", full_page=True)
        restart.click()
        status.filter(has_text="running").wait_for(timeout=30_000)
        assert restart.is_hidden()
        assert {s.id: s.status for s in Sandbox.list()}[sandbox_id] == "running"
        kill_from_widget(page)
        status.filter(has_text="ended: killed").wait_for(timeout=30_000)


def test_ssh_widget_says_an_emptydir_home_is_lost(make_kube_service, tmp_path: Path) -> None:
    """On kubernetes with an emptyDir home, a sandbox whose pod is deleted lost its files:
    the widget says they are not kept and what to do, never that they are kept."""
    service = make_kube_service()  # default settings: emptyDir homes
    root = tmp_path / "root"
    root.mkdir()
    write_notebook(root / "widget.ipynb", CELLS)
    with jupyterlab(root, "widget.ipynb") as lab, notebook_page(lab) as page:
        run_cells(page, 0, 1)
        status = page.locator(".jsbw-status")
        status.filter(has_text="running").wait_for(timeout=30_000)
        sandbox_id = sandbox_id_of(page)
        service.cluster.delete("pods", service.pod(sandbox_id)["metadata"]["name"])
        status.filter(has_text="failed: its pod").wait_for(timeout=30_000)
        left = page.locator(".jsbw-sandbox-left")
        left.filter(has_text="its files are not kept").wait_for(timeout=30_000)
        assert "empty home" in left.inner_text() and "JUPYTER_SANDBOX_K8S_HOME=pvc" in (
            left.inner_text()
        )
        assert "its files are kept" not in page.locator(".jsbw-ssh").inner_text()
        page.screenshot(path=ARTIFACTS / "widget-failed-emptydir.png", full_page=True)
        set_theme(page, "JupyterLab Dark")
        page.screenshot(path=ARTIFACTS / "widget-failed-emptydir-dark.png", full_page=True)
        kill_from_widget(page)
        status.filter(has_text="ended: killed").wait_for(timeout=30_000)


@contextlib.contextmanager
def notebook_page(lab: str, kernel: bool = True) -> Iterator[Any]:
    """A browser page on the test notebook, once its kernel is idle (with `kernel`) or
    once it is shown; a screenshot of it goes to the artifacts if the test fails."""
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            page.goto(lab)
            page.wait_for_function(
                "window.jupyterapp?.shell.currentWidget?.sessionContext?.session?.kernel"
                " && window.jupyterapp.shell.currentWidget.sessionContext"
                ".session.kernel.status === 'idle'"
                if kernel
                else "window.jupyterapp?.shell.currentWidget?.content?.widgets?.length > 1",
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
# `last` (among its last few lines: the process's exit event may follow it), after the
# source every line starts with.
SHOW_LINES_JS = """async ({cell, last}) => {
    const start = performance.now();
    const panel = window.jupyterapp.shell.currentWidget;
    panel.content.activeCellIndex = cell;
    window.jupyterapp.commands.execute('notebook:run-cell');
    await new Promise((resolve, reject) => {
        const check = () => {
            let line = document.querySelector('.jsbw-logs')?.lastChild;
            for (let i = 0; line && i < 5; i++, line = line.previousSibling) {
                if (line.textContent.endsWith(`:stdout] ${last}`)) return resolve();
            }
            if (performance.now() - start > 30000) reject(new Error('line not shown'));
            else requestAnimationFrame(check);
        };
        check();
    });
    return performance.now() - start;
}"""


def sandbox_id_of(page, index: int = 0) -> str:
    """The id a widget shows in its title's tooltip ("sandbox sb-...")."""
    return page.locator(".jsbw-title").nth(index).get_attribute("title").split()[-1]


def kill_from_widget(page, index: int = 0) -> None:
    """Kill, then confirm in the widget."""
    widget = page.locator(".jsbw-ssh").nth(index)
    widget.locator("button.jsbw-button", has_text="Kill").first.click()
    widget.locator(".jsbw-confirm button", has_text="Kill it").click()


def set_theme(page, theme: str) -> None:
    page.evaluate(
        "(theme) => window.jupyterapp.commands.execute('apputils:change-theme', {theme})", theme
    )
    page.wait_for_function(f"document.body.dataset.jpThemeName === {theme!r}")
    page.wait_for_selector("#jupyterlab-splash", state="detached")


# Every piece of text in the widgets against what is behind it (backgrounds composited up
# the tree), and every enabled button and state dot against the card: WCAG contrast.
CONTRAST_JS = """() => {
    const parse = (c) => {
        const m = c.match(/rgba?\\(([^)]+)\\)/);
        if (!m) return null;
        const p = m[1].split(/[ ,\\/]+/).filter(Boolean).map(Number);
        return [p[0], p[1], p[2], p.length > 3 ? p[3] : 1];
    };
    const over = (top, bottom) => {
        const a = top[3];
        return [0, 1, 2].map((i) => top[i] * a + bottom[i] * (1 - a)).concat(1);
    };
    const background = (node) => {
        const layers = [];
        for (let n = node; n; n = n.parentElement) {
            const c = parse(getComputedStyle(n).backgroundColor);
            if (c && c[3] > 0) { layers.push(c); if (c[3] === 1) break; }
        }
        let colour = [255, 255, 255, 1];
        for (const layer of layers.reverse()) colour = over(layer, colour);
        return colour;
    };
    const lum = (c) => {
        const [r, g, b] = c.slice(0, 3).map((v) => {
            v /= 255;
            return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4;
        });
        return 0.2126 * r + 0.7152 * g + 0.0722 * b;
    };
    const ratio = (a, b) => {
        const [x, y] = [lum(a), lum(b)].sort((p, q) => q - p);
        return (x + 0.05) / (y + 0.05);
    };
    const visible = (n) =>
        n.getClientRects().length > 0 && getComputedStyle(n).visibility !== "hidden";
    const found = [];
    for (const card of document.querySelectorAll(".jsbw-ssh")) {
        const cardBg = background(card);
        for (const n of card.querySelectorAll("*")) {
            if (!visible(n) || n.disabled) continue;
            const own = [...n.childNodes].some((c) => c.nodeType === 3 && c.textContent.trim());
            if (own) {
                const bg = background(n);
                const fg = over(parse(getComputedStyle(n).color), bg);
                found.push({kind: "text", what: n.className + ": " + n.textContent.slice(0, 40),
                            ratio: ratio(fg, bg), need: 4.5});
            }
            const isDot = n.classList.contains("jsbw-dot");
            if (n.tagName === "BUTTON" || isDot) {
                const own = background(n);
                const border = parse(getComputedStyle(n).borderTopColor);
                const edge = Math.max(ratio(own, cardBg),
                    n.tagName === "BUTTON" && border ? ratio(over(border, cardBg), cardBg) : 0);
                found.push({kind: "ui", what: n.className + ": " + n.textContent.slice(0, 20),
                            ratio: edge, need: 3});
            }
        }
    }
    return found;
}"""


def assert_contrast(page, theme: str, live: bool = True) -> int:
    """Every text and enabled control of the widgets meets WCAG AA (Kill among them
    while `live`); returns how many were checked."""
    found = page.evaluate(CONTRAST_JS)
    poor = [f for f in found if f["ratio"] < f["need"]]
    assert not poor, (theme, poor)
    kills = [f for f in found if f["kind"] == "ui" and "jsbw-danger" in f["what"]]
    assert bool(kills) == live, found
    for kind in ("text", "ui"):
        lowest = min((f for f in found if f["kind"] == kind), key=lambda f: f["ratio"])
        print(f"{theme}: lowest {kind} contrast {lowest['ratio']:.2f}:1 ({lowest['what']})")
    return len(found)


def test_widget_follows_expiry_and_a_kernel_restart_in_both_themes(service_env, tmp_path):
    """A credential's TTL runs out: the widget says expired and Copy/Revoke go; a sandbox
    whose terminals are recorded says so. The kernel
    restarts (which ends its session sandboxes): the widget says so, and Kill, Extend,
    Copy and Revoke are off. Each state is readable (WCAG AA) in the light and dark theme."""
    root = tmp_path / "root"
    root.mkdir()
    cells = [
        LOAD,
        "%sandbox_ssh",
        "%%sandbox rec --record-terminals\ntrue",
        "%sandbox_ssh rec --ttl 3s",
    ]
    write_notebook(root / "states.ipynb", cells)
    with jupyterlab(root, "states.ipynb") as url, notebook_page(url) as page:
        run_cells(page, 0, 1, 2, 3)
        widgets = page.locator(".jsbw-ssh")
        widgets.nth(1).wait_for(timeout=30_000)
        live, expiring = widgets.nth(0), widgets.nth(1)
        live.locator(".jsbw-status", has_text="running · credential active").wait_for()
        page.wait_for_function(
            "!document.querySelectorAll('.jsbw-command')[0].textContent.includes('…')"
        )
        expiring.locator(".jsbw-status", has_text="running · credential expired").wait_for(
            timeout=15_000
        )
        assert expiring.locator(".jsbw-ssh-left").inner_text() == "credential: expired"
        for label in ("Copy", "Revoke SSH"):
            assert expiring.locator("button", has_text=label).is_disabled(), label
            assert live.locator("button", has_text=label).is_enabled(), label
        assert "…" in expiring.locator(".jsbw-command").inner_text()
        # Only the sandbox whose terminals are recorded says so.
        assert expiring.locator(".jsbw-recording").inner_text() == "terminal sessions are recorded"
        assert live.locator(".jsbw-recording").is_hidden()
        ids = {sandbox_id_of(page, 0), sandbox_id_of(page, 1)}
        assert ids <= {s.id for s in Sandbox.list()}
        for theme, name in (("JupyterLab Light", "light"), ("JupyterLab Dark", "dark")):
            set_theme(page, theme)
            assert_contrast(page, theme)
            page.screenshot(path=ARTIFACTS / f"widget-live-expired-{name}.png", full_page=True)

        page.evaluate(
            "window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.restart()"
        )
        for widget in (live, expiring):
            widget.locator(".jsbw-status", has_text="ended: its kernel restarted").wait_for(
                timeout=30_000
            )
            for label in ("Kill", "Extend +10m", "Copy", "Revoke SSH"):
                assert widget.locator("button", has_text=label).first.is_disabled(), label
            assert widget.locator(".jsbw-message").inner_text() == (
                "This view lost its kernel: run %sandbox_ssh again for a live one."
            )
        wait_for(
            lambda: not ids & {s.id for s in Sandbox.list()},
            timeout=30,
            message="the restart to end the session sandboxes",
        )
        for theme, name in (("JupyterLab Dark", "dark"), ("JupyterLab Light", "light")):
            set_theme(page, theme)
            assert_contrast(page, theme, live=False)
            page.screenshot(path=ARTIFACTS / f"widget-ended-{name}.png", full_page=True)


def test_a_saved_notebook_reopened_without_widget_state_shows_the_masked_text(
    service_env, tmp_path
) -> None:
    """Saved while the widget was live, opened in a new server (no kernel, no widget state,
    the notebook trusted): the output shows the widget's masked text, not "Error
    displaying widget"."""
    root = tmp_path / "root"
    root.mkdir()
    write_notebook(root / "saved.ipynb", [LOAD, "%sandbox_ssh"])
    with jupyterlab(root, "saved.ipynb") as url, notebook_page(url) as page:
        run_cells(page, 0, 1)
        page.wait_for_function(
            "(() => { const c = document.querySelector('.jsbw-command')?.textContent;"
            " return c && c.startsWith('ssh ') && !c.includes('…'); })()",
            timeout=30_000,
        )
        token = page.locator(".jsbw-command").inner_text().split()[-1].split("@")[0]
        page.evaluate("window.jupyterapp.commands.execute('docmanager:save')")
        wait_for(
            lambda: "SSH into sandbox" in (root / "saved.ipynb").read_text(),
            timeout=30,
            message="the save",
        )
        page.evaluate("window.jupyterapp.shell.currentWidget.sessionContext.shutdown()")
        wait_for(lambda: not Sandbox.list(), timeout=30, message="the kernel's sandbox to end")
    with jupyterlab(root, "saved.ipynb") as url, notebook_page(url, kernel=False) as page:
        output = page.locator(".jp-Cell").nth(1).locator(".jp-OutputArea-output")
        output.wait_for(timeout=30_000)
        assert page.evaluate(
            "window.jupyterapp.shell.currentWidget.content.widgets[1].model.trusted"
        ), "the notebook is not trusted: this would not test what a returning user sees"
        shown = output.inner_text()
        assert shown.startswith("SSH into sandbox 'default'"), shown
        assert "Error displaying widget" not in page.locator(".jp-Notebook").inner_text()
        assert token[:4] + "…" in shown and token not in page.content()
        assert "%sandbox_ssh default" in shown and "expose_ssh" not in shown
        page.screenshot(path=ARTIFACTS / "widget-saved-reopened.png", full_page=True)
