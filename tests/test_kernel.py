"""The magics in a real kernel: streaming, errors, interrupts, lifetime, SSH output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from jupyter_sandbox import Sandbox, SandboxExpired

pytest.register_assert_rewrite("kernel_fixtures")
from conftest import sandbox_pids, wait_for  # noqa: E402
from kernel_fixtures import LOAD, Kernel  # noqa: E402

pytest_plugins = ["kernel_fixtures"]


def live_ids() -> set[str]:
    return {s.id for s in Sandbox.list()}


def sandbox_of(kernel: Kernel, name: str = "default"):
    """The service's record of sandbox `name` of `kernel`."""
    return next(s for s in Sandbox.list() if s.name == f"{name}-{kernel.id[:8]}")


# -- running cells ----------------------------------------------------------------------


def test_output_streams_live_in_order(kernel: Kernel) -> None:
    kernel.ok("%%sandbox\ntrue")  # the sandbox exists: time only the command
    reply = kernel.ok(
        "%%sandbox\nfor i in 1 2 3 4 5; do echo line$i; sleep 0.4; done\necho oops >&2"
    )
    assert reply.stdout == "".join(f"line{i}\n" for i in range(1, 6))
    assert reply.stderr == "oops\n"
    first = next(o for o in reply.outputs if "line1" in o.text)
    last = next(o for o in reply.outputs if "line5" in o.text)
    assert first.at < reply.elapsed - 1.2, "the first line came only when the command ended"
    assert last.at - first.at > 1.2, "lines were not shown as they were produced"
    kinds = [o.kind for o in reply.outputs]
    assert kinds.index("stderr") > max(i for i, k in enumerate(kinds) if k == "stdout")


def test_non_zero_exit_fails_the_cell_and_stops_run_all(service_env, tmp_path: Path) -> None:
    nb = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_code_cell(LOAD),
            nbformat.v4.new_code_cell("%%sandbox\necho before\nexit 3"),
            nbformat.v4.new_code_cell("print('after')"),
        ]
    )
    client = NotebookClient(
        nb, timeout=60, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    with pytest.raises(CellExecutionError) as failure:
        client.execute()
    assert "CommandError" in str(failure.value)
    assert "exited with code 3" in str(failure.value)
    outputs = nb.cells[1].outputs
    assert outputs[0]["text"] == "before\n"
    assert outputs[-1]["output_type"] == "error"
    assert outputs[-1]["traceback"] == [
        "CommandError: the script exited with code 3 in sandbox 'default'"
    ]
    assert nb.cells[2].outputs == [], "Run All went on after the failing cell"


def test_interrupt_stops_the_command_and_keeps_the_sandbox(kernel: Kernel) -> None:
    def interrupt_on_first_line(out) -> None:
        if "tick" in out.text:
            kernel.manager.interrupt_kernel()

    reply = kernel.run(
        "%%sandbox\nwhile true; do echo tick; sleep 0.2; done  # loop-marker",
        on_output=interrupt_on_first_line,
        timeout=30,
    )
    assert reply.status == "error"
    assert reply.error.content["ename"] == "KeyboardInterrupt"
    assert "the command was stopped" in reply.stderr
    # The loop is gone (stopping is asynchronous: allow it a few seconds) and the
    # sandbox still runs commands.
    check = kernel.ok(
        "%%sandbox\nfor i in $(seq 50); do pgrep -f '[l]oop-marker' >/dev/null || "
        "{ echo gone; exit 0; }; sleep 0.1; done; exit 1"
    )
    assert check.stdout == "gone\n"


def test_bad_arguments_are_usage_errors(kernel: Kernel) -> None:
    for cell, message in [
        ("%%sandbox --network wifi\ntrue", "invalid choice: 'wifi'"),
        ("%%sandbox --timeout soon\ntrue", "--timeout: expected"),
        ("%%sandbox --env NOVALUE\ntrue", "expected KEY=VALUE"),
        ("%%sandbox --cpus many\ntrue", "--cpus: expected a positive number of CPUs"),
        ("%%sandbox --cpus nan\ntrue", "--cpus: expected a positive number of CPUs"),
        ("%%sandbox --memory lots\ntrue", "--memory: invalid size 'lots'"),
        ("%sandbox logs --tail -1", "--tail: expected a whole number"),
        ("%%sandbox a b\ntrue", "unrecognized arguments: b"),
        ("%sandbox frobnicate", "invalid choice: 'frobnicate'"),
        ("%sandbox extend", "the following arguments are required: NAME, T"),
        ("%sandbox_ssh --ttl never", "--ttl: expected"),
        ("%sandbox upload /no/such/file x", "no such local file"),
    ]:
        reply = kernel.run(cell)
        assert reply.status == "error", cell
        assert "UsageError" in reply.stderr and message in reply.stderr, (cell, reply.stderr)
    reply = kernel.run("%sandbox kill nosuch")
    assert reply.error.content["traceback"] == [
        "SandboxNotFound: no sandbox named 'nosuch' in this kernel, and no sandbox with that "
        "id or name in the service (see `%sandbox list`)"
    ]


def test_conflicting_options_on_a_later_cell(kernel: Kernel) -> None:
    kernel.ok("%%sandbox net --network host --memory 256M\ntrue")
    kernel.ok("%%sandbox net --network host\ntrue")  # repeating an option is fine
    kernel.ok("%%sandbox net\ntrue")
    reply = kernel.run("%%sandbox net --network none --memory 512M\ntrue")
    assert reply.error.content["ename"] == "SandboxConflict"
    assert "--network none (it has host)" in reply.error.text
    assert "--memory 512M (it has 268435456 bytes)" in reply.error.text
    kernel.ok("%%sandbox timed --timeout 5m\ntrue")
    kernel.ok("%%sandbox timed --timeout 300\ntrue")
    reply = kernel.run("%%sandbox timed --timeout session\ntrue")
    assert "--timeout session (it has 5m00s)" in reply.error.text
    kernel.ok("%sandbox kill timed")


def test_record_terminals_option_makes_a_recorded_sandbox(kernel: Kernel) -> None:
    kernel.ok("%%sandbox rec --record-terminals\ntrue")
    kernel.ok("%%sandbox plain\ntrue")
    assert (sandbox_of(kernel, "rec").recording, sandbox_of(kernel, "plain").recording) == (
        True,
        False,
    )
    kernel.ok("%%sandbox rec --record-terminals\ntrue")  # repeating it is fine
    reply = kernel.run("%%sandbox plain --record-terminals\ntrue")
    assert "--record-terminals (its terminals are not recorded)" in reply.error.text


def test_help_is_argparse_style(kernel: Kernel) -> None:
    for magic, expected in [
        ("%sandbox?", "usage: %sandbox [-h] COMMAND"),
        ("%%sandbox?", "usage: %%sandbox [-h] [--timeout T]"),
        ("%sandbox_ssh?", "usage: %sandbox_ssh [-h] [--ttl T]"),
    ]:
        pager = kernel.ok(magic).content["payload"][0]["data"]["text/plain"]
        assert expected in pager, magic
    assert "usage: %sandbox list [-h] [--all]" in kernel.ok("%sandbox list -h").stdout


def test_env_image_and_background_process(kernel: Kernel, tmp_path: Path) -> None:
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "index.html").write_text("hello from the image\n")
    reply = kernel.ok(
        f"%%sandbox --image {tmp_path / 'site'} --env GREETING=hi\ncat index.html; echo $GREETING"
    )
    assert reply.stdout == "hello from the image\nhi\n"
    reply = kernel.ok("%%sandbox --bg\necho from-bg; echo bg-err >&2")
    assert "started pid" in reply.stdout
    kernel.ok("sb = %sandbox get\nassert all(p.wait(30) == 0 for p in sb.processes())")
    logs = kernel.ok("%sandbox logs")
    assert "from-bg\n" in logs.stdout and "bg-err\n" in logs.stderr


def test_logs_follow_until_interrupted(kernel: Kernel) -> None:
    kernel.ok("%%sandbox --bg\nwhile true; do echo tick; sleep 0.1; done")
    ticks: list = []

    def interrupt_on_third_tick(out) -> None:
        ticks.append(out)
        if len(ticks) == 3:
            kernel.manager.interrupt_kernel()

    reply = kernel.run("%sandbox logs --follow --tail 0", on_output=interrupt_on_third_tick)
    assert reply.status == "ok", reply.outputs  # interrupting a follow just ends it
    assert reply.stdout.startswith("tick\ntick\ntick\n") and not reply.stderr


def test_upload_and_download_show_progress(kernel: Kernel, tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(6 * 1024 * 1024))
    reply = kernel.ok(f"%sandbox upload {big} big.bin")
    bars = [o for o in reply.outputs if o.kind in ("display", "update")]
    assert bars and "100%" in bars[-1].text and "6.0 MiB" in bars[-1].text
    assert "<progress" in bars[-1].content["data"]["text/html"]
    kernel.ok(f"%sandbox download big.bin {tmp_path / 'back.bin'}")
    assert (tmp_path / "back.bin").read_bytes() == big.read_bytes()
    (tmp_path / "small.txt").write_text("small")
    small = kernel.ok(f"%sandbox upload {tmp_path / 'small.txt'} small.txt")
    assert not [o for o in small.outputs if o.kind in ("display", "update")]
    assert small.stdout == f"uploaded {tmp_path / 'small.txt'} -> small.txt (5 B)\n"


def test_unload_and_reload_keep_the_kernels_sandboxes(kernel: Kernel) -> None:
    kernel.ok("%%sandbox\necho kept > mark")
    kernel.ok("%unload_ext jupyter_sandbox.kernel")
    assert "not found" in kernel.run("%sandbox list").stderr
    kernel.ok(LOAD)
    assert kernel.ok("%%sandbox\ncat mark").stdout == "kept\n"


# -- lifetime -----------------------------------------------------------------------------


def test_owner_and_labels_name_the_kernel_and_notebook(start_kernel) -> None:
    kernel = start_kernel(env={"JPY_SESSION_NAME": "/home/me/work.ipynb"})
    kernel.ok("%%sandbox\ntrue")
    info = sandbox_of(kernel)
    assert info.labels == {"kernel": kernel.id, "notebook": "/home/me/work.ipynb"}
    assert info.owner == f"kernel {kernel.id} (/home/me/work.ipynb)"
    assert "this kernel" in kernel.ok("%sandbox list").stdout


def test_a_failed_sandbox_says_why_and_restarts_with_its_files(service_env, kernel: Kernel):
    """The host kills a cell's sandbox's agent: the next cell is refused with the reason and
    the magics that help, `%sandbox list` shows it failed, `%sandbox restart` brings it back."""
    kernel.ok("%%sandbox\necho kept > work.txt")
    sandbox = sandbox_of(kernel)
    os.kill(sandbox_pids(service_env.storage, sandbox.id)["agent"], signal.SIGKILL)
    reply = kernel.run("%%sandbox\ncat work.txt")
    assert reply.status == "error" and reply.error is not None
    assert "SandboxFailed" in reply.error.text and "killed by signal 9" in reply.error.text
    assert "%sandbox restart default" in reply.error.text
    listed = kernel.ok("%sandbox list").stdout
    assert "failed" in listed and "killed by signal 9 (SIGKILL); files kept" in listed
    assert "failed:   its agent was killed" in kernel.ok("%sandbox info").stdout
    assert "running again" in kernel.ok("%sandbox restart default").stdout
    assert kernel.ok("%%sandbox\ncat work.txt").stdout == "kept\n"


def test_restart_kills_session_sandboxes_and_keeps_duration_ones(kernel: Kernel) -> None:
    kernel.ok("%%sandbox\ntrue")
    kernel.ok("%%sandbox keep --timeout 5m\necho kept > mark")
    session, kept = sandbox_of(kernel).id, sandbox_of(kernel, "keep").id
    kernel.manager.restart_kernel(now=False)
    assert session not in live_ids(), "restart left the session sandbox running"
    assert_killed(session)
    assert kept in live_ids()
    kernel.client.wait_for_ready(timeout=60)
    kernel.ok(LOAD)
    # The same kernel id finds its duration sandbox again by name.
    assert kernel.ok("%%sandbox keep\ncat mark").stdout == "kept\n"
    kernel.ok("%sandbox kill keep")


def test_shutdown_kills_session_sandboxes_at_once(kernel: Kernel) -> None:
    kernel.ok("%%sandbox one\ntrue")
    kernel.ok("%%sandbox two\ntrue")
    ids = {sandbox_of(kernel, "one").id, sandbox_of(kernel, "two").id}
    kernel.shutdown()
    assert not ids & live_ids()
    for sandbox_id in ids:
        assert_killed(sandbox_id)


def assert_killed(sandbox_id: str) -> None:
    """It ended by a kill as its kernel went, not later by a lease that lapsed."""
    with pytest.raises(SandboxExpired, match=r"has ended: killed$"):
        Sandbox.connect(sandbox_id)


def test_sigkilled_kernel_sandboxes_are_reaped(kernel: Kernel) -> None:
    kernel.ok("%%sandbox\ntrue")
    session = sandbox_of(kernel).id
    os.kill(kernel.pid, signal.SIGKILL)
    wait_for(
        lambda: session not in live_ids(),
        timeout=15,
        interval=0.2,
        message="the lease of a SIGKILLed kernel's sandbox to lapse",
    )


def test_connect_from_a_second_kernel(start_kernel) -> None:
    first, second = start_kernel(), start_kernel()
    first.ok("%%sandbox shared\necho from-first > note")
    shared = sandbox_of(first, "shared").id
    assert (
        f"sandbox {shared} is now 'theirs' here"
        in second.ok(f"%sandbox connect {shared} theirs").stdout
    )
    assert second.ok("%%sandbox theirs\ncat note").stdout == "from-first\n"
    second.shutdown()  # connected, not owned: it stays
    assert shared in live_ids()
    first.shutdown()
    assert shared not in live_ids()


def test_under_nbgrader_every_sandbox_ends_with_the_kernel(start_kernel) -> None:
    """While nbgrader grades, a duration or an extension does not let a sandbox outlive the
    student's kernel."""
    kernel = start_kernel(env={"NBGRADER_EXECUTION": "autograde"})
    kernel.ok("%%sandbox stash --timeout 1h\ntrue")
    kernel.ok("%%sandbox\ntrue")
    extended = kernel.ok("%sandbox extend default 1h").stdout
    assert "it still ends with this kernel, as every sandbox does under nbgrader" in extended
    ids = {sandbox_of(kernel, "stash").id, sandbox_of(kernel).id}
    kernel.shutdown()
    assert not ids & live_ids()
    for sandbox_id in ids:
        assert_killed(sandbox_id)


# -- SSH ------------------------------------------------------------------------------------


def test_ssh_token_is_never_saved_in_the_notebook(service_env, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.json"
    nb = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_code_cell(LOAD),
            nbformat.v4.new_code_cell("%sandbox_ssh --ttl 10m"),
            # The tokens the kernel's widgets hold, written where the notebook is not.
            nbformat.v4.new_code_cell(
                "import ipywidgets, json, pathlib\n"
                f"pathlib.Path({str(tokens)!r}).write_text(json.dumps([w._access.username for w in "
                "list(ipywidgets.Widget.widgets.values()) if hasattr(w, '_access')]))"
            ),
            nbformat.v4.new_code_cell("%sandbox kill default"),
        ]
    )
    NotebookClient(
        nb, timeout=60, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    path = tmp_path / "saved.ipynb"
    nbformat.write(nb, path)
    saved = path.read_text()
    [token] = json.loads(tokens.read_text())
    assert len(token) >= 22
    assert token not in saved
    assert token[:4] + "…" in saved
    widget_state = nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]
    assert any(s["state"].get("masked_command") for s in widget_state["state"].values())
    bundle = nb.cells[1].outputs[0]["data"]
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert "the token is hidden" in bundle["text/plain"]


def test_ssh_widget_sends_the_command_only_to_live_views(kernel: Kernel) -> None:
    reply = kernel.ok("%sandbox_ssh")
    bundle = reply.outputs[0].content["data"]
    model_id = bundle["application/vnd.jupyter.widget-view+json"]["model_id"]
    hello = kernel.custom_message(model_id, {"type": "ready"}, "hello")
    command = hello["command"]
    assert command.startswith("ssh ") and "…" not in command
    token = command.split()[-1].split("@")[0] if "@" in command else command
    assert token not in bundle["text/plain"]
    # Revoking drops the command from live views too.
    kernel.custom_message(model_id, {"type": "revoke"}, "hello")
    assert kernel.custom_message(model_id, {"type": "ready"}, "hello")["command"] is None


def test_nbgrader_mode_is_plain_masked_text(start_kernel) -> None:
    kernel = start_kernel(env={"NBGRADER_EXECUTION": "autograde"})
    reply = kernel.ok("%sandbox_ssh")
    assert [o.kind for o in reply.outputs] == ["stdout"]
    text = reply.stdout
    assert text.startswith("SSH into sandbox 'default'") and "the token is hidden" in text


def test_terminal_ipython_shows_plain_text_with_the_command(service_env) -> None:
    code = f"{LOAD}\n%sandbox_ssh\n%sandbox kill default\n"
    result = subprocess.run(
        [sys.executable, "-m", "IPython", "--no-banner", "--colors=NoColor", "--quick"],
        input=code,
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ,
    )
    assert "SSH into sandbox 'default'" in result.stdout, result.stderr
    assert "the token is hidden" not in result.stdout
    assert "command:  ssh " in result.stdout
