"""The "Sandboxes" panel in a real JupyterLab and Notebook 7, driven by headless Chromium.

Needs Debian's chromium (/usr/bin/chromium) and the built labextension (built with
npm if missing). Screenshots go to tests/artifacts/.
"""

from __future__ import annotations

import json
import os
import re
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
from tests.conftest import CHROMIUM, sandbox_pids, wait_for
from tests.test_quotas import quota_service, started  # noqa: F401 (a fixture)

pytest_plugins = ["tests.kube_fixtures"]
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


def laptop_env(home: Path) -> dict[str, str]:
    """The environment a pasted command runs in: its own HOME, this checkout's code."""
    home.mkdir(exist_ok=True)
    return {**os.environ, "HOME": str(home)}


def run_copied(command: str, remote: str, home: Path) -> str:
    """Run a copied SSH command in a shell, as a user pastes it, with `remote` appended.

    The tunnel is this checkout's module rather than an installed ``jupyter-sandbox``.
    """
    result = subprocess.run(
        ["bash"],
        input=pasted(command, remote),
        capture_output=True,
        text=True,
        timeout=60,
        env=laptop_env(home),
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def pasted(command: str, remote: str) -> str:
    """What a shell reads when `command` is pasted and `remote` typed after it (on stdin,
    as a terminal gives it: never in the shell's own argv)."""
    script = command.replace(
        "jupyter-sandbox tunnel", f"{sys.executable} -m jupyter_sandbox.cli.tunnel"
    )
    return f"{script} {remote}\n"


def argv_of_every_process(but: int = 0) -> list[str]:
    """The command line of every process on the machine (except pid `but`)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != but:
            try:
                found.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode())
            except OSError:
                continue
    return found


def secrets_in_argv_while_running(
    command: str, home: Path, secrets: list[str], server: JupyterProcess
) -> list[str]:
    """Run a copied SSH command (a remote sleep) and, once ssh and its tunnel run, return
    the command lines that hold any of `secrets`. The test's Jupyter server is left out:
    this test started it with its token on the command line."""
    marker = f"sleep 3.{os.getpid()}"
    proc = subprocess.Popen(
        ["bash"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=laptop_env(home),
    )
    proc.stdin.write(pasted(command, marker).encode())
    proc.stdin.close()
    try:
        wait_for(
            lambda: any(a.startswith("ssh ") and marker in a for a in argv_of_every_process()),
            30,
            message="the copied ssh command to run",
        )
        if "ProxyCommand" in command:
            wait_for(
                lambda: any("jupyter_sandbox.cli.tunnel" in a for a in argv_of_every_process()),
                30,
                message="the tunnel to run",
            )
        leaked = [
            argv
            for argv in argv_of_every_process(but=server.proc.pid)
            if any(secret in argv for secret in secrets)
        ]
        assert proc.wait(60) == 0, proc.stderr.read().decode()
        return leaked
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def ssh_token(copied: str) -> str:
    """The SSH credential a copied command writes into its config file."""
    match = re.search(r"'  User (\S+)'", copied)
    assert match, copied
    return match.group(1)


def widen_panel(page: Any, pixels: int = 350) -> None:
    """Drag the right sidebar's edge `pixels` to the left, as a user makes room."""
    handle = page.locator("#jp-main-split-panel > .lm-SplitPanel-handle:not(.lm-mod-hidden)")
    box = handle.last.bounding_box()
    page.mouse.move(box["x"] + 1, box["y"] + 200)
    page.mouse.down()
    page.mouse.move(box["x"] - pixels, box["y"] + 200, steps=5)
    page.mouse.up()


def tab_titles(page: Any) -> list[str]:
    return page.locator("#jp-main-dock-panel .lm-TabBar-tabLabel").all_inner_texts()


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
    # The name as typed, not the service's per-kernel name; no kernel id as a label.
    expect(nb_card.locator(".jsb-name")).to_have_text("nbbox")
    assert Sandbox.connect(sandbox_id).info().name.startswith("nbbox-")
    assert "kernel" not in nb_card.locator(".jsb-labels").inner_text()
    assert "kernel=" not in nb_card.inner_text()

    # The notebook is renamed: the card follows it.
    page.evaluate(
        "window.jupyterapp.serviceManager.contents"
        ".rename('course/lab1.ipynb', 'course/renamed.ipynb')"
    )
    expect(nb_card.locator(".jsb-owner")).to_have_text("course/renamed.ipynb")

    # Live usage: the charts fill up.
    expect(nb_card.locator(".jsb-chart-memory polyline")).to_have_attribute(
        "points", re.compile(r"\S+ \S+ \S+")
    )

    # Logs stream, every line with its time.
    nb_card.locator("[data-action=logs]").click()
    logs = nb_card.locator(".jsb-logs")
    expect(logs).to_contain_text("log-line-3")
    expect(logs).to_contain_text("log-line-12")
    line = logs.locator(".jsb-log-line", has_text="log-line-3").first
    expect(line).to_have_text(re.compile(r"^\d\d:\d\d:\d\d \[proc:\d+:stdout\] log-line-3$"))
    shot(page, "lab-notebook-sandbox")
    # ...and in a tab of its own, which follows the log too.
    nb_card.locator("[data-action=logs-tab]").click()
    log_tab = page.locator(".jsb-LogTab .jsb-logs")
    expect(log_tab).to_contain_text("log-line-3")
    last = int(re.findall(r"log-line-(\d+)", log_tab.inner_text())[-1])
    expect(log_tab).to_contain_text(f"log-line-{last + 3}")
    assert "Logs: nbbox" in tab_titles(page)
    # A line of the service's audit log is marked as the service's, apart from output.
    audited = Sandbox.connect(sandbox_id)
    audited.revoke_ssh(audited.expose_ssh())
    expect(log_tab.locator(".jsb-log-audit")).to_have_text(
        re.compile(r"^\d\d:\d\d:\d\d \[service\] SSH access revoked \(1 credential\(s\)\)$")
    )

    # Copy SSH: the clipboard holds a command that lands in the sandbox, directly...
    laptop = lab.root.parent / "laptop"
    nb_card.locator("[data-action=copy-ssh]").click()
    copied = clipboard(page, "ssh -F ")
    token = ssh_token(copied)
    shown = nb_card.locator(".jsb-ssh").input_value()
    assert shown == f"ssh -F ~/.ssh/jupyter-sandbox/{sandbox_id}.config {sandbox_id}"
    assert run_copied(copied, "hostname", laptop) == sandbox_id
    assert not secrets_in_argv_while_running(copied, laptop, [token], lab)
    # ...and through the Jupyter URL: no token on screen, none in any process's argv.
    nb_card.locator("[data-action=copy-tunnel]").click()
    tunnel = clipboard(page, "ProxyCommand")
    assert f"--url {lab.url}" in tunnel and "--token-file" in tunnel
    assert f"--token {lab.token}" not in tunnel
    shown = nb_card.locator(".jsb-tunnel").input_value()
    assert shown == f"ssh -F ~/.ssh/jupyter-sandbox/{sandbox_id}-jupyter.config {sandbox_id}"
    on_screen = page.evaluate(
        "[document.body.innerText,"
        " ...[...document.querySelectorAll('input')].map(i => i.value + ' ' + i.title)]"
        ".join(' ')"
    )
    assert lab.token not in on_screen and ssh_token(tunnel) not in on_screen
    assert run_copied(tunnel, "hostname", laptop) == sandbox_id
    leaked = secrets_in_argv_while_running(tunnel, laptop, [lab.token, ssh_token(tunnel)], lab)
    assert not leaked
    saved = laptop / ".ssh" / "jupyter-sandbox"
    for path in saved.iterdir():
        assert path.stat().st_mode & 0o077 == 0, path
    assert (saved / f"{sandbox_id}-jupyter.token").read_text().strip() == lab.token

    # Extend a "session" sandbox: it gets that much time from now.
    nb_card.locator("[data-action=extend]").click()
    page.locator(".jp-Dialog input").fill("2h")
    page.locator(".jp-Dialog .jp-mod-accept").click()
    expect(nb_card.locator(".jsb-left")).to_have_text(re.compile(r"^(1h 59m|2h 0m)$"))
    expect(nb_card.locator(".jsb-note")).to_contain_text("Extended by 2h")

    # Terminal: a shell inside the sandbox, in a tab named after it.
    nb_card.locator("[data-action=terminal]").click()
    terminal = page.locator(".jp-Terminal").last
    expect(terminal).to_be_visible()
    screen = terminal.locator(".xterm-accessibility-tree")  # its text, row by row
    expect(screen).to_contain_text(f"sandbox@{sandbox_id}")
    terminal.locator(".xterm-helper-textarea").focus()
    page.keyboard.type("hostname\n")
    expect(screen.locator("div", has_text=re.compile(f"^{sandbox_id}$"))).to_have_count(1)
    assert "SSH: nbbox" in tab_titles(page)
    assert not [t for t in tab_titles(page) if t.startswith("Terminal")]
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
    expect(form_card.locator(".jsb-limits")).to_contain_text("256 MiB memory")

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


def test_failed_sandbox_whose_home_is_lost_in_panel(
    page: Any, make_kube_service: Any, tmp_path: Path
) -> None:
    """On kubernetes with an emptyDir home, a sandbox whose pod is deleted lost its files:
    its card says they are not kept and what to do, never "files kept". Light and dark."""
    service = make_kube_service()  # default settings: emptyDir homes
    lab = server(tmp_path, service, "lab")
    lost = Sandbox.create(name="lost", timeout="10m")
    try:
        panel = open_panel(page, f"{lab.url}lab?token={lab.token}")
        failed_card = card(panel, lost.id)
        expect(failed_card).to_have_attribute("data-status", "running")
        service.cluster.delete("pods", service.pod(lost.id)["metadata"]["name"])
        expect(failed_card).to_have_attribute("data-status", "failed")
        failure = lost.info().failure
        assert failure and "no files are kept" in failure
        told = failed_card.locator(".jsb-failure")
        expect(told).to_contain_text(failure)
        expect(told).to_contain_text("Restart starts it with an empty home")
        expect(told).to_contain_text("JUPYTER_SANDBOX_K8S_HOME=pvc")
        expect(failed_card.locator(".jsb-left")).to_have_text("files not kept")
        restart = failed_card.locator("[data-action=restart]")
        expect(restart).to_be_visible()
        expect(restart).to_have_attribute("title", re.compile("with an empty home"))
        shot(page, "failed-emptydir-light")
        set_theme(page, "JupyterLab Dark")
        shot(page, "failed-emptydir-dark")
    finally:
        lost.kill()
        lab.stop()


# WCAG 2 contrast of every visible text, field, icon and button edge in the panel (and in
# an open dialog), against the background it is drawn on (the ancestors' backgrounds
# composed). Disabled controls are exempt, as WCAG has them.
CONTRAST = """root => {
  const rgba = c => {
    const p = c.match(/[\\d.]+/g).map(Number);
    return [p[0], p[1], p[2], p.length > 3 ? p[3] : 1];
  };
  const over = (top, under) => [0, 1, 2].map(i => top[i] * top[3] + under[i] * (1 - top[3]))
    .concat(1);
  const backdrop = node => {
    const layers = [];
    for (let e = node; e; e = e.parentElement) {
      const c = rgba(getComputedStyle(e).backgroundColor);
      if (c[3] > 0) { layers.push(c); if (c[3] >= 1) break; }
    }
    return layers.reverse().reduce((under, top) => over(top, under), [255, 255, 255, 1]);
  };
  const luminance = c => {
    const [r, g, b] = c.slice(0, 3).map(v => {
      v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4;
    });
    return 0.2126 * r + 0.7152 * g + 0.0722 * b;
  };
  const ratio = (a, b) => {
    const [x, y] = [luminance(a), luminance(b)].sort((p, q) => q - p);
    return (x + 0.05) / (y + 0.05);
  };
  const shown = e => e.checkVisibility({ checkOpacity: true, visibilityProperty: true })
    && !e.closest(':disabled') && e.getBoundingClientRect().width > 0;
  const bad = [];
  const check = (node, what, color, need) => {
    const bg = backdrop(node);
    const r = ratio(over(rgba(color), bg), bg);
    if (r < need) bad.push(`${what}: ${r.toFixed(2)} (${color} on rgb(${bg.slice(0, 3)}))`);
  };
  let count = 0;
  const walker = document.createTreeWalker(root, NodeFilter.SHOW_TEXT);
  const seen = new Set();
  for (let n = walker.nextNode(); n; n = walker.nextNode()) {
    const e = n.parentElement;
    if (!n.textContent.trim() || seen.has(e) || e.closest('select') || !shown(e)) continue;
    seen.add(e); count++;
    check(e, `text "${n.textContent.trim().slice(0, 40)}"`, getComputedStyle(e).color, 4.5);
  }
  for (const e of root.querySelectorAll('input:not([type=checkbox]), select, textarea')) {
    if (!shown(e)) continue;
    count++;
    check(e, `field ${e.className}`, getComputedStyle(e).color, 4.5);
    check(e.parentElement, `edge of field ${e.className}`, getComputedStyle(e).borderTopColor, 3);
  }
  for (const e of root.querySelectorAll('button')) {
    if (!shown(e)) continue;
    count++;
    const style = getComputedStyle(e);
    if (parseFloat(style.borderTopWidth) > 0 && rgba(style.borderTopColor)[3] > 0) {
      check(e.parentElement, `edge of button "${e.innerText.trim()}"`, style.borderTopColor, 3);
    }
    for (const svg of e.querySelectorAll('svg')) {
      // An icon's shape is told from the button by its most distinct colour (a glyph
      // inside a dark box contrasts with the box).
      const bg = backdrop(e);
      const fills = [...svg.querySelectorAll('[fill]:not([fill=none])')].filter(shown)
        .map(p => ratio(over(rgba(getComputedStyle(p).fill), bg), bg));
      if (fills.length && Math.max(...fills) < 3) {
        bad.push(`icon of button "${e.title || e.innerText.trim()}": ${Math.max(...fills)}`);
      }
    }
  }
  return { count, bad };
}"""

# Pairs of texts of a card that innerText (what a copy or a screen reader gets) runs
# together: "sessionmem 102400.0 GiB" was seen.
GLUED = """card => {
  const texts = [];
  const walker = document.createTreeWalker(card, NodeFilter.SHOW_TEXT);
  for (let n = walker.nextNode(); n; n = walker.nextNode()) {
    const text = n.textContent.trim();
    if (text && n.parentElement.checkVisibility()) texts.push(text);
  }
  const read = card.innerText;
  return texts.slice(1).map((t, i) => texts[i] + t).filter(pair => read.includes(pair));
}"""

# Parts of a card's copy fields that stick out of the card.
OVERFLOWING = """card => {
  const box = card.getBoundingClientRect();
  return [...card.querySelectorAll('.jsb-copy, .jsb-copy *')].filter(e => {
    const r = e.getBoundingClientRect();
    return r.width && (r.left < box.left - 0.5 || r.right > box.right + 0.5);
  }).map(e => e.className);
}"""

BUSY_MINUTE = "sh -c 'end=$(($(date +%s)+90)); while [ $(date +%s) -lt $end ]; do :; done'"


def assert_readable(page: Any, theme: str) -> None:
    """Every text of the panel at least 4.5:1 against its background, controls 3:1."""
    result = page.locator("#jupyter-sandbox-panel").evaluate(CONTRAST)
    assert result["count"] > 20, result
    assert not result["bad"], f"{theme}: {result['bad']}"


def assert_cards_laid_out(panel: Any) -> None:
    for each in panel.locator(".jsb-sandbox").all():
        assert not each.evaluate(GLUED), each.inner_text()
        assert not each.evaluate(OVERFLOWING)


def cpu_shown(sandbox_card: Any) -> float:
    caption = sandbox_card.locator(".jsb-chart-cpu .jsb-chart-caption").inner_text()
    match = re.match(r"CPU (\d+(?:\.\d)?)% \(100% = one core\)$", caption)
    assert match, caption
    return float(match.group(1))


def saved_view(lab: JupyterProcess) -> dict[str, Any]:
    """What the panel keeps in JupyterLab's state database (the workspace, on the server)."""
    workspace = lab.api("GET", "lab/api/workspaces/default")
    return workspace.get("data", {}).get("jupyter-sandbox:panel", {})


def row_names(panel: Any) -> list[str]:
    return panel.locator(".jsb-row .jsb-row-name").all_inner_texts()


def test_panel_for_a_class(page: Any, service_env: Any, tmp_path: Path) -> None:
    """One sandbox as a card (charts, copy fields, contrast in both themes), then thirty
    in the table: search, filter, sort, grouping, bulk kill and extend checked with the
    service."""
    lab = server(tmp_path, service_env, "lab")
    crowd: list[Sandbox] = []
    try:
        busy = Sandbox.create(
            name="busy", timeout="60m", cpus=2, memory="256M", labels={"group": "a"}
        )
        crowd.append(busy)
        panel = open_panel(page, f"{lab.url}lab?token={lab.token}")
        widen_panel(page, 600)  # room for every column of the table
        busy_card = card(panel, busy.id)

        # The charts' scales: CPU up to the limit of two cores (200%), memory its limit.
        cpu_axis = busy_card.locator(".jsb-chart-cpu .jsb-chart-axis span")
        expect(cpu_axis).to_have_text(["200%", "100%", "0"])
        memory_axis = busy_card.locator(".jsb-chart-memory .jsb-chart-axis span")
        expect(memory_axis).to_have_text(["256 MiB", "128 MiB", "0"])
        # The latest value is a dot at the right edge, seen from the first sample on (one
        # sample draws no line).
        cpu_caption = busy_card.locator(".jsb-chart-cpu .jsb-chart-caption")
        expect(cpu_caption).to_have_text(re.compile(r"^CPU \d"))
        cpu_dot = busy_card.locator(".jsb-chart-cpu .jsb-chart-dot")
        expect(cpu_dot).to_be_visible()
        # "Time left" is said once: its label says it, the value is only the time.
        expect(busy_card.locator(".jsb-left")).to_have_text(re.compile(r"^(59m \d+s|1h 0m)$"))
        assert "left left" not in busy_card.inner_text()
        # One busy process: at most one core, as top shows it (never two). How much of
        # one it gets depends on what else this machine runs.
        busy.spawn(BUSY_MINUTE)
        wait_for(lambda: cpu_shown(busy_card) >= 3, 60, message="the busy loop to show")
        assert cpu_shown(busy_card) <= 110
        svg_box = busy_card.locator(".jsb-chart-cpu svg").bounding_box()
        dot_box = cpu_dot.bounding_box()
        dot_x = dot_box["x"] + dot_box["width"] / 2
        dot_y = dot_box["y"] + dot_box["height"] / 2
        assert abs(dot_x - (svg_box["x"] + svg_box["width"])) <= 4
        assert svg_box["y"] < dot_y < svg_box["y"] + svg_box["height"]
        # A tooltip gives the value and time under the pointer.
        chart = busy_card.locator(".jsb-chart-cpu svg")
        box = chart.bounding_box()
        page.mouse.move(box["x"] + box["width"] - 2, box["y"] + box["height"] / 2)
        tip = busy_card.locator(".jsb-chart-cpu .jsb-chart-tip")
        expect(tip).to_have_text(re.compile(r"^CPU \d+(\.\d)?% at \d\d:\d\d:\d\d$"))
        page.mouse.move(0, 0)
        expect(tip).to_be_hidden()

        busy_card.locator("[data-action=copy-ssh]").click()
        busy_card.locator("[data-action=copy-tunnel]").click()
        expect(busy_card.locator(".jsb-tunnel")).to_be_visible()
        assert_cards_laid_out(panel)
        expect(panel.locator(".jsb-quota")).to_be_hidden()  # no quota set
        assert_readable(page, "light")
        shot(page, "one-light")
        set_theme(page, "JupyterLab Dark")
        assert_readable(page, "dark")
        shot(page, "one-dark")

        # Thirty, in the table.
        crowd.extend(
            Sandbox.create(
                name=f"student-{i:02d}", timeout=f"{10 + i}m", labels={"group": "ab"[i % 2]}
            )
            for i in range(29)
        )
        expect(panel.locator(".jsb-sandbox")).to_have_count(30)
        assert_cards_laid_out(panel)
        assert_readable(page, "dark, thirty cards")
        shot(page, "thirty-cards-dark")
        page.locator("[data-view=table]").click()
        rows = panel.locator(".jsb-row")
        expect(rows).to_have_count(30)
        assert_readable(page, "dark, table")
        # An owner too long for its column is cut with an ellipsis; its tooltip gives it
        # whole.
        owner_cell = panel.locator(f".jsb-row[data-id='{busy.id}'] .jsb-col-owner")
        expect(owner_cell).to_have_attribute("title", owner_cell.inner_text())
        shot(page, "thirty-table-dark")
        set_theme(page, "JupyterLab Light")
        assert_readable(page, "light, table")
        shot(page, "thirty-table-light")

        # Usage samples update the rows in place: none is rebuilt.
        rows.evaluate_all("rows => rows.forEach(r => (r.jsbProbe = true))")
        cpu_cell = panel.locator(f".jsb-row[data-id='{busy.id}'] .jsb-col-cpu")
        first = cpu_cell.inner_text()
        expect(cpu_cell).not_to_have_text(first)
        assert rows.evaluate_all("rows => rows.every(r => r.jsbProbe)")

        # The header stays in view while the rows scroll under it.
        body = panel.locator(".jsb-body-widget")
        body.evaluate("b => (b.scrollTop = b.scrollHeight)")
        header = panel.locator(".jsb-table thead th.jsb-col-name")
        assert abs(header.bounding_box()["y"] - body.bounding_box()["y"]) < 2
        body.evaluate("b => (b.scrollTop = 0)")

        # A row's name opens its card below it, with the charts and every action.
        busy_row = panel.locator(f".jsb-row[data-id='{busy.id}'] .jsb-row-name")
        busy_row.click()
        detail = panel.locator(f".jsb-detail[data-id='{busy.id}'] .jsb-sandbox")
        expect(detail.locator(".jsb-chart-cpu")).to_be_visible()
        expect(busy_row).to_have_attribute("aria-expanded", "true")
        busy_row.click()
        expect(detail).to_have_count(0)

        # Search narrows: by name, by label, by id.
        search = panel.locator(".jsb-search-input")
        search.fill("student-07")
        expect(rows).to_have_count(1)
        assert row_names(panel) == ["student-07"]
        search.fill("group=b")
        expect(rows).to_have_count(14)
        search.fill(busy.id)
        expect(rows).to_have_count(1)
        search.fill("")
        label = panel.locator("select[data-filter=label]")
        label.select_option("group=a")
        expect(rows).to_have_count(16)
        label.select_option("")
        expect(rows).to_have_count(30)

        # Sort by every column; here name and time left, both ways.
        names = [f"student-{i:02d}" for i in range(29)]
        panel.locator("[data-sort=name]").click()
        expect(panel.locator(".jsb-row .jsb-row-name")).to_have_text(sorted([*names, "busy"]))
        panel.locator("[data-sort=name]").click()
        expect(panel.locator(".jsb-row .jsb-row-name")).to_have_text(
            sorted([*names, "busy"], reverse=True)
        )
        panel.locator("[data-sort=left]").click()
        expect(panel.locator(".jsb-row .jsb-row-name")).to_have_text([*names, "busy"])
        for key in ("status", "owner", "cpu", "memory", "labels"):
            panel.locator(f"[data-sort={key}]").click()
            expect(panel.locator(f"th.jsb-col-{key}")).to_have_attribute("aria-sort", "ascending")
        panel.locator("[data-sort=left]").click()

        # Grouping by label, and the view is remembered across a reload.
        panel.locator("select[data-filter=group]").select_option("label")
        expect(panel.locator(".jsb-group th")).to_have_text(["group=a (16)", "group=b (14)"])
        wait_for(
            lambda: saved_view(lab).get("group") == "label",
            15,
            message="the workspace to save the panel's view",
        )
        page.reload()
        panel = open_panel(page, f"{lab.url}lab?token={lab.token}")
        widen_panel(page, 600)
        rows = panel.locator(".jsb-row")
        expect(rows).to_have_count(30)
        expect(panel.locator(".jsb-group th")).to_have_count(2)
        panel.locator("select[data-filter=group]").select_option("none")

        # Bulk kill: a confirmation naming them; exactly those three end.
        victims = [s for s in crowd if s.name in ("student-03", "student-04", "student-05")]
        for victim in victims:
            panel.locator(f".jsb-row[data-id='{victim.id}'] .jsb-select").check()
        expect(panel.locator(".jsb-bulk-count")).to_have_text("3 selected")
        panel.locator("[data-action=bulk-kill]").click()
        dialog = page.locator(".jp-Dialog")
        expect(dialog.locator(".jp-Dialog-header")).to_have_text("Kill 3 sandboxes?")
        listed = dialog.locator(".jsb-confirm-list li").all_inner_texts()
        assert sorted(listed) == sorted(f"{v.name} ({v.id})" for v in victims)
        shot(page, "bulk-kill")
        dialog.locator(".jp-mod-warn").click()
        expect(rows).to_have_count(27)
        alive = {s.id for s in Sandbox.list()}
        assert not alive & {v.id for v in victims}
        assert alive >= {s.id for s in crowd if s not in victims}
        expect(panel.locator(".jsb-bulk")).to_be_hidden()

        # Bulk extend adds the same time to each selected one, and to no other.
        chosen = [s for s in crowd if s.name in ("student-10", "student-11")]
        bystander = next(s for s in crowd if s.name == "student-12")
        before = {s.id: s.info().time_left for s in [*chosen, bystander]}
        for sandbox in chosen:
            panel.locator(f".jsb-row[data-id='{sandbox.id}'] .jsb-select").check()
        panel.locator("[data-action=bulk-extend]").click()
        page.locator(".jp-Dialog input").fill("10m")
        page.locator(".jp-Dialog .jp-mod-accept").click()
        for sandbox in chosen:
            wait_for(
                lambda s=sandbox: s.info().time_left >= before[s.id] + 600 - 10,
                15,
                message=f"{sandbox.name} to get 10 more minutes",
            )
            left = panel.locator(f".jsb-row[data-id='{sandbox.id}'] .jsb-col-left")
            expect(left).to_have_text(re.compile(r"^(2[89]|30)m \d+s$"))
        assert bystander.info().time_left <= before[bystander.id]
    finally:
        for sandbox in crowd:
            sandbox.kill()
        lab.stop()


def test_recorded_terminal_is_announced_and_replayed(
    page: Any, service_env: Any, tmp_path: Path
) -> None:
    """A sandbox that records its terminals says so; a session typed in the panel's
    terminal is replayed in a tab, with play, pause and seek."""
    lab = server(tmp_path, service_env, "lab")
    recorded = Sandbox.create(name="exam", timeout="10m", record_terminals=True)
    try:
        panel = open_panel(page, f"{lab.url}lab?token={lab.token}")
        exam = card(panel, recorded.id)
        expect(exam.locator(".jsb-recording")).to_contain_text("Terminal sessions are recorded")

        exam.locator("[data-action=terminal]").click()
        terminal = page.locator(".jp-Terminal").last
        screen = terminal.locator(".xterm-accessibility-tree")
        expect(screen).to_contain_text(f"sandbox@{recorded.id}")
        terminal.locator(".xterm-helper-textarea").focus()
        page.keyboard.type("echo replay-$((6*7))\n")
        expect(screen).to_contain_text("replay-42")
        wait_for(
            lambda: any(r.size > 0 for r in recorded.recordings()),
            15,
            message="the session to be recorded",
        )

        exam.locator("[data-action=recordings]").click()
        player = page.locator(".jsb-Recordings")
        expect(player.locator(".jsb-player-screen")).to_be_visible()
        assert "Recordings: exam" in tab_titles(page)
        seek = player.locator(".jsb-player-seek")
        end = float(seek.get_attribute("max"))
        assert end > 0
        # At the start nothing is shown yet; at the end the command's output is.
        expect(player.locator(".jsb-player-screen")).not_to_contain_text("replay-42")
        seek.evaluate(f"s => {{ s.value = '{end}'; s.dispatchEvent(new Event('input')); }}")
        expect(player.locator(".jsb-player-screen")).to_contain_text("replay-42")
        # Play from the start: the clock runs, and pause stops it.
        seek.evaluate("s => { s.value = '0'; s.dispatchEvent(new Event('input')); }")
        player.locator(".jsb-player-play").click()
        expect(player.locator(".jsb-player-play")).to_have_attribute("aria-pressed", "true")
        expect(seek).not_to_have_value("0")
        player.locator(".jsb-player-play").click()
        expect(player.locator(".jsb-player-play")).to_have_attribute("aria-pressed", "false")
        paused = seek.input_value()
        page.wait_for_timeout(300)  # a paused player does not move: nothing to poll for
        assert seek.input_value() == paused
        shot(page, "recording")
    finally:
        recorded.kill()
        lab.stop()


QUOTA = """
[quota.default]
sandboxes = 3
memory = "4G"
cpus = 4
lifetime = "8h"
"""


def test_quota_shows_the_users_use(
    page: Any,
    quota_service: Any,  # noqa: F811 (the fixture imported above)
    tmp_path: Path,
) -> None:
    """With a quota in the service's config file, the panel shows the user's use of it,
    kept up to date as sandboxes come and go."""
    started(quota_service, QUOTA)
    lab = server(tmp_path, quota_service, "lab")
    made: list[Sandbox] = []
    try:
        made.append(Sandbox.create(name="first", timeout="10m", memory="1G", cpus=1))
        panel = open_panel(page, f"{lab.url}lab?token={lab.token}")
        quota = panel.locator(".jsb-quota")
        expect(quota.locator(".jsb-quota-sandboxes")).to_have_text(re.compile(r"1 of 3"))
        expect(quota.locator(".jsb-quota-memory")).to_have_text(re.compile(r"1 GiB of 4 GiB"))
        expect(quota.locator(".jsb-quota-cpus")).to_have_text(re.compile(r"1 of 4"))
        expect(quota.locator(".jsb-quota-lifetime")).to_have_text(re.compile(r"8h 0m"))
        made.append(Sandbox.create(name="second", timeout="10m", memory="1G", cpus=1))
        expect(quota.locator(".jsb-quota-sandboxes")).to_have_text(re.compile(r"2 of 3"))
        assert_readable(page, "light, quota")
        shot(page, "quota")
        made.pop().kill()
        expect(quota.locator(".jsb-quota-sandboxes")).to_have_text(re.compile(r"1 of 3"))
    finally:
        for sandbox in made:
            sandbox.kill()
        lab.stop()
