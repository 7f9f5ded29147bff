"""Kernel benchmarks: ``%%sandbox`` against ``%%bash``, and 10,000 log lines to the widget.

    python bench/bench_kernel.py [--runs 200]

Runs a private sandbox service (fresh Jupyter runtime, data and storage dirs)
and a real IPython kernel. Timings are execute_request -> execute_reply as
seen by a Jupyter client.

1. ``%%sandbox echo hi`` vs ``%%bash echo hi`` in the same kernel, once the
   sandbox exists, alternating: p50 of each and the ratio (target <= 1.5x).
2. The widget's message path: a background process in the sandbox prints
   10,000 lines; the time from starting it until a client acting as the widget's
   front end has received the 10,000th line in the widget's batched custom
   messages (target <= 2 s). The browser test measures the same in Chromium.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import uuid
from pathlib import Path

from bench_sandbox import private_service

LINES = 10_000


def execute(client, code: str) -> float:
    start = time.perf_counter()
    reply = client.execute_interactive(code, output_hook=lambda msg: None, timeout=60)
    elapsed = time.perf_counter() - start
    if reply["content"]["status"] != "ok":
        raise RuntimeError(f"{code!r} failed: {reply['content']}")
    return elapsed


def bench_cells(client, runs: int) -> None:
    execute(client, "%%sandbox\necho hi")  # create the sandbox
    for _ in range(5):
        execute(client, "%%bash\necho hi")
        execute(client, "%%sandbox\necho hi")
    sandbox, bash = [], []
    for _ in range(runs):
        bash.append(execute(client, "%%bash\necho hi"))
        sandbox.append(execute(client, "%%sandbox\necho hi"))
    p_sandbox, p_bash = statistics.median(sandbox), statistics.median(bash)
    print(
        f"%%sandbox echo hi: p50 {p_sandbox * 1000:.1f} ms  (p90 "
        f"{sorted(sandbox)[int(runs * 0.9)] * 1000:.1f} ms)"
    )
    print(
        f"%%bash echo hi:    p50 {p_bash * 1000:.1f} ms  (p90 "
        f"{sorted(bash)[int(runs * 0.9)] * 1000:.1f} ms)"
    )
    print(f"ratio: {p_sandbox / p_bash:.2f}x (target <= 1.5x), {runs} runs each")


def bench_widget_logs(client) -> None:
    replies: list = []
    client.execute_interactive(
        "%sandbox_ssh logs", timeout=60, output_hook=lambda msg: replies.append(msg)
    )
    display = next(m for m in replies if m["msg_type"] == "display_data")
    model_id = display["content"]["data"]["application/vnd.jupyter.widget-view+json"]["model_id"]
    client.shell_channel.send(
        client.session.msg(
            "comm_msg",
            {"comm_id": model_id, "data": {"method": "custom", "content": {"type": "ready"}}},
        )
    )
    start = time.perf_counter()
    client.execute(f"%%sandbox logs --bg\nseq 1 {LINES}")
    received, batches = 0, 0
    while True:
        msg = client.get_iopub_msg(timeout=30)
        data = msg["content"].get("data", {})
        if msg["msg_type"] != "comm_msg" or data.get("method") != "custom":
            continue
        content = data["content"]
        if content.get("type") != "logs":
            continue
        batches += 1
        received += len(content["lines"]) + content["skipped"]
        if any(text == str(LINES) for _stream, _source, text in content["lines"]):
            break
    elapsed = time.perf_counter() - start
    print(
        f"widget logs: {LINES} lines delivered to the view through the widget's message "
        f"path in {elapsed:.2f} s ({batches} batches, {received} entries incl. events; "
        "target <= 2 s)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    from jupyter_client.manager import KernelManager

    with private_service(pool=2):
        runtime = Path(os.environ["JUPYTER_RUNTIME_DIR"])
        runtime.mkdir(parents=True)
        manager = KernelManager(connection_file=str(runtime / f"kernel-{uuid.uuid4()}.json"))
        manager.start_kernel()
        client = manager.client()
        client.start_channels()
        try:
            client.wait_for_ready(timeout=60)
            execute(client, "%load_ext jupyter_sandbox.kernel")
            bench_cells(client, args.runs)
            bench_widget_logs(client)
        finally:
            manager.shutdown_kernel()
            client.stop_channels()


if __name__ == "__main__":
    main()
