"""The fake node's container runner: a command run in bubblewrap as a container would be.

The runner is part of the test fake of Kubernetes (no container runtime can run here);
what these tests check is what the real backend relies on from a container.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import wait_for
from tests.kube.pod_runner import pids_of, start_container, stop_container

pytestmark = pytest.mark.unprivileged

ENV = {"PATH": "/usr/bin:/bin", "ONLY": "this"}

REPORT = """
import json, os
home = "/data"
open(home + "/written", "w").write("x")
try:
    open("/config/new", "w")
    config_writable = True
except OSError:
    config_writable = False
print(json.dumps({
    "pid": os.getpid(), "uid": os.getuid(), "gid": os.getgid(), "env": dict(os.environ),
    "hosts": open("/etc/hosts").read(), "config": open("/config/key").read(),
    "config_writable": config_writable, "cwd": os.getcwd(),
    "usr_writable": os.access("/usr/bin", os.W_OK),
}))
"""


def test_command_runs_as_pid_1_with_its_uid_env_and_mounts(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "key").write_text("value")
    process = start_container(
        ["python3", "-c", REPORT],
        ENV,
        {"/data": tmp_path / "data", "/config": tmp_path / "config"},
        "127.0.9.9",
        1000,
        "/data",
        gid=1001,
        read_only={"/config"},
        hostname="sb-test",
        stdout=subprocess.PIPE,
    )
    out, _ = process.communicate(timeout=20)
    assert process.returncode == 0
    seen = json.loads(out)
    assert (seen["pid"], seen["uid"], seen["gid"]) == (1, 1000, 1001)
    # Only what was given (bwrap adds PWD, Python its locale coercion): nothing of ours.
    assert set(seen["env"]) - {"PWD", "LC_CTYPE"} == set(ENV)
    assert all(seen["env"][key] == value for key, value in ENV.items())
    assert "127.0.9.9\tsb-test" in seen["hosts"]
    assert seen["config"] == "value" and not seen["config_writable"]
    assert not seen["usr_writable"]
    assert seen["cwd"] == "/data"
    assert (tmp_path / "data" / "written").read_text() == "x"


def test_pid_1_ignores_unhandled_sigterm_and_sigkill_gives_137(tmp_path: Path) -> None:
    process = start_container(["sh", "-c", "sleep 60 & wait"], ENV, {}, "127.0.9.9", 1000)
    wait_for(lambda: len(pids_of(process)) == 3, message="the container's sleep")
    pids = pids_of(process)
    process.signal_command(signal.SIGTERM)  # sh as pid 1 has no handler: ignored
    with pytest.raises(subprocess.TimeoutExpired):
        process.wait(timeout=0.3)
    assert stop_container(process) == 137
    assert not [pid for pid in pids if os.path.exists(f"/proc/{pid}")]


def test_exit_status_is_the_commands(tmp_path: Path) -> None:
    process = start_container(["sh", "-c", "exit 3"], ENV, {}, "127.0.9.9", 1000)
    assert process.wait(timeout=20) == 3
