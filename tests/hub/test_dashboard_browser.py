"""The instructor dashboard in a real headless Chromium (Debian's), logged in through the
hub's login form: as an instructor (table, filters, sort, live usage, logs, terminal,
extend, kill), as a student (refused), in the light and the dark colour scheme.

Screenshots go to tests/artifacts/dashboard-*.png.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CHROMIUM, UNPINNED_SSH, sandbox_pids
from tests.hub_fixtures import PASSWORD, Hub, OsUser, UserServer, as_root, system_sandboxes

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
WAIT_MS = 30_000
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian chromium")
sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect

# WCAG AA for normal text; the page's own colours, read from the rendered page.
CONTRAST = """(selector) => {
  const rgb = (c) => c.match(/[\\d.]+/g).slice(0, 3).map(Number);
  const lum = (c) => { const v = rgb(c).map((x) => { x /= 255;
    return x <= 0.03928 ? x / 12.92 : ((x + 0.055) / 1.055) ** 2.4; });
    return 0.2126 * v[0] + 0.7152 * v[1] + 0.0722 * v[2]; };
  const back = (node) => { for (; node; node = node.parentElement) {
    const c = getComputedStyle(node).backgroundColor;
    if (!/rgba\\(.*, 0\\)$/.test(c) && c !== "transparent") return c; }
    return "rgb(255, 255, 255)"; };
  return [...document.querySelectorAll(selector)].map((node) => {
    const a = lum(getComputedStyle(node).color), b = lum(back(node));
    return [node.textContent.trim().slice(0, 30),
            (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05)];
  });
}"""
CHECKED = (
    ".jsd-top h1, .jsd-who, .jsd-user, .jsd-name, .jsd-state, .jsd-why, .jsd-left, .jsd-memory,"
    " .jsd-btn"
)


def new_page(browser: Any, scheme: str) -> Any:
    context = browser.new_context(viewport={"width": 1400, "height": 800}, color_scheme=scheme)
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    expect.set_options(timeout=WAIT_MS)
    return page


def log_in(page: Any, hub: Hub, user: OsUser) -> None:
    page.goto(f"{hub.url}/hub/login?next=/services/sandboxes/")
    page.fill("#username_input", user.name)
    page.fill("#password_input", PASSWORD)
    page.click("#login_submit")
    page.wait_for_url(re.compile(r"/services/sandboxes/"))


def shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"dashboard-{name}.png"))


def create(server: UserServer, name: str, **options: Any) -> dict[str, Any]:
    reply = server.api(
        "POST", "sandbox/api/sandboxes", json={"name": name, "timeout": "5m", **options}
    )
    assert reply.status_code == 201, reply.text
    return reply.json()


@pytest.fixture
def classroom_sandboxes(hub: Hub) -> Iterator[dict[str, dict[str, Any]]]:
    """Sandboxes of two students, killed afterwards (those the test left)."""
    first, second = hub.server(hub.students[0]), hub.server(hub.students[1])
    made = {
        "a-lab1": create(first, "lab1", labels={"course": "lab1"}),
        "a-scratch": create(first, "scratch"),
        "b-lab1": create(second, "lab1", labels={"course": "lab1"}),
    }
    # Something to watch: output in the log and some CPU.
    as_root(
        hub.service,
        "POST",
        f"/v1/sandboxes/{made['b-lab1']['id']}/spawn",
        json={"cmd": "for i in $(seq 1 300); do echo tick-$i; sleep 0.2; done"},
    )
    yield made
    for box in made.values():
        if box["id"] in {s["id"] for s in system_sandboxes(hub.service)}:
            as_root(hub.service, "DELETE", f"/v1/sandboxes/{box['id']}")


def test_dashboard_in_a_browser_as_an_instructor(
    browser: Any, hub: Hub, classroom_sandboxes: dict[str, dict[str, Any]]
) -> None:
    boxes = classroom_sandboxes
    alice, bob = hub.students[0], hub.students[1]
    page = new_page(browser, "light")
    log_in(page, hub, hub.instructor)
    page.goto(f"{hub.url}/services/sandboxes/")
    rows = page.locator("#jsd-rows tr")
    expect(rows).to_have_count(3)
    # The page's source holds no token of any kind.
    source = page.content()
    assert hub.admin_token not in source and "token" not in page.url
    # Live usage fills in.
    row = page.locator(f"tr[data-id='{boxes['b-lab1']['id']}']")
    expect(row.locator(".jsd-memory")).to_contain_text(re.compile(r"[KMG]iB / "))
    expect(row.locator(".jsd-cpu")).to_contain_text("%")
    expect(row.locator(".jsd-label")).to_have_text("course=lab1")
    # ...and keeps updating.
    refreshed = page.locator("#jsd-status").text_content()
    expect(page.locator("#jsd-status")).not_to_have_text(refreshed)
    shot(page, "instructor-light")

    # Filters and search.
    page.select_option("#jsd-user", bob.name)
    expect(rows).to_have_count(1)
    page.select_option("#jsd-user", "")
    page.fill("#jsd-search", "course=lab1")
    expect(rows).to_have_count(2)
    page.fill("#jsd-search", "scratch")
    expect(rows).to_have_count(1)
    expect(rows.first.locator(".jsd-user")).to_have_text(alice.name)
    page.fill("#jsd-search", "")
    # Sort by user, then the other way.
    page.click("th[data-key=user] button")
    users = rows.locator(".jsd-user").all_text_contents()
    assert users == sorted(users, reverse=True), users
    page.click("th[data-key=user] button")
    assert rows.locator(".jsd-user").all_text_contents() == sorted(users)

    # Follow the log.
    row.locator("[data-action=logs]").click()
    expect(page.locator("#jsd-logs-text")).to_contain_text("tick-5")
    shot(page, "instructor-logs")
    page.click("#jsd-logs-close")

    # Extend adds time.
    row.locator("[data-action=extend]").click()
    page.fill("#jsd-extend-by", "1h")
    page.click("#jsd-dialog-ok")
    # It had under 5 minutes left: now an hour more (never an hour from now).
    expect(row.locator(".jsd-left")).to_have_text(re.compile(r"^1h [2-4]m$"))

    # A terminal: the command shown lands in the sandbox through the hub.
    row.locator("[data-action=terminal]").click()
    command = page.locator("#jsd-tunnel-command").text_content()
    shot(page, "instructor-terminal")
    page.click("#jsd-dialog-ok")
    argv = shlex.split(
        command.replace("jupyter-sandbox tunnel", f"{sys.executable} -m jupyter_sandbox.cli.tunnel")
    )
    argv[1:1] = UNPINNED_SSH
    result = subprocess.run(
        [*argv, "hostname"],
        env={**os.environ, "JUPYTER_TOKEN": hub.token(hub.instructor)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.stdout.strip() == boxes["b-lab1"]["id"], result.stderr

    # Kill asks first; cancelling keeps the sandbox.
    target = page.locator(f"tr[data-id='{boxes['a-scratch']['id']}']")
    target.locator("[data-action=kill]").click()
    expect(page.locator("#jsd-dialog-title")).to_contain_text(f"Kill {alice.name}")
    page.click("#jsd-dialog-cancel")
    assert boxes["a-scratch"]["id"] in {s["id"] for s in system_sandboxes(hub.service)}
    target.locator("[data-action=kill]").click()
    page.click("#jsd-dialog-ok")
    expect(target).to_have_count(0)
    assert boxes["a-scratch"]["id"] not in {s["id"] for s in system_sandboxes(hub.service)}
    expect(page.locator("#jsd-message")).to_contain_text("killed")

    low = [(text, ratio) for text, ratio in page.evaluate(CONTRAST, CHECKED) if ratio < 4.5]
    assert not low, f"text below WCAG AA contrast in the light scheme: {low}"


def test_dashboard_in_the_dark(
    browser: Any, hub: Hub, classroom_sandboxes: dict[str, dict[str, Any]]
) -> None:
    page = new_page(browser, "dark")
    log_in(page, hub, hub.instructor)
    page.goto(f"{hub.url}/services/sandboxes/")
    expect(page.locator("#jsd-rows tr")).to_have_count(3)
    expect(page.locator(".jsd-memory").first).to_contain_text("iB")
    background = page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert background == "rgb(17, 17, 17)", background
    # A sandbox whose agent the host killed shows as failed, and restarts from here.
    failed = classroom_sandboxes["a-lab1"]["id"]
    os.kill(sandbox_pids(hub.service.storage, failed)["agent"], signal.SIGKILL)
    row = page.locator(f"tr[data-id='{failed}']")
    expect(row.locator(".jsd-state")).to_have_text("failed")
    expect(row.locator(".jsd-why")).to_contain_text("killed by signal 9")
    page.locator("[data-action=kill]").first.click()  # the confirmation, in the dark
    shot(page, "instructor-dark")
    page.click("#jsd-dialog-cancel")
    low = [(text, ratio) for text, ratio in page.evaluate(CONTRAST, CHECKED) if ratio < 4.5]
    assert not low, f"text below WCAG AA contrast in the dark scheme: {low}"
    row.locator("[data-action=restart]").click()
    expect(row.locator(".jsd-state")).to_have_text("running")
    expect(row.locator("[data-action=restart]")).to_have_count(0)
    assert as_root(hub.service, "GET", f"/v1/sandboxes/{failed}").json()["status"] == "running"


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_dashboard_in_a_browser_refuses_a_student(browser: Any, hub: Hub, scheme: str) -> None:
    page = new_page(browser, scheme)
    log_in(page, hub, hub.students[2])
    response = page.goto(f"{hub.url}/services/sandboxes/")
    assert response.status == 403
    expect(page.locator("#jsd-refusal")).to_contain_text("is not an instructor here")
    assert page.locator("#jsd-rows").count() == 0
    shot(page, f"student-refused-{scheme}")
