"""One SSH endpoint for the machine: a system service's gateway (two worker processes)
used by two real students, directly and through a student's own Jupyter server.

A token a student got from the real client works over loopback for that student only:
not for the other student, not for root. The Jupyter server's tunnel connects as the
notebook's user, so it carries that student's identity to the gateway: their own token
works through it, another student's does not.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from jupyter_sandbox.ssh.gateway import OTHER_USER
from tests.conftest import UNPINNED_SSH, stop_process, wait_for
from tests.serverext_fixtures import free_port
from tests.system_fixtures import (
    SHARED_VENV,
    Classroom,
    OsUser,
    SystemService,
    as_user,
    popen_as,
    python_as,
    root_only,
    start_system_service,
)

pytestmark = [root_only, pytest.mark.timeout(600)]
ROOT = Path(__file__).resolve().parents[2]
BANNER = OTHER_USER.split(";")[0].removeprefix("jupyter-sandbox: ")

EXPOSE = r"""
import json
from jupyter_sandbox import Sandbox
sb = Sandbox.create(timeout="10m")
access = sb.expose_ssh()
print(json.dumps({"id": sb.id, "token": access.username, "port": access.port}))
"""

KILL_MINE = r"""
from jupyter_sandbox import Sandbox
for info in Sandbox.list():
    Sandbox.connect(info.id).kill()
"""


@pytest.fixture(scope="module")
def system(classroom: Classroom, shared_venv: Path) -> Iterator[SystemService]:
    service = start_system_service(JUPYTER_SANDBOX_SSH_WORKERS="2")
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture
def tokens(classroom: Classroom, system: SystemService) -> Iterator[dict[str, dict]]:
    """A sandbox and an SSH token of each student, got by the student's own client."""
    got = {}
    try:
        for student in classroom.students:
            done = python_as(student, system, EXPOSE)
            assert done.returncode == 0, done.stderr
            got[student.name] = json.loads(done.stdout.splitlines()[-1])
        yield got
    finally:
        for student in classroom.students:
            python_as(student, system, KILL_MINE)


def ssh(access: dict, *options: str, command: str = "id -un") -> list[str]:
    """ssh with `access`'s token; the banner shown (OpenSSH takes an option's first value)."""
    login = f"{access['token']}@127.0.0.1"
    port = str(access["port"])
    return ["ssh", "-o", "LogLevel=INFO", "-p", port, *UNPINNED_SSH, *options, login, command]


def test_a_students_token_works_over_loopback_only_for_that_student(
    classroom: Classroom, system: SystemService, tokens: dict[str, dict]
) -> None:
    """Attack: student B (and root) use student A's token over loopback. Refused like a
    wrong token, with the banner; A gets in, as the sandbox's user."""
    alice, bob = classroom.students
    access = tokens[alice.name]
    for thief in (bob, None):
        argv = ssh(access)
        done = (
            as_user(thief, system, argv)
            if thief
            else subprocess.run(argv, capture_output=True, text=True, timeout=60)
        )
        assert done.returncode == 255 and "Permission denied" in done.stderr, done.stderr
        assert BANNER in done.stderr
    done = as_user(alice, system, ssh(access))
    assert (done.returncode, done.stdout) == (0, "sandbox\n"), done.stderr
    assert access["token"] not in system.log


class StudentJupyter:
    """`jupyter server` with the extension, run as a student from the shared venv."""

    def __init__(self, student: OsUser, system: SystemService) -> None:
        self.port, self.token = free_port(), secrets.token_hex(12)
        self.url = f"http://127.0.0.1:{self.port}/"
        config = student.home / f".jsb-jupyter-{self.port}" / "jupyter_server_config.d"
        config.mkdir(parents=True)
        shutil.copy(ROOT / "jupyter-config" / "server-config" / "jupyter_sandbox.json", config)
        subprocess.run(
            ["chown", "-R", f"{student.uid}:{student.gid}", str(config.parent)], check=True
        )
        self.proc = popen_as(
            student,
            system,
            [
                str(SHARED_VENV / "bin" / "python"),
                "-m",
                "jupyter",
                "server",
                "--no-browser",
                f"--port={self.port}",
                "--ip=127.0.0.1",
                f"--IdentityProvider.token={self.token}",
                f"--ServerApp.root_dir={student.home}",
            ],
            JUPYTER_CONFIG_DIR=str(config.parent),
        )
        wait_for(self._up, 90, message="the student's Jupyter server")

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"jupyter server exited with {self.proc.returncode}")
        request = urllib.request.Request(
            self.url + "api/status", headers={"Authorization": f"token {self.token}"}
        )
        try:
            with urllib.request.urlopen(request, timeout=5):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        stop_process(self.proc, 20)
        self.proc.stdout.close()


def test_the_jupyter_tunnel_carries_the_notebook_users_identity(
    classroom: Classroom, system: SystemService, tokens: dict[str, dict]
) -> None:
    """Student A's own Jupyter server tunnels to the gateway as A: A's token works
    through it, student B's token (sent through A's server) is refused as B's would be
    from A on this machine."""
    alice, bob = classroom.students
    jupyter = StudentJupyter(alice, system)
    try:
        tunnel = f"{sys.executable} -m jupyter_sandbox.cli.tunnel --url {jupyter.url} %h"
        env = {**os.environ, "JUPYTER_TOKEN": jupyter.token}
        mine = tokens[alice.name]
        argv = ssh(mine, "-o", f"ProxyCommand={tunnel}", command="id -un")
        argv[-2] = f"{mine['token']}@{mine['id']}"
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
        assert (done.returncode, done.stdout) == (0, "sandbox\n"), done.stderr

        theirs = tokens[bob.name]
        argv[-2] = f"{theirs['token']}@{mine['id']}"
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
        assert done.returncode == 255 and BANNER in done.stderr, done.stderr
    finally:
        jupyter.stop()
        shutil.rmtree(alice.home / f".jsb-jupyter-{jupyter.port}", ignore_errors=True)
