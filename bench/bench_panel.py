"""How much of the browser's main thread the Sandboxes panel takes with a class's sandboxes.

    python bench/bench_panel.py [--sandboxes 30,100] [--seconds 10]

For each count: a private service with that many sandboxes, a real ``jupyter lab`` with
the panel (usage sampled every 2 s, as by default), headless Debian chromium. In the
card view and in the table view, it waits until every sandbox shows, then measures over
`--seconds` the main thread's busy time (Chrome's TaskDuration: script, style, layout,
paint) and prints it as a share of the wall time, with the mean time a usage sample
costs. The panel must keep up: updates in place, no rebuild on every sample.
Afterwards the sandboxes are killed and the service stopped; nothing may be left.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from load import PrivateService  # noqa: E402
from playwright.sync_api import sync_playwright  # noqa: E402
from serverext_fixtures import JupyterProcess  # noqa: E402

from jupyter_sandbox import Sandbox  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
SERVICE_VARS = ("JUPYTER_RUNTIME_DIR", "JUPYTER_DATA_DIR", "JUPYTER_SANDBOX_DIR")
USAGE_INTERVAL = 2.0


def busy_seconds(cdp) -> float:
    metrics = cdp.send("Performance.getMetrics")["metrics"]
    return next(m["value"] for m in metrics if m["name"] == "TaskDuration")


def measure(page, cdp, seconds: float) -> tuple[float, float]:
    """Main-thread busy share over `seconds`, and busy ms per usage sample."""
    before, start = busy_seconds(cdp), time.monotonic()
    time.sleep(seconds)
    busy, wall = busy_seconds(cdp) - before, time.monotonic() - start
    return busy / wall, 1000 * busy / (wall / USAGE_INTERVAL)


def run(count: int, seconds: float, browser) -> None:
    service = PrivateService()
    sandboxes: list[Sandbox] = []
    lab = None
    try:
        sandboxes = [
            Sandbox.create(name=f"student-{i:03d}", timeout="30m", labels={"group": "ab"[i % 2]})
            for i in range(count)
        ]
        service.sandbox_ids.update(s.id for s in sandboxes)
        env = SimpleNamespace(env={k: os.environ[k] for k in SERVICE_VARS})  # PrivateService's
        lab = JupyterProcess(Path(tempfile.mkdtemp(prefix="jsb-bench-panel-")), env, "/")
        page = browser.new_page(viewport={"width": 1500, "height": 1000})
        cdp = page.context.new_cdp_session(page)
        cdp.send("Performance.enable")
        page.goto(f"{lab.url}lab?token={lab.token}")
        page.wait_for_function(
            "window.jupyterapp && window.jupyterapp.commands.hasCommand('jupyter-sandbox:open')"
        )
        page.evaluate(
            "async () => { await window.jupyterapp.restored;"
            " await window.jupyterapp.commands.execute('jupyter-sandbox:open'); }"
        )
        panel = page.locator("#jupyter-sandbox-panel")
        for view, item in (("cards", ".jsb-sandbox"), ("table", ".jsb-row")):
            page.locator(f"[data-view={view}]").click()
            page.wait_for_function(
                f"document.querySelectorAll('#jupyter-sandbox-panel {item}').length === {count}",
                timeout=120_000,
            )
            time.sleep(USAGE_INTERVAL * 2)  # settle: the first samples fill the charts
            share, per_sample = measure(page, cdp, seconds)
            print(
                f"{count:4d} sandboxes, {view:5s}: main thread busy {100 * share:5.1f}% "
                f"of the time, {per_sample:6.1f} ms per usage sample",
                flush=True,
            )
        assert panel.locator(".jsb-count").inner_text() == str(count)
        page.close()
    finally:
        for sandbox in sandboxes:
            sandbox.kill()
        if lab is not None:
            lab.stop()
        service.stop()
        left = service.leftovers()
        if left:
            raise SystemExit(f"left behind: {left}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sandboxes", default="30,100", help="comma-separated counts")
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            for count in (int(n) for n in args.sandboxes.split(",")):
                run(count, args.seconds, browser)
        finally:
            browser.close()


if __name__ == "__main__":
    main()
