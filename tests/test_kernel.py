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
from jupyter_sandbox._durations import format_size
from jupyter_sandbox.kernel.magics import LINE_PARSER

pytest.register_assert_rewrite("kernel_fixtures")
from conftest import agent_killed, kill_agent, wait_for  # noqa: E402
from kernel_fixtures import LOAD, Kernel  # noqa: E402

pytest_plugins = ["kernel_fixtures"]
pytestmark = pytest.mark.backends("local", "kubernetes")


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
    # One line, and nothing else: no Python traceback, no second copy on stderr.
    assert reply.error.content["traceback"] == [
        "interrupted: the command was stopped; sandbox 'default' is still running"
    ]
    assert "tick" in reply.stdout and not reply.stderr
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
    for cell in ("%sandbox kill", "%sandbox kill default --all"):
        reply = kernel.run(cell)
        assert "name the sandbox to kill (`%sandbox kill NAME`), or use --all" in reply.stderr


def test_a_mistyped_name_is_an_error_with_the_close_name(kernel: Kernel) -> None:
    """`%sandbox_ssh dmeo` does not quietly create a second sandbox: it names "demo"."""
    kernel.ok("%%sandbox demo\ntrue")
    before = live_ids()
    reply = kernel.run("%sandbox_ssh dmeo")
    assert reply.error.content["traceback"] == [
        "SandboxNotFound: no sandbox named 'dmeo'; did you mean 'demo'? "
        "To create one, use `%sandbox_ssh --new dmeo`."
    ]
    assert live_ids() == before
    assert "did you mean 'demo'?" in kernel.run("%sandbox info dmeo").error.text
    kernel.ok("%sandbox_ssh --new dmeo")
    assert sandbox_of(kernel, "dmeo").id not in before
    kernel.ok("%sandbox_ssh demo")  # an existing name, and the default, need no --new
    kernel.ok("%sandbox_ssh")
    assert len(live_ids() - before) == 2


def test_revoke_and_kill_all(start_kernel) -> None:
    first, other = start_kernel(), start_kernel()
    first.ok("%%sandbox one\ntrue")
    first.ok("%%sandbox two\ntrue")
    other.ok("%%sandbox theirs --timeout 5m\ntrue")
    one = sandbox_of(first, "one")
    handle = Sandbox.connect(one.id)
    first.ok("%sandbox_ssh one")
    assert first.ok("%sandbox revoke one").stdout == (
        "revoked 1 SSH credential of sandbox 'one'; it keeps running "
        "(`%sandbox_ssh one` makes a new one)\n"
    )
    assert handle.revoke_ssh() == 0, "the credential was still there"
    assert handle.info().status == "running"
    theirs = sandbox_of(other, "theirs").id
    ids = {one.id, sandbox_of(first, "two").id, theirs}
    killed = first.ok("%sandbox kill --all").stdout
    assert f"killed sandbox 'one' ({one.id})" in killed and f"killed {theirs}" in killed
    assert not ids & live_ids()
    assert first.ok("%sandbox kill --all").stdout == "no running sandboxes to kill\n"


def test_conflicting_options_on_a_later_cell(kernel: Kernel) -> None:
    kernel.ok("%%sandbox net --network host --memory 256M\ntrue")
    kernel.ok("%%sandbox net --network host\ntrue")  # repeating an option is fine
    kernel.ok("%%sandbox net\ntrue")
    reply = kernel.run("%%sandbox net --network none --memory 512M --cpus 2\ntrue")
    assert reply.error.content["ename"] == "SandboxConflict"
    assert "--network none (it has host)" in reply.error.text
    assert "--memory 512M (it has 256 MiB)" in reply.error.text
    kernel.ok("%%sandbox plain\ntrue")
    limits = sandbox_of(kernel, "plain").limits
    memory = limits["memory"] + (1 << 30)
    reply = kernel.run(f"%%sandbox plain --memory {memory} --cpus 64\ntrue")
    cpus = "no CPU limit" if limits["cpus"] is None else f"{limits['cpus']:g}"
    assert f"--memory {memory} (it has {format_size(limits['memory'])})" in reply.error.text
    assert f"--cpus 64 (it has {cpus})" in reply.error.text
    assert "None" not in reply.error.text
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
    # The SSH widget says so, live and in its saved text.
    shown = kernel.ok("%sandbox_ssh rec").outputs[0].content["data"]
    assert "terminal sessions are recorded" in shown["text/plain"]
    assert (
        kernel.ok(
            "import ipywidgets\n"
            "print([w.recording for w in ipywidgets.Widget.widgets.values()"
            " if hasattr(w, '_access')])"
        ).stdout
        == "[True]\n"
    )
    plain = kernel.ok("%sandbox_ssh plain").outputs[0].content["data"]["text/plain"]
    assert "recorded" not in plain


def test_help_has_examples_and_every_command(kernel: Kernel) -> None:
    pages = {
        magic: kernel.ok(magic).content["payload"][0]["data"]["text/plain"]
        for magic in ("%sandbox?", "%%sandbox?", "%sandbox_ssh?")
    }
    assert "usage: %sandbox [-h] COMMAND" in pages["%sandbox?"]
    assert "usage: %%sandbox [-h] [--timeout T]" in pages["%%sandbox?"]
    assert "usage: %sandbox_ssh [-h] [--new] [--ttl T]" in pages["%sandbox_ssh?"]
    for magic, page in pages.items():
        assert "examples:" in page, magic
        others = {"%sandbox?", "%%sandbox?", "%sandbox_ssh?"} - {magic}
        assert all(other in page for other in others), (magic, others)
    commands = LINE_PARSER._subparsers._group_actions[0].choices
    assert {"revoke", "kill"} <= set(commands)
    for command in commands:
        assert f"usage: %sandbox {command} [-h]" in pages["%sandbox?"], command
        assert f"%sandbox {command} " in pages["%sandbox?"].split("examples:")[1], command
    assert "usage: %sandbox list [-h] [--all]" in kernel.ok("%sandbox list -h").stdout
    assert "%sandbox_ssh --new lab" in pages["%sandbox_ssh?"]


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
    lines = reply.stdout.splitlines()[:3]  # each line names its process: "[proc:7:stdout] tick"
    assert len(lines) == 3 and all(line.endswith(":stdout] tick") for line in lines)
    assert not reply.stderr


def test_upload_and_download_show_progress(kernel: Kernel, tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(6 * 1024 * 1024))
    reply = kernel.ok(f"%sandbox upload {big} big.bin")
    bars = [o for o in reply.outputs if o.kind in ("display", "update")]
    assert bars and "100%  6 MiB / 6 MiB" in bars[-1].text
    assert "<progress" in bars[-1].content["data"]["text/html"]
    kernel.ok(f"%sandbox download big.bin {tmp_path / 'back.bin'}")
    assert (tmp_path / "back.bin").read_bytes() == big.read_bytes()
    (tmp_path / "small.txt").write_text("small")
    small = kernel.ok(f"%sandbox upload {tmp_path / 'small.txt'} small.txt")
    assert not [o for o in small.outputs if o.kind in ("display", "update")]
    assert small.stdout == f"uploaded {tmp_path / 'small.txt'} -> small.txt (5 bytes)\n"
    # A directory travels as a tar stream, but its size is the size of its files.
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "nine.txt").write_text("123456789")
    tree = kernel.ok(f"%sandbox upload {tmp_path / 'dir'} dir").stdout
    assert tree == f"uploaded {tmp_path / 'dir'} -> dir (9 bytes)\n"
    back = kernel.ok(f"%sandbox download dir {tmp_path / 'dir-back'}").stdout
    assert back == f"downloaded dir -> {tmp_path / 'dir-back'} (9 bytes)\n"


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
    kill_agent(service_env, sandbox.id)
    reason = agent_killed(service_env)
    reply = kernel.run("%%sandbox\ncat work.txt")
    assert reply.status == "error" and reply.error is not None
    assert "SandboxFailed" in reply.error.text and reason.split(";")[0] in reply.error.text
    assert "%sandbox restart default" in reply.error.text
    listed = kernel.ok("%sandbox list").stdout
    assert "failed" in listed and reason in listed
    shown = kernel.ok("%sandbox info").stdout
    assert "failed:   its agent was killed" in shown
    assert "its files are kept: `%sandbox download`" in shown and "not kept" not in shown
    assert sandbox_of(kernel).files_kept is True  # local, and kubernetes with a PVC home
    assert "%sandbox download --sandbox default" in reply.error.text
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
    # Without a local name it gets the name its notebook typed, not "shared-<kernel id>".
    assert (
        f"sandbox {shared} is now 'shared' here" in second.ok(f"%sandbox connect {shared}").stdout
    )
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


def widget_state(kernel: Kernel) -> tuple[str, str, str, str]:
    """(status, ssh_status, end_reason, message) of the kernel's newest SSH widget."""
    out = kernel.ok(
        "import ipywidgets\n"
        "_w = [w for w in ipywidgets.Widget.widgets.values() if hasattr(w, '_access')][-1]\n"
        "print(_w.status, _w.ssh_status, _w.end_reason, _w.message, sep='|')"
    ).stdout
    return tuple(out.rstrip("\n").split("|", 3))


def test_ssh_widget_follows_expiry_revocation_and_any_end(kernel: Kernel) -> None:
    """The widget's state is the truth: a TTL that runs out, `%sandbox revoke`, a kill from
    elsewhere and a deadline each show, and views lose the command; a Kill that finds
    the sandbox gone says so."""
    model_id = view_id(kernel.ok("%sandbox_ssh --ttl 2s"))
    assert kernel.custom_message(model_id, {"type": "ready"}, "hello")["command"]
    wait_for(lambda: widget_state(kernel)[1] == "expired", timeout=15, message="the TTL")
    assert kernel.custom_message(model_id, {"type": "ready"}, "hello")["command"] is None

    kernel.ok("%sandbox_ssh default")
    kernel.ok("%sandbox revoke default")
    assert widget_state(kernel)[:2] == ("running", "revoked")

    kernel.ok("%sandbox_ssh default")
    Sandbox.connect(sandbox_of(kernel).id).kill()
    wait_for(
        lambda: widget_state(kernel)[:3] == ("ended", "closed", "killed"),
        timeout=15,
        message="the widget to see the kill",
    )
    short = view_id(kernel.ok("%sandbox_ssh --new short"))
    short_id = sandbox_of(kernel, "short").id
    kernel.ok("%sandbox extend short 2s")
    wait_for(lambda: widget_state(kernel)[0] == "ended", timeout=20, message="the deadline to pass")
    reason = widget_state(kernel)[2]
    assert reason == {i.id: i for i in Sandbox.list(include_ended=True)}[short_id].end_reason
    assert kernel.custom_message(short, {"type": "kill"}, "hello")["command"] is None
    assert widget_state(kernel)[3] == (
        f"nothing to kill: sandbox 'short' had already ended ({reason})"
    )


def view_id(reply) -> str:
    """The widget model a cell's output shows."""
    return reply.outputs[0].content["data"]["application/vnd.jupyter.widget-view+json"]["model_id"]
