"""The ``jupyter-sandbox`` command line, run as a user would."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from jupyter_sandbox import Sandbox
from tests.conftest import ServiceEnv

pytestmark = pytest.mark.unprivileged


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
        info = json.loads(cli("info", "cli-box").stdout)
        assert info["id"] == sandbox_id and info["usage"] is not None
        assert "now ends at" in cli("extend", "cli-box", "10m").stdout
        assert json.loads(cli("status").stdout)["sandboxes"] >= 1
    finally:
        assert cli("kill", sandbox_id).stdout.strip() == f"killed {sandbox_id}"
    missing = cli("exec", sandbox_id, "--", "true", check=False)
    assert missing.returncode == 1 and "has ended" in missing.stderr


def test_kill_all_and_errors(service_env: ServiceEnv):
    cli = service_env.run_cli
    ids = {cli("create").stdout.strip() for _ in range(2)}
    killed = cli("kill", "--all").stdout
    assert all(f"killed {i}" in killed for i in ids)
    bad = cli("create", "--timeout", "soon", check=False)
    assert bad.returncode == 1 and "invalid duration 'soon'" in bad.stderr
    assert cli("kill", check=False).returncode == 1


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
