"""The "Sandboxes" panel in a real JupyterLab and Notebook 7, driven by headless Chromium.

Needs Debian's chromium (/usr/bin/chromium) and the built labextension (built with
npm if missing). Screenshots go to tests/artifacts/.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from serverext_fixtures import JupyterProcess

from jupyter_sandbox import Sandbox
from tests.conftest import UNPINNED_SSH, sandbox_pids, wait_for

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
WAIT_MS = 30_000
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian chromium")
sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect

NOTEBOOK_CELLS = [
    "%load_ext jupyter_sandbox.kernel",
    "%%sandbox nbbox --bg\nfor i in $(seq 1 600); do echo log-line-$i; sleep 0.2; done",
]


@pytest.fixture
def jp_asyncio_loop() -> None:
    """Opt out of pytest-jupyter's autouse loop, which would close Playwright's running one."""


@pytest.fixture
def jp_server_cleanup() -> None:
    """No in-process server here: nothing for pytest-jupyter to clean up."""


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1500, "height": 1000})
    context.grant_permissions(["clipboard-read", "clipboard-write"])
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    expect.set_options(timeout=WAIT_MS)
    yield page
    context.close()


def server(tmp: Path, service_env: Any, app: str) -> JupyterProcess:
    return JupyterProcess(tmp, service_env, "/user/tester/", app=app)


def shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"panel-{name}.png"))


def open_panel(page: Any, url: str) -> Any:
    page.goto(url)
    page.wait_for_function(
        "window.jupyterapp && window.jupyterapp.commands.hasCommand('jupyter-sandbox:open')"
    )
    page.evaluate(
        "async () => { await window.jupyterapp.restored;"
        " await window.jupyterapp.commands.execute('jupyter-sandbox:open'); }"
    )
    panel = page.locator("#jupyter-sandbox-panel")
    expect(panel).to_be_visible()
    return panel


def card(panel: Any, sandbox_id: str) -> Any:
    return panel.locator(f".jsb-sandbox[data-id='{sandbox_id}']")


def appears_within(panel: Any, sandbox_id: str, seconds: float) -> float:
    """Seconds until `sandbox_id`'s card shows; fails after `seconds`."""
    start = time.monotonic()
    expect(card(panel, sandbox_id)).to_be_visible(timeout=seconds * 1000)
    return time.monotonic() - start


def clipboard(page: Any, containing: str) -> str:
    """The clipboard's text, once it contains `containing`."""
    deadline = time.monotonic() + WAIT_MS / 1000
    while containing not in (text := page.evaluate("navigator.clipboard.readText()")):
        assert time.monotonic() < deadline, f"clipboard holds {text!r}"
        time.sleep(0.1)
    return text


def run_copied(command: str, remote: str) -> str:
    """Run a copied ``ssh`` command line (the tunnel through this checkout's module)."""
    argv = shlex.split(
        command.replace(
            "jupyter-sandbox tunnel",
            f"{sys.executable} -m jupyter_sandbox.cli.tunnel",
        )
    )
    argv[1:1] = UNPINNED_SSH
    result = subprocess.run([*argv, remote], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_panel_in_jupyterlab(page: Any, service_env: Any, tmp_path: Path) -> None:
    lab = server(tmp_path, service_env, "lab")
    try:
        _exercise_lab(page, lab)
    finally:
        shot(page, "lab-final")
        lab.stop()


def _exercise_lab(page: Any, lab: JupyterProcess) -> None:
    notebook = {
        "cells": [
            {
                "cell_type": "code",
                "source": c,
                "metadata": {},
                "outputs": [],
                "execution_count": None,
            }
            for c in NOTEBOOK_CELLS
        ],
        "metadata": {
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    (lab.root / "course").mkdir()
    (lab.root / "course" / "lab1.ipynb").write_text(json.dumps(notebook))
    panel = open_panel(page, f"{lab.url}lab/tree/course/lab1.ipynb?token={lab.token}")
    expect(panel.locator(".jsb-empty")).to_be_visible()
    shot(page, "lab-empty")

    # A sandbox created from the notebook shows up, with its notebook.
    page.wait_for_selector(".jp-Notebook .jp-Cell")
    page.wait_for_function(
        "window.jupyterapp.shell.currentWidget?.sessionContext?.session"
        "?.kernel?.connectionStatus === 'connected'"
    )
    page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
    nb_card = panel.locator(".jsb-sandbox", has_text="nbbox")
    expect(nb_card).to_be_visible()
    expect(nb_card.locator(".jsb-owner")).to_have_text("course/lab1.ipynb")
    sandbox_id = nb_card.get_attribute("data-id")
    expect(nb_card.locator(".jsb-left")).to_have_text("session")

    # Live usage: the charts fill up.
    expect(nb_card.locator(".jsb-chart-memory polyline")).to_have_attribute(
        "points", re.compile(r"\S+ \S+ \S+")
    )

    # Logs stream.
    nb_card.locator("[data-action=logs]").click()
    expect(nb_card.locator(".jsb-logs")).to_contain_text("log-line-3")
    expect(nb_card.locator(".jsb-logs")).to_contain_text("log-line-12")
    shot(page, "lab-notebook-sandbox")

    # Copy SSH: the clipboard holds a command that lands in the sandbox, directly...
    nb_card.locator("[data-action=copy-ssh]").click()
    copied = clipboard(page, "ssh -p ")
    assert copied == nb_card.locator(".jsb-ssh").input_value()
    assert run_copied(copied, "hostname") == sandbox_id
    # ...and through the Jupyter URL.
    nb_card.locator("[data-action=copy-tunnel]").click()
    tunnel = clipboard(page, "ProxyCommand")
    assert f"--url {lab.url}" in tunnel and f"--token {lab.token}" in tunnel
    assert run_copied(tunnel, "hostname") == sandbox_id

    # Extend: the deadline moves to 2 h from now.
    nb_card.locator("[data-action=extend]").click()
    page.locator(".jp-Dialog input").fill("2h")
    page.locator(".jp-Dialog .jp-mod-accept").click()
    expect(nb_card.locator(".jsb-left")).to_have_text(re.compile(r"^(1h 59m|2h 0m) left$"))

    # Terminal: a shell inside the sandbox.
    nb_card.locator("[data-action=terminal]").click()
    terminal = page.locator(".jp-Terminal").last
    expect(terminal).to_be_visible()
    screen = terminal.locator(".xterm-accessibility-tree")  # its text, row by row
    expect(screen).to_contain_text(f"sandbox@{sandbox_id}")
    terminal.locator(".xterm-helper-textarea").focus()
    page.keyboard.type("hostname\n")
    expect(screen.locator("div", has_text=re.compile(f"^{sandbox_id}$"))).to_have_count(1)
    shot(page, "lab-terminal")

    # Changes made elsewhere show up within a second (plus the check's own latency).
    with Sandbox.create(name="from-script", timeout="1m") as other:
        assert appears_within(panel, other.id, 2.0) < 2.0
        other.kill()
        expect(card(panel, other.id)).to_have_count(0, timeout=2000)

    # The "New sandbox" form.
    page.locator("[data-action=new]").click()
    form = panel.locator(".jsb-form")
    form.locator("[name=name]").fill("formbox")
    form.locator("[name=timeout]").fill("5m")
    form.locator("[name=memory]").fill("256M")
    form.locator("[type=submit]").click()
    form_card = panel.locator(".jsb-sandbox", has_text="formbox")
    expect(form_card.locator(".jsb-limits")).to_contain_text("mem 256.0 MiB")

    # Kill, from the panel.
    for victim in (form_card, nb_card):
        victim.locator("[data-action=kill]").click()
        page.locator(".jp-Dialog .jp-mod-warn").click()
        expect(victim).to_have_count(0)
    assert not [s for s in Sandbox.list() if s.id == sandbox_id]
    lab.api("DELETE", f"api/sessions/{lab.api('GET', 'api/sessions')[0]['id']}")


def test_panel_in_notebook7(page: Any, service_env: Any, tmp_path: Path) -> None:
    notebook = server(tmp_path, service_env, "notebook")
    try:
        with Sandbox.create(name="nb7", timeout="1m", labels={"course": "intro"}) as sandbox:
            panel = open_panel(page, f"{notebook.url}tree?token={notebook.token}")
            expect(card(panel, sandbox.id)).to_contain_text("course=intro")
            page.wait_for_load_state("networkidle")
            shot(page, "notebook7")
            sandbox.kill()
            expect(card(panel, sandbox.id)).to_have_count(0)
    finally:
        notebook.stop()


REFRESH_S = 2.0  # SandboxExtension.usage_interval: the panel redraws on every sample

CARD_PROBE = """card => {
  const points = card.querySelector('.jsb-chart-memory polyline').getAttribute('points');
  card.jsbProbe = points;  // an expando: only this very node has it
  return points;
}"""


def test_refresh_leaves_form_and_cards_alone(page: Any, service_env: Any, tmp_path: Path) -> None:
    """Typing in the form and selecting text in a card survive the periodic refresh."""
    lab = server(tmp_path, service_env, "lab")
    try:
        (lab.root / "course" / "image" / "data").mkdir(parents=True)
        (lab.root / "course" / "image" / "data" / "hello.txt").write_text("from the image\n")
        with Sandbox.create(name="busy", timeout="2m") as busy:
            panel = open_panel(page, f"{lab.url}lab?token={lab.token}")
            busy_card = card(panel, busy.id)
            expect(busy_card.locator(".jsb-chart-memory polyline")).to_have_attribute(
                "points", re.compile(r"\S")
            )
            points = busy_card.evaluate(CARD_PROBE)

            # Type slowly into the name field, across several refreshes.
            page.locator("[data-action=new]").click()
            form = panel.locator(".jsb-form")
            name = form.locator("[name=name]")
            name.click()
            typed = "typed-slowly"
            started = time.monotonic()
            page.keyboard.type(typed, delay=int(2.5 * REFRESH_S * 1000 / len(typed)))
            assert time.monotonic() - started > 2 * REFRESH_S
            expect(name).to_have_value(typed)
            expect(name).to_be_focused()
            # The card was refreshed meanwhile, in place.
            assert busy_card.evaluate("c => c.jsbProbe") == points
            chart = busy_card.locator(".jsb-chart-memory polyline")
            assert chart.get_attribute("points") != points

            # A selection inside a card is not lost to refreshes either.
            select_id = (
                "card => { const range = document.createRange();"
                " range.selectNodeContents(card.querySelector('.jsb-id'));"
                " const s = getSelection(); s.removeAllRanges(); s.addRange(range); }"
            )
            busy_card.evaluate(select_id)
            before = chart.get_attribute("points")
            expect(chart).not_to_have_attribute("points", before)  # a refresh...
            before = chart.get_attribute("points")
            expect(chart).not_to_have_attribute("points", before)  # ...and another
            assert page.evaluate("getSelection().toString()") == busy.id

            # The image directory: uploaded into the new sandbox's home.
            name.click()
            form.locator("[name=timeout]").fill("1m")
            form.locator("[name=image]").fill("course/image")
            form.locator("[type=submit]").click()
            made = panel.locator(".jsb-sandbox", has_text=typed)
            expect(made).to_be_visible()
            with Sandbox.connect(made.get_attribute("data-id")) as sandbox:
                # The card shows up once the sandbox exists; the image follows it in.
                wait_for(
                    lambda: sandbox.fs.exists("data/hello.txt"),
                    30,
                    message="the image directory to be uploaded",
                )
                assert sandbox.fs.read_text("data/hello.txt") == "from the image\n"
                sandbox.kill()
            shot(page, "refresh")
    finally:
        lab.stop()


def set_theme(page: Any, theme: str) -> None:
    page.evaluate(
        f"window.jupyterapp.commands.execute('apputils:change-theme', {{theme: '{theme}'}})"
    )
    page.wait_for_function(f"document.body.dataset.jpThemeName === '{theme}'")
    page.wait_for_selector("#jupyterlab-splash", state="detached")  # shown while it changes


def test_failed_sandbox_in_panel(page: Any, service_env: Any, tmp_path: Path) -> None:
    """A sandbox whose agent is killed shows as failed with its reason; Restart brings it
    back with its files. Looked at in the light and the dark theme, alone and among 30."""
    lab = server(tmp_path, service_env, "lab")
    crowd: list[Sandbox] = []
    broken = Sandbox.create(name="broken", timeout="10m")
    try:
        broken.fs.write_text("work.txt", "kept through the failure\n")
        panel = open_panel(page, f"{lab.url}lab?token={lab.token}")
        failed_card = card(panel, broken.id)
        expect(failed_card).to_have_attribute("data-status", "running")
        expect(failed_card.locator("[data-action=restart]")).to_be_hidden()

        os.kill(sandbox_pids(service_env.storage, broken.id)["agent"], signal.SIGKILL)
        expect(failed_card).to_have_attribute("data-status", "failed")
        failure = broken.info().failure
        assert failure
        expect(failed_card.locator(".jsb-failure")).to_have_text(failure)
        expect(failed_card.locator(".jsb-left")).to_have_text(re.compile(r"^files kept \d"))
        for action in ("copy-ssh", "copy-tunnel", "terminal"):
            expect(failed_card.locator(f"[data-action={action}]")).to_be_disabled()
        expect(failed_card.locator("[data-action=restart]")).to_be_visible()
        shot(page, "failed-light")
        set_theme(page, "JupyterLab Dark")
        shot(page, "failed-dark")

        crowd.extend(Sandbox.create(name=f"student-{i:02d}", timeout="5m") for i in range(29))
        expect(panel.locator(".jsb-sandbox")).to_have_count(30)
        expect(panel.locator(".jsb-count")).to_have_text("30")
        shot(page, "thirty-dark")
        set_theme(page, "JupyterLab Light")
        failed_card.scroll_into_view_if_needed()
        shot(page, "thirty-light")

        failed_card.locator("[data-action=restart]").click()
        expect(failed_card).to_have_attribute("data-status", "running")
        expect(failed_card.locator(".jsb-failure")).to_be_hidden()
        expect(failed_card.locator("[data-action=copy-ssh]")).to_be_enabled()
        assert broken.sh("cat work.txt").stdout == "kept through the failure\n"
    finally:
        for sandbox in [*crowd, broken]:
            sandbox.kill()
        lab.stop()
