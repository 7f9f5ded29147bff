"""System mode with real OS users: two students and an instructor, each running the real
client (the shared venv's python, as that user) against a real ``serve --system``.

Each student sees and acts on only their own sandboxes; another's id or name answers
exactly as an unknown one, over the client and over raw HTTP on the socket. The
instructor sees all and acts on a student's sandbox; the student reads each action in
their sandbox's log. Also: a caller without a passwd entry, the per-user service chosen
where no system service runs, JUPYTER_SANDBOX_MODE=system with none, the config file.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import _alive, storage_parent, unnamed_id, wait_for
from tests.system_fixtures import (
    SHARED_VENV,
    Classroom,
    OsUser,
    SystemService,
    as_user,
    cli_as,
    popen_as,
    python_as,
    root_only,
    start_system_service,
    stop_user_services,
    user_processes,
)

pytestmark = [root_only, pytest.mark.timeout(600)]

# Every endpoint that names a sandbox, with a body it accepts.
PROBE = r"""
import json, sys, httpx
socket, ref, headers = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
calls = [
    ("GET", "", {}), ("DELETE", "", {}), ("POST", "/restart", {"json": {}}),
    ("POST", "/timeout", {"json": {"timeout": "1h"}}), ("POST", "/lease", {"json": {"lease": "x"}}),
    ("POST", "/ssh", {"json": {}}), ("POST", "/ssh/revoke", {"json": {}}),
    ("POST", "/exec", {"json": {"cmd": "id"}}), ("POST", "/spawn", {"json": {"cmd": "id"}}),
    ("GET", "/agent", {}), ("GET", "/procs", {}), ("GET", "/procs/1/wait", {}),
    ("POST", "/procs/1/signal", {"json": {}}), ("GET", "/logs", {}),
    ("POST", "/files/list", {"json": {"path": "."}}),
    ("POST", "/files/stat", {"json": {"path": "."}}),
    ("POST", "/files/remove", {"json": {"path": "x"}}),
    ("GET", "/files/read", {"params": {"path": "x"}}),
    ("PUT", "/files/write", {"params": {"path": "x"}, "content": b"forged"}),
    ("GET", "/files/tar", {"params": {"path": "."}}),
    ("PUT", "/files/tar", {"params": {"path": "."}, "content": b""}),
    ("GET", "/recordings", {}), ("GET", "/recordings/1.cast", {}),
]
client = httpx.Client(
    transport=httpx.HTTPTransport(uds=socket), base_url="http://sandbox-service",
    headers=headers, timeout=60,
)
answers = {}
for method, tail, kwargs in calls:
    r = client.request(method, f"/v1/sandboxes/{ref}{tail}", **kwargs)
    answers[f"{method} {tail}"] = [r.status_code, r.text.replace(ref, "REF")]
print(json.dumps(answers))
"""

CREATE = r"""
import json, sys
from jupyter_sandbox import Sandbox
sb = Sandbox.create(name=sys.argv[1], timeout="10m")
sb.fs.write_text("mine.txt", sys.argv[1])
print(json.dumps({"id": sb.id, "name": sb.name, "user": sb.info().user, "uid": sb.info().uid}))
"""

LIST = r"""
import json
from jupyter_sandbox import Sandbox
print(json.dumps(sorted([s.id, s.name, s.user] for s in Sandbox.list())))
"""

KILL_ALL = r"""
from jupyter_sandbox import Sandbox
for info in Sandbox.list():
    Sandbox.connect(info.id).kill()
"""


def run_json(user: OsUser, service: SystemService | None, code: str, *args: str, **env: str) -> Any:
    done = python_as(user, service, code, *args, **env)
    assert done.returncode == 0, f"{user.name}: {done.stderr}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def as_root(service: SystemService, code: str, *args: str) -> subprocess.CompletedProcess:
    """The client as root (an instructor of any system service) against `service`."""
    env = {**os.environ, **service.client_env(), "JUPYTER_SANDBOX_MODE": "system"}
    return subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=120
    )


def kill_all(service: SystemService) -> None:
    """Kill every sandbox of `service`, as root."""
    done = as_root(service, KILL_ALL)
    assert done.returncode == 0, done.stderr


@contextlib.contextmanager
def serving(*args: Any, **kwargs: Any) -> Iterator[SystemService]:
    """``start_system_service(*args, **kwargs)``; its sandboxes killed and it stopped after."""
    service = start_system_service(*args, **kwargs)
    try:
        yield service
    finally:
        as_root(service, KILL_ALL)
        service.stop()


@pytest.fixture(scope="module")
def system(classroom: Classroom, shared_venv: Path) -> Iterator[SystemService]:
    with serving([classroom.instructor_group]) as service:
        yield service


@pytest.fixture
def students(classroom: Classroom, system: SystemService) -> Iterator[list[OsUser]]:
    """The students; every sandbox of the system service is killed after the test."""
    yield classroom.students
    kill_all(system)


@pytest.fixture
def teacher(classroom: Classroom) -> OsUser:
    return classroom.instructors[0]


def unknown_id() -> str:
    return "sb-" + secrets.token_hex(5)


def test_each_student_sees_only_their_own_sandboxes(
    students: list[OsUser], teacher: OsUser, system: SystemService
) -> None:
    alice, bob = students
    a = run_json(alice, system, CREATE, "work")
    b = run_json(bob, system, CREATE, "work")  # names are per user
    assert (a["user"], a["uid"]) == (alice.name, alice.uid)
    assert (b["user"], b["uid"]) == (bob.name, bob.uid)
    assert run_json(alice, system, LIST) == [[a["id"], "work", alice.name]]
    assert run_json(bob, system, LIST) == [[b["id"], "work", bob.name]]
    everyone = run_json(teacher, system, LIST)
    assert everyone == sorted([[a["id"], "work", alice.name], [b["id"], "work", bob.name]])
    ambiguous = r"""
from jupyter_sandbox import InvalidRequest, Sandbox
try:
    Sandbox.connect("work")
except InvalidRequest as e:
    print(e)
"""
    done = python_as(teacher, system, ambiguous)
    assert done.stdout.strip() == (
        f"sandboxes of several users are named 'work' ({alice.name}: {a['id']}, "
        f"{bob.name}: {b['id']}): give the id"
    ), done.stderr
    filters = r"""
import json, sys, httpx
c = httpx.Client(transport=httpx.HTTPTransport(uds=sys.argv[1]), base_url="http://s")
ids = lambda q: sorted(s["id"] for s in c.get("/v1/sandboxes" + q).json()["sandboxes"])
print(json.dumps([ids("?user=" + sys.argv[2]), ids("?mine=1"), c.get("/v1/status").json()]))
"""
    by_user, mine, status = run_json(teacher, system, filters, str(system.socket), alice.name)
    assert (by_user, mine, status["sandboxes"]) == ([a["id"]], [], 2)
    by_user, mine, status = run_json(bob, system, filters, str(system.socket), alice.name)
    assert (by_user, mine, status["sandboxes"], status["pool"]) == ([], [b["id"]], 1, [])
    # Files travel through the service: a student cannot open the root-owned agent socket.
    transfer = r"""
import json, pathlib, sys
from jupyter_sandbox import Sandbox
sb = Sandbox.connect(sys.argv[1])
pathlib.Path("up.bin").write_bytes(b"x" * 300000)
sb.fs.upload("up.bin", "up.bin")
sb.fs.download("up.bin", "down.bin")
print(json.dumps([pathlib.Path("down.bin").read_bytes() == b"x" * 300000, sb.sh("id -u").stdout]))
"""
    same, sandbox_uid = run_json(alice, system, transfer, a["id"])
    assert same and int(sandbox_uid) != alice.uid  # the sandbox runs as a uid of its own


def test_another_students_sandbox_answers_as_an_unknown_one(
    students: list[OsUser], system: SystemService
) -> None:
    alice, bob = students
    a = run_json(alice, system, CREATE, "alices")
    theirs = run_json(bob, system, PROBE, str(system.socket), a["id"], "{}")
    unknown = run_json(bob, system, PROBE, str(system.socket), unknown_id(), "{}")
    by_name = run_json(bob, system, PROBE, str(system.socket), "alices", "{}")
    assert theirs == unknown == by_name
    for call, (status, body) in theirs.items():
        assert status == 404, call
        assert json.loads(body) == {
            "error": "SandboxNotFound",
            "message": "no sandbox with id or name 'REF'",
        }, call
    client = r"""
import json, sys
from jupyter_sandbox import Sandbox, SandboxNotFound
out = []
for ref in sys.argv[1:]:
    try:
        Sandbox.connect(ref)
        out.append("connected")
    except SandboxNotFound as e:
        out.append(str(e).replace(ref, "REF"))
print(json.dumps(out))
"""
    answers = run_json(bob, system, client, a["id"], "alices", unknown_id())
    assert answers == ["no sandbox with id or name 'REF'"] * 3
    check = r"""
import json, sys
from jupyter_sandbox import Sandbox
sb = Sandbox.connect(sys.argv[1])
names = sorted(f.name for f in sb.fs.list("."))
print(json.dumps([sb.info().status, sb.fs.read_text("mine.txt"), names]))
"""
    assert run_json(alice, system, check, a["id"]) == ["running", "alices", ["mine.txt"]]


def test_the_instructor_acts_on_a_students_sandbox_and_the_student_reads_it(
    students: list[OsUser], teacher: OsUser, system: SystemService
) -> None:
    alice, bob = students
    a = run_json(alice, system, CREATE, "lab")
    b = run_json(bob, system, CREATE, "lab")
    act = r"""
import json, sys
from jupyter_sandbox import Sandbox
sb = Sandbox.connect(sys.argv[1])
sb.extend_timeout("20m")
out = sb.sh("echo helped").stdout
sb.fs.write_text("hint.txt", "try this")
Sandbox.connect(sys.argv[2]).kill()
print(json.dumps([sb.info().expires_at, out]))
"""
    expires_at, out = run_json(teacher, system, act, a["id"], b["id"])
    assert out == "helped\n"
    read = r"""
import json, sys
from jupyter_sandbox import Sandbox
sb = Sandbox.connect(sys.argv[1])
print(json.dumps([[e.source, e.text] for e in sb.logs()] + [sb.fs.read_text("hint.txt")]))
"""
    *entries, hint = run_json(alice, system, read, a["id"])
    deadline = time.strftime("%H:%M UTC", time.gmtime(expires_at))
    assert [text for source, text in entries if source == "audit"] == [
        f"instructor {teacher.name}: extended by 20m (deadline {deadline})",
        f'instructor {teacher.name}: ran "echo helped"',
        f'instructor {teacher.name}: wrote the file "hint.txt"',
    ]
    assert hint == "try this"
    ended = r"""
import sys
from jupyter_sandbox import Sandbox, SandboxExpired
try:
    Sandbox.connect(sys.argv[1])
except SandboxExpired as e:
    print(e)
"""
    done = python_as(bob, system, ended, b["id"])
    assert done.stdout.strip() == f"sandbox '{b['id']}' has ended: killed", done.stderr
    assert run_json(bob, system, LIST) == []


def test_acting_for_names_the_hub_user_only_from_an_instructor(
    students: list[OsUser], teacher: OsUser, system: SystemService
) -> None:
    alice, bob = students
    a = run_json(alice, system, CREATE, "forged")
    header = json.dumps({"X-Sandbox-Acting-For": teacher.name})
    # A student naming the instructor gets nothing of another's: the same 404s.
    forged = run_json(bob, system, PROBE, str(system.socket), a["id"], header)
    assert {status for status, _ in forged.values()} == {404}
    exec_as = r"""
import json, sys, httpx
c = httpx.Client(transport=httpx.HTTPTransport(uds=sys.argv[1]), base_url="http://s", timeout=60)
r = c.post(f"/v1/sandboxes/{sys.argv[2]}/exec", json={"cmd": sys.argv[3]},
           headers={"X-Sandbox-Acting-For": sys.argv[4]})
print(json.dumps(r.status_code))
"""
    own = ["own command", "forged-teacher"]
    assert run_json(alice, system, exec_as, str(system.socket), a["id"], *own) == 200
    via = ["via the dashboard", "hub-admin"]
    assert run_json(teacher, system, exec_as, str(system.socket), a["id"], *via) == 200
    read = r"""
import json, sys
from jupyter_sandbox import Sandbox
print(json.dumps([e.text for e in Sandbox.connect(sys.argv[1]).logs() if e.source == "audit"]))
"""
    assert run_json(alice, system, read, a["id"]) == [
        f'instructor hub-admin (via {teacher.name}): ran "via the dashboard"'
    ]


def test_a_student_with_curl_sees_nothing_of_others(
    students: list[OsUser], system: SystemService
) -> None:
    """Attack: raw HTTP on the socket, guessed ids, and the event stream."""
    alice, bob = students
    events = popen_as(
        bob, system, ["curl", "-sN", "--unix-socket", str(system.socket), "http://s/v1/events"]
    )
    try:
        assert events.stdout is not None
        assert json.loads(events.stdout.readline()) == {"event": "hello"}
        a = run_json(alice, system, CREATE, "secret")
        b = run_json(bob, system, CREATE, "bobs")
        seen = []
        for line in events.stdout:
            event = json.loads(line)
            seen.append(event["sandbox"]["id"])
            if event["sandbox"]["id"] == b["id"]:
                break
        assert a["id"] not in seen and seen[0] == b["id"]
    finally:
        events.kill()
        events.wait()

    def curl(path: str) -> tuple[str, str]:
        done = as_user(
            bob,
            system,
            [
                "curl",
                "-s",
                "-w",
                "\n%{http_code}",
                "--unix-socket",
                str(system.socket),
                f"http://s{path}",
            ],
        )
        body, _, code = done.stdout.rpartition("\n")
        return code, body

    code, body = curl("/v1/sandboxes?all=1")
    listed = json.loads(body)["sandboxes"]  # with the ended ones of earlier tests
    assert code == "200" and b["id"] in [s["id"] for s in listed]
    assert {s["user"] for s in listed} == {bob.name}
    guesses = [a["id"], a["id"][:-1] + "0", "secret", unknown_id()]
    answers = {guess: curl(f"/v1/sandboxes/{guess}") for guess in guesses}
    for guess, (code, body) in answers.items():
        assert code == "404"
        assert json.loads(body)["message"] == f"no sandbox with id or name '{guess}'"


def test_a_student_cannot_read_the_service_or_sandboxes_on_the_host(
    students: list[OsUser], system: SystemService
) -> None:
    """Attack: the system data dir, its database and records, sandbox homes, agent sockets."""
    alice, bob = students
    a = run_json(alice, system, CREATE, "private")
    directory = system.storage / "sandboxes" / a["id"]
    attempts = {
        "list the data dir": ["ls", str(system.data_dir)],
        "read the database": ["cat", str(system.data_dir / "state.sqlite3")],
        "list the storage": ["ls", str(system.storage / "sandboxes")],
        "read the record": ["cat", str(directory / "record.json")],
        "list the home": ["ls", str(directory / "home")],
        "read the file": ["cat", str(directory / "home" / "mine.txt")],
        "read the SSH host key": ["ls", str(system.data_dir / "ssh")],
        "connect to the agent": [
            str(SHARED_VENV / "bin" / "python"),
            "-c",
            "import socket,sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])",
            str(directory / "agent.sock"),
        ],
    }
    for user in (bob, alice):  # the owner, too, reaches their sandbox only through the service
        for what, argv in attempts.items():
            done = as_user(user, system, argv)
            assert done.returncode != 0, f"{user.name} could {what}: {done.stdout}"
            assert "Permission denied" in done.stderr or "PermissionError" in done.stderr, what
    assert oct(system.socket.stat().st_mode & 0o777) == "0o666"
    assert oct(system.runtime_file.stat().st_mode & 0o777) == "0o644"
    runtime = json.loads(system.runtime_file.read_text())
    assert runtime["mode"] == "system" and "token" not in runtime


def test_a_caller_without_a_passwd_entry_is_named_by_uid(system: SystemService) -> None:
    uid = unnamed_id()
    home = Path(tempfile.mkdtemp(prefix="jsb-nopasswd-", dir=storage_parent()))
    os.chown(home, uid, uid)
    code = CREATE + "print(json.dumps([[s.user, s.uid] for s in Sandbox.list()]))\nsb.kill()\n"
    setpriv = ["setpriv", "--reuid", str(uid), "--regid", str(uid), "--clear-groups"]
    try:
        done = subprocess.run(
            [*setpriv, str(SHARED_VENV / "bin" / "python"), "-c", code, "anonymous"],
            env={
                "HOME": str(home),
                "PATH": "/usr/bin:/bin",
                "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
                **system.client_env(),
            },
            cwd=home,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        shutil.rmtree(home, ignore_errors=True)
    assert done.returncode == 0, done.stderr
    created, listed = (json.loads(line) for line in done.stdout.strip().splitlines()[-2:])
    assert (created["user"], created["uid"]) == (str(uid), uid)
    assert listed == [[str(uid), uid]]


def test_the_per_user_service_is_used_where_no_system_service_runs(
    classroom: Classroom, shared_venv: Path
) -> None:
    student = classroom.students[0]
    code = CREATE + "sb.kill()\n"
    try:
        created = run_json(student, None, code, "solo")
        runtime = student.home / ".local/share/jupyter/runtime/jupyter-sandbox.json"
        assert json.loads(runtime.read_text())["mode"] == "user"
        assert (created["user"], created["uid"]) == (student.name, student.uid)
    finally:
        stop_user_services(student)


def test_system_mode_without_a_system_service_says_how_to_start_it(
    classroom: Classroom, shared_venv: Path
) -> None:
    student = classroom.students[1]
    code = (
        "from jupyter_sandbox import Sandbox, ServiceUnavailable\n"
        "try:\n    Sandbox.list()\nexcept ServiceUnavailable as e:\n    print(e)\n"
    )
    done = python_as(student, None, code, JUPYTER_SANDBOX_MODE="system")
    assert done.returncode == 0, done.stderr
    message = done.stdout.strip()
    assert message.startswith("the system sandbox service is not running"), message
    assert "systemctl start jupyter-sandbox" in message
    assert not (student.home / ".local/share/jupyter/runtime/jupyter-sandbox.json").exists()
    assert not user_processes(student.uid), "a client started a service"


def test_serve_system_needs_root_and_the_unix_socket(
    classroom: Classroom, shared_venv: Path, tmp_path: Path
) -> None:
    student = classroom.students[0]
    done = cli_as(student, None, "serve", "--system", JUPYTER_SANDBOX_SYSTEM_RUN=str(tmp_path))
    assert done.returncode == 1
    assert "serve --system runs as root only" in done.stderr
    done = subprocess.run(
        [sys.executable, "-m", "jupyter_sandbox", "serve", "--system", "--tcp", "127.0.0.1:0"],
        env={**os.environ, "JUPYTER_SANDBOX_SYSTEM_RUN": str(tmp_path / "run")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1 and "serve --system cannot listen on TCP" in done.stderr
    assert not (tmp_path / "run").exists()


def test_a_bad_config_file_stops_the_start_with_the_line_and_reason(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('instructors = ["teachers"]\n[quota.default\nsandboxes = 2\n')
    base = Path(tempfile.mkdtemp(prefix="jsb-system-", dir=storage_parent()))
    try:
        done = subprocess.run(
            [sys.executable, "-m", "jupyter_sandbox", "serve", "--system"],
            env={
                **os.environ,
                "JUPYTER_SANDBOX_SYSTEM_RUN": str(base / "run"),
                "JUPYTER_SANDBOX_SYSTEM_DATA": str(base / "data"),
                "JUPYTER_SANDBOX_CONFIG": str(config),
                "JUPYTER_SANDBOX_SSH_PORT": "0",
            },
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert done.returncode != 0
    assert re.search(rf"config file {config} is not valid TOML: .*line 2", done.stderr), done.stderr


def test_instructor_groups_are_read_again_on_sighup(
    students: list[OsUser], system: SystemService, classroom: Classroom
) -> None:
    alice, bob = students
    a = run_json(alice, system, CREATE, "watched")
    saved = system.config.read_text()
    try:
        system.config.write_text(f'instructors = ["{classroom.instructor_group}", "{bob.name}"]\n')
        system.reload()
        wait_for(
            lambda: len(run_json(bob, system, LIST)) == 1, 30, message="bob to be an instructor"
        )
        system.config.write_text("instructors = 3\n")  # refused: the last good one stays
        system.reload()
        wait_for(lambda: "keeping the configuration read before" in system.log, 30)
        assert [s[0] for s in run_json(bob, system, LIST)] == [a["id"]]
    finally:
        system.config.write_text(saved)
        system.reload()
    wait_for(lambda: run_json(bob, system, LIST) == [], 30, message="bob to be a student again")


def test_whose_sandbox_it_is_survives_a_killed_service_and_a_lost_database(
    students: list[OsUser], teacher: OsUser, system: SystemService
) -> None:
    """Fault: SIGKILL the service and delete its database while it is down; the sandbox
    comes back from its own record still its user's, still out of others' reach."""
    alice, bob = students
    a = run_json(alice, system, CREATE, "kept")
    pid = json.loads(system.runtime_file.read_text())["pid"]
    os.kill(system.proc.pid, signal.SIGSTOP)  # the supervisor waits while the database goes
    try:
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not _alive(pid), 20, message="the service to die")
        for suffix in ("", "-wal", "-shm"):
            (system.data_dir / f"state.sqlite3{suffix}").unlink(missing_ok=True)
    finally:
        os.kill(system.proc.pid, signal.SIGCONT)

    def restarted() -> bool:
        try:
            return json.loads(system.runtime_file.read_text())["pid"] != pid
        except (OSError, ValueError):
            return False

    wait_for(restarted, 60, message="the supervisor to start the service again")
    check = r"""
import json, sys
from jupyter_sandbox import Sandbox
sb = Sandbox.connect(sys.argv[1])
print(json.dumps([sb.info().user, sb.info().uid, sb.fs.read_text("mine.txt")]))
"""
    assert run_json(alice, system, check, a["id"]) == [alice.name, alice.uid, "kept"]
    assert run_json(bob, system, LIST) == []
    assert run_json(teacher, system, LIST) == [[a["id"], "kept", alice.name]]
