"""Real OS users and a real system service (`serve --system`) for the tests of system mode.

* `os_users(students, instructors)`: users made with ``useradd`` (named
  ``jsbt-<role><n>-<rand>``; instructors in a group ``jsbt-teachers-<rand>`` of their
  own), their processes killed and the users removed with ``userdel -r`` and
  ``groupdel`` afterwards, with a check that none is left. The `classroom` fixture holds
  two students and one instructor for a test session.
* `shared_venv`: a venv every user can run, ``/opt/jupyter-sandbox-test/venv`` (root's
  Python is under /root, closed to others); .ci/run makes it, else this fixture does.
  Its python runs this tree's code through ``PYTHONPATH``.
* `start_system_service(...)`: ``serve --system`` as root with a run, data and config
  directory of its own under a fresh directory (never the machine's), so no other
  test's client finds it; `SystemService.stop()` stops it and checks that nothing of
  its sandboxes is left.
* `as_user(user, service, argv)` runs a command as `user` (``setpriv --reuid --regid
  --init-groups``) against that service; `python_as` a Python snippet with the client.

Everything here needs root: `root_only` skips with the reason elsewhere.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.conftest import (
    sandbox_mounts,
    sandbox_processes,
    stop_process,
    storage_parent,
    wait_for,
)
from tests.security.test_service_collisions import _forget_uid_claims

ROOT = Path(__file__).resolve().parent.parent
SHARED_VENV = Path("/opt/jupyter-sandbox-test/venv")
USER_PREFIX = "jsbt-"

root_only = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: it makes OS users and runs serve --system"
)


@dataclass(frozen=True)
class OsUser:
    """A real user of this machine made for a test."""

    name: str
    uid: int
    gid: int
    home: Path


class Classroom(NamedTuple):
    """Users made by `os_users`; unpacks as (students, instructors, instructor_group)."""

    students: list[OsUser]
    instructors: list[OsUser]
    instructor_group: str


def user_processes(uid: int) -> list[int]:
    """Pids of the processes running as `uid`."""
    found = subprocess.run(["pgrep", "-U", str(uid)], capture_output=True, text=True)
    return [int(pid) for pid in found.stdout.split()]


def _exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _group_exists(name: str) -> bool:
    done = subprocess.run(["getent", "group", name], capture_output=True)
    return done.returncode == 0


@contextlib.contextmanager
def os_users(students: int = 2, instructors: int = 1) -> Iterator[Classroom]:
    """`students` and `instructors` as real users, removed afterwards (asserted)."""
    tag = secrets.token_hex(3)
    group = f"{USER_PREFIX}teachers-{tag}"
    made: list[OsUser] = []
    subprocess.run(["groupadd", group], check=True)
    try:
        for role, count in (("student", students), ("teacher", instructors)):
            for n in range(1, count + 1):
                name = f"{USER_PREFIX}{role}{n}-{tag}"
                extra = ["-G", group] if role == "teacher" else []
                subprocess.run(
                    ["useradd", "--create-home", "--shell", "/bin/bash", *extra, name],
                    check=True,
                    capture_output=True,
                )
                entry = pwd.getpwnam(name)
                made.append(OsUser(name, entry.pw_uid, entry.pw_gid, Path(entry.pw_dir)))
        yield Classroom(made[:students], made[students:], group)
    finally:
        for user in made:
            for pid in user_processes(user.uid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            wait_for(lambda u=user: not user_processes(u.uid), 10, message="users' processes")
            subprocess.run(["userdel", "--remove", user.name], capture_output=True)
        subprocess.run(["groupdel", group], capture_output=True)
        left = [u.name for u in made if _exists(u.name)] + [group] * _group_exists(group)
        assert not left, f"test users or groups left: {left}"
        homes = [str(u.home) for u in made if u.home.exists()]
        assert not homes, f"test users' homes left: {homes}"


@pytest.fixture(scope="session")
def classroom() -> Iterator[Classroom]:
    """Two students and an instructor for this test session (root only)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: it makes OS users")
    with os_users(2, 1) as made:
        yield made


def _venv_works(python: Path) -> bool:
    if not python.exists():
        return False
    done = subprocess.run(
        [str(python), "-c", "import httpx, aiohttp, asyncssh, jupyter_sandbox"],
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
    )
    return done.returncode == 0


@pytest.fixture(scope="session")
def shared_venv() -> Path:
    """The world-readable venv, made (once, under a lock) if it is missing."""
    python = SHARED_VENV / "bin" / "python"
    if _venv_works(python):
        return SHARED_VENV
    if os.geteuid() != 0:
        pytest.skip(f"{SHARED_VENV} is missing and only root can make it")
    SHARED_VENV.parent.mkdir(parents=True, exist_ok=True)
    with open(SHARED_VENV.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another session may be making it right now
        if not _venv_works(python):
            subprocess.run(["/usr/bin/python3", "-m", "venv", str(SHARED_VENV)], check=True)
            subprocess.run(
                [str(python), "-m", "pip", "install", "-q", "-e", f"{ROOT}[test]"],
                check=True,
                timeout=1800,
            )
    os.chmod(SHARED_VENV.parent, 0o755)
    return SHARED_VENV


@dataclass
class SystemService:
    """A running ``serve --system`` of a test, with its own directories."""

    base: Path  # holds run/, data/ and config.toml; passable (0711) by every user
    proc: subprocess.Popen
    env: dict[str, str]  # the service's environment
    config: Path = field(init=False)

    def __post_init__(self) -> None:
        self.config = self.base / "config.toml"

    @property
    def run_dir(self) -> Path:
        return self.base / "run"

    @property
    def data_dir(self) -> Path:
        return self.base / "data"

    @property
    def storage(self) -> Path:
        return self.data_dir / "sandboxes"

    @property
    def socket(self) -> Path:
        return self.run_dir / "jupyter-sandbox.sock"

    @property
    def runtime_file(self) -> Path:
        return self.run_dir / "jupyter-sandbox.json"

    @property
    def log(self) -> str:
        return (self.base / "service.log").read_text(errors="replace")

    def client_env(self) -> dict[str, str]:
        """What a client needs to find this service (and never the machine's)."""
        return {"JUPYTER_SANDBOX_SYSTEM_RUN": str(self.run_dir)}

    def reload(self) -> None:
        """SIGHUP to the supervisor, as `systemctl reload` sends it: the service reads its
        config file again."""
        self.proc.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        """Stop it; fail if any sandbox's process, mount or directory is left."""
        stop_process(self.proc, 60)
        processes = sandbox_processes(self.storage)
        for pid in processes:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        mounted = sandbox_mounts(self.storage)
        sandboxes = self.storage / "sandboxes"
        left = sorted(p.name for p in sandboxes.iterdir()) if sandboxes.exists() else []
        _forget_uid_claims(self.storage)
        shutil.rmtree(self.base, ignore_errors=True)
        assert not processes, f"sandbox processes left by the system service: {processes}"
        assert not mounted, f"sandbox homes left mounted by the system service: {mounted}"
        assert not left, f"sandbox directories left by the system service: {left}"


def start_system_service(
    instructor_groups: Sequence[str] = (), config: str | None = None, **env: str
) -> SystemService:
    """``serve --system`` with a private run, data and config directory, listening.

    The config file says `instructors = [instructor_groups]`, or is `config` if given;
    `env` adds to the service's environment (JUPYTER_SANDBOX_POOL="1", say).
    """
    base = Path(tempfile.mkdtemp(prefix="jsb-system-", dir=storage_parent()))
    os.chmod(base, 0o711)
    text = (
        config if config is not None else f"instructors = {json.dumps(list(instructor_groups))}\n"
    )
    (base / "config.toml").write_text(text)
    os.chmod(base / "config.toml", 0o644)
    service_env = {
        **os.environ,
        "JUPYTER_SANDBOX_SYSTEM_RUN": str(base / "run"),
        "JUPYTER_SANDBOX_SYSTEM_DATA": str(base / "data"),
        "JUPYTER_SANDBOX_CONFIG": str(base / "config.toml"),
        "JUPYTER_SANDBOX_SSH_PORT": "0",
        "JUPYTER_SANDBOX_POOL": "0",
        "JUPYTER_SANDBOX_LEASE_TTL": "4",
        "JUPYTER_SANDBOX_SSH_MAX_FAILURES": "100000",
        "PYTHONPATH": str(ROOT),
        **env,
    }
    with open(base / "service.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jupyter_sandbox", "serve", "--system"],
            env=service_env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    service = SystemService(base, proc, service_env)

    def listening() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"serve --system exited {proc.returncode}:\n{service.log}")
        return service.runtime_file.exists()

    try:
        wait_for(listening, 60, message="the system service to listen")
    except BaseException:
        service.stop()
        raise
    return service


def user_env(user: OsUser, service: SystemService | None, venv: Path, **extra: str) -> dict:
    """The environment of a login of `user`: its own home and Jupyter dirs, the shared
    venv first on PATH, this tree's code, and the system service to use (None: none)."""
    env = {
        "HOME": str(user.home),
        "USER": user.name,
        "LOGNAME": user.name,
        "PATH": f"{venv / 'bin'}:/usr/local/bin:/usr/bin:/bin",
        "PYTHONPATH": str(ROOT),
        "PYTHONDONTWRITEBYTECODE": "1",
        "LANG": "C.UTF-8",
        "JUPYTER_SANDBOX_SYSTEM_RUN": (
            str(service.run_dir) if service else "/nonexistent/jupyter-sandbox-tests/run"
        ),
    }
    return {**env, **extra}


def as_user(
    user: OsUser,
    service: SystemService | None,
    argv: Sequence[str],
    venv: Path = SHARED_VENV,
    timeout: float = 120,
    input: str | None = None,
    **env: str,
) -> subprocess.CompletedProcess:
    """Run `argv` as `user` (its uid, gid and groups), in `user_env`, from its home."""
    return subprocess.run(
        ["setpriv", "--reuid", str(user.uid), "--regid", str(user.gid), "--init-groups", *argv],
        env=user_env(user, service, venv, **env),
        cwd=user.home,
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
    )


def popen_as(
    user: OsUser, service: SystemService | None, argv: Sequence[str], **env: str
) -> subprocess.Popen:
    """`argv` started as `user`, as `as_user` runs it; its stdout is a text pipe."""
    return subprocess.Popen(
        ["setpriv", "--reuid", str(user.uid), "--regid", str(user.gid), "--init-groups", *argv],
        env=user_env(user, service, SHARED_VENV, **env),
        cwd=user.home,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def python_as(
    user: OsUser, service: SystemService | None, code: str, *args: str, **env: str
) -> subprocess.CompletedProcess:
    """A Python snippet run as `user` with the shared venv's python (the real client)."""
    return as_user(user, service, [str(SHARED_VENV / "bin" / "python"), "-c", code, *args], **env)


def cli_as(
    user: OsUser, service: SystemService | None, *args: str, **env: str
) -> subprocess.CompletedProcess:
    """``jupyter-sandbox ARGS`` run as `user`."""
    python = str(SHARED_VENV / "bin" / "python")
    return as_user(user, service, [python, "-m", "jupyter_sandbox", *args], **env)


def stop_user_services(user: OsUser) -> None:
    """Stop the per-user services `user`'s clients started (tests of auto mode)."""
    for pid in user_processes(user.uid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not user_processes(user.uid), 60, message=f"{user.name}'s processes to end")
