"""The ``jupyter-sandbox`` command line, run as a user would."""

from __future__ import annotations

import json
import os
import pty
import shutil
import subprocess
import sys
import time

import pytest

from jupyter_sandbox import Sandbox
from jupyter_sandbox.cli import INFO_FIELDS, SANDBOX_FIELDS, STATUS_FIELDS
from tests.conftest import ServiceEnv, agent_killed, kill_agent, wait_for

pytestmark = [pytest.mark.unprivileged, pytest.mark.backends("local", "kubernetes")]


def test_create_list_exec_logs_kill(service_env: ServiceEnv, tmp_path):
    cli = service_env.run_cli
    sandbox_id = cli(
        "create",
        "--name",
        "cli-box",
        "--timeout",
        "5m",
        "--env",
        "GREETING=hi",
        "--label",
        "course=linux101",
    ).stdout.strip()
    try:
        assert sandbox_id.startswith("sb-")
        table = cli("list").stdout.splitlines()
        assert table[0].split()[:3] == ["ID", "NAME", "STATUS"]
        row = next(line for line in table if line.startswith(sandbox_id))
        assert "cli-box" in row and "running" in row and "course=linux101" in row
        listed = json.loads(cli("list", "--json").stdout)
        assert [s["name"] for s in listed if s["id"] == sandbox_id] == ["cli-box"]
        run = cli(
            "exec",
            "cli-box",
            "--",
            "sh",
            "-c",
            "echo $GREETING; echo oops >&2; exit 7",
            check=False,
        )
        assert (run.returncode, run.stdout, run.stderr) == (7, "hi\n", "oops\n")
        assert cli("exec", sandbox_id, "--", "cat", input="piped\n").stdout == "piped\n"
        (tmp_path / "up").mkdir()
        (tmp_path / "up" / "f.txt").write_text("payload")
        cli("upload", "cli-box", str(tmp_path / "up"), "up")
        assert cli("exec", "cli-box", "--", "cat", "up/f.txt").stdout == "payload"
        cli("download", "cli-box", "up", str(tmp_path / "down"))
        assert (tmp_path / "down" / "f.txt").read_text() == "payload"
        Sandbox.connect(sandbox_id).spawn("echo from-background").wait(10)
        logs = cli("logs", "cli-box").stdout
        assert "from-background" in logs and "exited with code 0" in logs
        info = json.loads(cli("info", "cli-box", "--json").stdout)
        assert info["id"] == sandbox_id and info["usage"] is not None
        assert "now ends at" in cli("extend", "cli-box", "10m").stdout
        assert json.loads(cli("status", "--json").stdout)["sandboxes"] >= 1
    finally:
        assert cli("kill", sandbox_id).stdout.strip() == f"killed {sandbox_id}"
    missing = cli("exec", sandbox_id, "--", "true", check=False)
    assert missing.returncode == 1 and "has ended" in missing.stderr


def test_kill_all_and_errors(service_env: ServiceEnv):
    cli = service_env.run_cli
    ids = {cli("create").stdout.strip() for _ in range(2)}
    killed = cli("kill", "--all").stdout  # not a terminal: no question asked
    assert all(f"killed {i}" in killed for i in ids)
    assert cli("kill", "--all").stdout == "no sandboxes to kill\n"
    bad = cli("create", "--timeout", "soon", check=False)
    assert bad.returncode == 1 and "invalid duration 'soon'" in bad.stderr
    for args in ((), ("--all", "sb-0123456789")):
        refused = cli("kill", *args, check=False)
        assert refused.returncode == 1
        assert "name the sandboxes to kill, or use --all (not both)" in refused.stderr


def run_on_a_terminal(service_env: ServiceEnv, args: list[str], answer: str) -> str:
    """Run the CLI with a pseudo-terminal as its stdin and stdout; type `answer`."""
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyter_sandbox", *args],
        env={**os.environ, **service_env.env},
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
    )
    os.close(terminal)
    seen = b""
    try:
        while b"[y/N]" not in seen:
            seen += os.read(controller, 4096)
        os.write(controller, answer.encode() + b"\n")
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # the CLI exited: the terminal is closed
                break
            if not chunk:
                break
            seen += chunk
    finally:
        assert proc.wait(timeout=60) in (0, 1)
        os.close(controller)
    return seen.decode()


def test_kill_all_asks_on_a_terminal(service_env: ServiceEnv):
    cli = service_env.run_cli
    ids = {cli("create", "--name", f"ask-{n}").stdout.strip() for n in range(2)}
    shown = run_on_a_terminal(service_env, ["kill", "--all"], "n")
    assert "ask-0" in shown and "ask-1" in shown
    assert "kill these 2 sandboxes and delete their files? [y/N]" in shown
    assert "nothing killed" in shown
    assert ids <= {s.id for s in Sandbox.list()}
    shown = run_on_a_terminal(service_env, ["kill", "--all"], "y")
    assert all(f"killed {i}" in shown for i in ids)
    assert not ids & {s.id for s in Sandbox.list()}
    sandbox_id = cli("create").stdout.strip()
    controller, terminal = pty.openpty()  # --yes: no question, even on a terminal
    done = subprocess.run(
        [sys.executable, "-m", "jupyter_sandbox", "kill", "--all", "--yes"],
        env={**os.environ, **service_env.env},
        stdin=terminal,
        capture_output=True,
        text=True,
        timeout=60,
    )
    os.close(terminal)
    os.close(controller)
    assert done.stdout == f"killed {sandbox_id}\n"


def test_follow_logs_streams_until_interrupted(service_env: ServiceEnv, sandbox):
    proc = subprocess.Popen(
        [*cli_argv(), "logs", "-f", sandbox.id],
        env={**os.environ, **service_env.env},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        sandbox.spawn("echo first-line")
        assert "started: echo first-line" in proc.stdout.readline()
        assert proc.stdout.readline().rstrip().endswith("first-line")
    finally:
        proc.terminate()
        proc.wait(10)


def cli_argv() -> list[str]:
    return [shutil.which("jupyter-sandbox") or "jupyter-sandbox"]


def test_jupyter_subcommand(service_env: ServiceEnv):
    if shutil.which("jupyter") is None:
        pytest.skip("jupyter_core's `jupyter` command is not on PATH")
    out = subprocess.run(
        ["jupyter", "sandbox", "list", "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, **service_env.env},
        check=True,
    )
    assert isinstance(json.loads(out.stdout), list)


def test_json_output_has_the_documented_fields_and_no_secrets(service_env: ServiceEnv, sandbox):
    cli = service_env.run_cli
    lease = sandbox._inner._lease  # the session sandbox's lease: whoever has it owns it
    assert lease
    with Sandbox.create(timeout="5m", memory="256M", labels={"course": "os"}) as sb:
        token = sb.expose_ssh().username
        listed = json.loads(cli("list", "--json").stdout)
        mine = next(s for s in listed if s["id"] == sb.id)
        assert list(mine) == list(SANDBOX_FIELDS)
        assert mine["status"] == "running" and mine["limits"]["memory"] == 256 << 20
        assert mine["labels"] == {"course": "os"} and mine["timeout"] == 300
        assert 0 < mine["expires_at"] - mine["created_at"] <= 300
        info = json.loads(cli("info", sb.id, "--json").stdout)
        assert list(info) == [*SANDBOX_FIELDS, *INFO_FIELDS]
        assert info["usage"]["available"] in (True, False)
        status = json.loads(cli("status", "--json").stdout)
        assert list(status) == [*STATUS_FIELDS, "log_file"]
        assert status["pid"] == service_env.service_pid() and status["sandboxes"] >= 1
        commands = [("list",), ("list", "--all", "--json"), ("status",), ("status", "--json")]
        for ref in (sb.id, sandbox.id):
            commands += [("info", ref), ("info", ref, "--json")]
        outputs = [cli(*command).stdout for command in commands]
        assert not [out for out in outputs if token in out], "an SSH token was printed"
        assert not [out for out in outputs if lease in out], "a lease was printed"


def columns(header: str, row: str) -> dict[str, str]:
    """The cells of `row` under each column title of `header` (aligned by position)."""
    titles = header.split()
    starts = [header.index(title) for title in titles]
    ends = [*starts[1:], None]
    return {t: row[a:b].strip() for t, a, b in zip(titles, starts, ends)}


def test_human_output_has_relative_times_and_sizes_in_aligned_columns(
    service_env: ServiceEnv, sandbox
):
    cli = service_env.run_cli
    with Sandbox.create(timeout="5m", memory="256M", disk="1G", name="human") as sb:
        header, *rows = cli("list").stdout.splitlines()
        by_id = {row.split()[0]: columns(header, row) for row in rows}
        timed, session = by_id[sb.id], by_id[sandbox.id]
        assert (timed["NAME"], timed["STATUS"]) == ("human", "running")
        assert timed["ENDS"] in ("in 5 min", "in 4 min"), timed
        assert timed["CREATED"].endswith(" s ago"), timed
        assert (timed["MEMORY"], timed["DISK"]) == ("256 MiB", "1 GiB"), timed
        assert session["ENDS"] == "session", session
        info = dict(
            line.split(None, 1) for line in cli("info", "human").stdout.splitlines() if " " in line
        )
        assert info["status"] == "running"
        assert info["memory"] == "256 MiB" and info["disk"] == "1 GiB"
        assert info["ends"].startswith(("in 5 min", "in 4 min"))
        assert info["created"].split(" (")[0].endswith(" s ago")
        status = cli("status").stdout
        assert f"pid {service_env.service_pid()}" in status
        assert str(service_env.log_file) in status
    header, *rows = cli("list", "--all").stdout.splitlines()
    ended = columns(header, next(row for row in rows if row.startswith(sb.id)))
    assert (ended["STATUS"], ended["ENDS"], ended["REASON"]) == ("ended", "-", "killed")


def test_a_failed_sandbox_shows_its_state_and_reason(service_env: ServiceEnv):
    cli = service_env.run_cli
    with Sandbox.create(timeout="5m") as sb:
        kill_agent(service_env, sb.id)
        wait_for(lambda: sb.info().status == "failed", 15, message="the sandbox to fail")
        reason = agent_killed(service_env).split(";")[0]
        header, *rows = cli("list").stdout.splitlines()
        row = columns(header, next(r for r in rows if r.startswith(sb.id)))
        assert row["STATUS"] == "failed" and reason in row["REASON"], row
        assert row["ENDS"] in ("in 5 min", "in 4 min"), row  # its deadline still holds
        status = next(
            line for line in cli("info", sb.id).stdout.splitlines() if line[:6] == "status"
        )
        assert status.split(None, 1)[1].startswith(f"failed: {reason}") and "s ago)" in status
        info = cli("info", sb.id).stdout.splitlines()
        files = next(line for line in info if line.startswith("files"))
        assert "kept until its deadline or a kill" in files and "not kept" not in files
        listed = next(s for s in json.loads(cli("list", "--json").stdout) if s["id"] == sb.id)
        assert listed["status"] == "failed" and reason in listed["failure"]
        assert listed["files_kept"] is True  # local, and kubernetes with a PVC home
        assert listed["failed_at"] <= time.time()
