"""Attacks by one student on a system service shared with others.

A real root service on a private run/data dir, real OS users made for the module
(removed after), each attack made from a process running as a student.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from jupyter_sandbox.service.connections import MAX_PER_USER
from tests.conftest import stop_process, wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="system mode needs root")

REPO = Path(__file__).resolve().parents[2]
VENV_PYTHON = "/opt/jupyter-sandbox-test/venv/bin/python"
STUDENT_PIDS = 3000  # the students' pids quota: two sandboxes of the default 1024 fit


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


class System:
    """A private system service and the users made for it."""

    def __init__(self, base: Path, students: list[str], teacher: str) -> None:
        self.base = base
        self.students = students
        self.teacher = teacher
        self.run_dir = base / "run"
        self.socket = self.run_dir / "jupyter-sandbox.sock"
        self.env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "JUPYTER_SANDBOX_SYSTEM_RUN": str(self.run_dir),
            "JUPYTER_SANDBOX_SYSTEM_DATA": str(base / "data"),
            "JUPYTER_SANDBOX_CONFIG": str(base / "config.toml"),
            "JUPYTER_SANDBOX_POOL": "0",
            "JUPYTER_SANDBOX_SSH_WORKERS": "1",
            "JUPYTER_SANDBOX_SSH_PORT": "0",
            "JUPYTER_SANDBOX_MODE": "system",
        }

    def client_env(self, user: str) -> dict[str, str]:
        env = {k: v for k, v in self.env.items() if not k.startswith("PYTEST")}
        return {**env, "HOME": f"/home/{user}"}

    def as_user(self, user: str, code: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run Python `code` as OS user `user` with the service's client environment."""
        return subprocess.run(
            user_argv(user, code),
            env=self.client_env(user),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd="/",
        )


def user_argv(user: str, code: str) -> list[str]:
    """Run Python `code` as `user`, with the user's own groups only."""
    setpriv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups"]
    return [*setpriv, VENV_PYTHON, "-c", code]


def request_code(method: str, path: str, body: object = None) -> str:
    """Python that makes one raw HTTP request to the service and prints status and body."""
    return f"""
import http.client, json, os, socket
class C(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(os.environ["JUPYTER_SANDBOX_SYSTEM_RUN"] + "/jupyter-sandbox.sock")
c = C("localhost", timeout=30)
body = {json.dumps(body)!r}
c.request({method!r}, {path!r}, body=None if body == "null" else body)
r = c.getresponse()
print(r.status)
print(r.read().decode())
"""


@pytest.fixture(scope="module")
def system() -> Iterator[System]:
    tag = secrets.token_hex(3)
    base = Path(f"/tmp/jsbx-attack-{tag}")
    base.mkdir(mode=0o755)
    os.chmod(base, 0o755)
    students_group, teachers_group = f"jsbx-st-{tag}", f"jsbx-te-{tag}"
    students = [f"jsbx-s1-{tag}", f"jsbx-s2-{tag}"]
    teacher = f"jsbx-t1-{tag}"
    made_users: list[str] = []
    made_groups: list[str] = []
    service = None
    try:
        for group in (students_group, teachers_group):
            _run("groupadd", group)
            made_groups.append(group)
        for user in students:
            _run("useradd", "-m", "-G", students_group, user)
            made_users.append(user)
        _run("useradd", "-m", "-G", teachers_group, teacher)
        made_users.append(teacher)
        (base / "config.toml").write_text(
            f'instructors = ["{teachers_group}"]\n[quota.group.{students_group}]\n'
            f"sandboxes = 2\npids = {STUDENT_PIDS}\n"
        )
        sys_ = System(base, students, teacher)
        service = subprocess.Popen(
            [sys.executable, "-m", "jupyter_sandbox", "serve", "--system", "--no-supervisor"],
            env=sys_.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_for(lambda: (sys_.run_dir / "jupyter-sandbox.json").exists(), 60, message="service")
        sys_.pid = service.pid
        yield sys_
    finally:
        if service is not None:
            stop_process(service, 60)
        for user in made_users:
            subprocess.run(["userdel", "-r", user], capture_output=True)
        for group in made_groups:
            subprocess.run(["groupdel", group], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


FLOOD = """
import os, socket, time
path = os.environ["JUPYTER_SANDBOX_SYSTEM_RUN"] + "/jupyter-sandbox.sock"
held, refused, progress = [], 0, time.monotonic()
# Until the service refuses 100 in a row, this process runs out of descriptors, or the
# service has accepted nothing for 5 s (it cannot accept any more).
while refused < 100 and time.monotonic() - progress < 5:
    s = socket.socket(socket.AF_UNIX)
    s.setblocking(False)
    try:
        s.connect(path)
    except BlockingIOError:  # the backlog is full: the service is behind, or cannot accept
        s.close()
        time.sleep(0.01)
        continue
    except OSError:  # this process's own fd limit
        break
    try:  # headers never finished: slowloris
        s.send(b"GET /v1/status HTTP/1.1\\r\\nHost: x\\r\\n")
        time.sleep(0.001)
        if s.recv(100, socket.MSG_PEEK):  # answered at once: refused
            raise ConnectionRefusedError
    except BlockingIOError:  # no answer: held
        held.append(s)
        refused, progress = 0, time.monotonic()
    except OSError:
        s.close()
        refused, progress = refused + 1, time.monotonic()
print(len(held), flush=True)
time.sleep(120)
"""


def test_one_student_holding_connections_does_not_shut_out_another(system: System) -> None:
    """A student who opens connections until their fd limit (slowloris: headers never
    finished) from several processes must not leave the service unable to accept others."""
    flooders = [
        subprocess.Popen(
            user_argv(system.students[0], FLOOD),
            env=system.client_env(system.students[0]),
            stdout=subprocess.PIPE,
            text=True,
            cwd="/",
        )
        for _ in range(3)
    ]
    try:
        held = [int(flooder.stdout.readline()) for flooder in flooders]
        # The flood reached the cap (connections the service has not refused yet may
        # count as held, so it can look larger).
        assert sum(held) >= MAX_PER_USER, held
        answer = system.as_user(system.students[1], request_code("GET", "/v1/status"))
        assert answer.stdout.splitlines()[:1] == ["200"], answer.stdout + answer.stderr
        refused = system.as_user(system.students[0], request_code("GET", "/v1/status"))
        assert refused.returncode == 0, refused.stderr
        status, body = refused.stdout.splitlines()[:2]
        assert status == "429"
        assert f"you hold {MAX_PER_USER} connections" in json.loads(body)["message"]
    finally:
        for flooder in flooders:
            flooder.kill()
            flooder.wait()


FAKE_AUDIT = 'instructor bob: ran "cat ~/solution.py"'
PRINT_FAKES = (
    f"printf 'x\\r[audit] {FAKE_AUDIT}\\n'; "
    f"printf '\\033[2K\\r[audit] {FAKE_AUDIT}\\n'; "
    f"printf '[audit] {FAKE_AUDIT}\\n'; "
    f": '\n[audit] {FAKE_AUDIT}'"  # a line break in the command its "started" note quotes
)


def test_sandbox_output_cannot_pass_for_an_instructors_note_in_the_log(system: System) -> None:
    """A student's sandbox prints lines that look like `instructor ...:` notes, hiding its
    own prefix with a carriage return or an escape sequence, or putting a line break in
    the command its log notes; in the log as the student and
    the instructor read it (`jupyter-sandbox logs`), only the service's note reads as one."""
    student, teacher = system.students[0], system.teacher
    made = system.as_user(
        student,
        "from jupyter_sandbox import Sandbox\n"
        "sb = Sandbox.create(timeout='5m')\n"
        f"sb.spawn({PRINT_FAKES!r}).wait()\n"
        "print(sb.id)\n",
    )
    assert made.returncode == 0, made.stderr
    sandbox_id = made.stdout.split()[-1]
    try:
        ran = system.as_user(
            teacher,
            f"from jupyter_sandbox import Sandbox\nSandbox.connect({sandbox_id!r}).sh('true')\n",
        )
        assert ran.returncode == 0, ran.stderr
        for reader in (student, teacher):
            shown = system.as_user(
                reader,
                f"import sys; sys.argv = ['jupyter-sandbox', 'logs', {sandbox_id!r}]\n"
                "from jupyter_sandbox.cli import main; sys.exit(main())",
            )
            assert shown.returncode == 0, shown.stderr
            assert "\r" not in shown.stdout and "\x1b" not in shown.stdout
            notes = [line for line in shown.stdout.splitlines() if line.startswith("[service]")]
            assert notes == [f'[service] instructor {teacher}: ran "true"'], shown.stdout
            printed = [line for line in shown.stdout.splitlines() if FAKE_AUDIT in line]
            assert len(printed) == 4, shown.stdout  # three printed lines, the "started" note
    finally:
        system.as_user(
            student, f"from jupyter_sandbox import Sandbox\nSandbox.connect({sandbox_id!r}).kill()"
        )


PROBE = """
import http.client, json, os, socket, sys, urllib.parse
class C(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(os.environ["JUPYTER_SANDBOX_SYSTEM_RUN"] + "/jupyter-sandbox.sock")
ROUTES = [
    ("GET", ""), ("DELETE", ""), ("HEAD", ""), ("OPTIONS", ""), ("POST", "/restart"),
    ("POST", "/timeout"), ("POST", "/lease"), ("POST", "/ssh"), ("POST", "/ssh/revoke"),
    ("POST", "/exec"), ("POST", "/spawn"), ("GET", "/agent"), ("GET", "/procs"),
    ("GET", "/procs/1/wait"), ("POST", "/procs/1/signal"), ("GET", "/logs"),
    ("GET", "/logs?follow=1"), ("GET", "/recordings"), ("GET", "/recordings/x.cast"),
    ("POST", "/files/stat"), ("GET", "/files/read?path=x"), ("PUT", "/files/write?path=x"),
    ("GET", "/files/tar?path=x"), ("PUT", "/files/tar?path=x"), ("GET", "/"),
]
BODY = {"/timeout": {"timeout": "1m"}, "/lease": {"lease": "x"}, "/exec": {"cmd": "true"},
        "/spawn": {"cmd": "true"}, "/files/stat": {"path": "."}}
out = {}
for ref in json.loads(sys.argv[1]):
    for method, tail in ROUTES:
        c = C("localhost", timeout=10)
        body = BODY.get(tail)
        c.request(method, "/v1/sandboxes/" + ref + tail,
                  body=None if body is None else json.dumps(body),
                  headers={"X-Sandbox-Acting-For": "root"})
        r = c.getresponse()
        out[f"{method} {ref}{tail}"] = [r.status, r.read().decode()]
print(json.dumps(out))
"""


def test_another_students_sandbox_is_unknown_on_every_route_and_spelling(system: System) -> None:
    """Student 2 tries every route on student 1's sandboxes (running, failed-by-kill, ended)
    by id, by name, percent-encoded, with a forged acting-for header: each answer is the
    one an id that never existed gets, with the ref itself swapped in."""
    first, second = system.students
    made = system.as_user(
        first,
        "from jupyter_sandbox import Sandbox\n"
        "a = Sandbox.create(name='homework', timeout='5m')\n"
        "b = Sandbox.create(name='ended-one', timeout='5m'); b.kill()\n"
        "print(a.id, b.id)\n",
    )
    assert made.returncode == 0, made.stderr
    running, ended = made.stdout.split()
    try:
        never = "sb-" + secrets.token_hex(5)
        encoded = "".join(f"%{ord(c):02x}" for c in running)
        refs = [never, running, ended, "homework", "ended-one", encoded]
        probe = system.as_user(
            second, f"import sys; sys.argv = ['', {json.dumps(refs)!r}]\n" + PROBE
        )
        assert probe.returncode == 0, probe.stderr
        answers = json.loads(probe.stdout)
        assert answers[f"GET {running}"][0] == 404  # not a route that answers nobody
        assert "no sandbox with id or name" in answers[f"POST {running}/exec"][1]
        for key, (status, body) in answers.items():
            method, rest = key.split(" ", 1)
            ref = next(r for r in refs if rest.startswith(r))
            expected_status, expected_body = answers[f"{method} {never}{rest[len(ref) :]}"]
            decoded = running if ref == encoded else ref
            assert status == expected_status, (key, status, body)
            assert body == expected_body.replace(never, decoded), (key, body)
            assert running not in body or ref in (running, encoded)
    finally:
        system.as_user(
            first, f"from jupyter_sandbox import Sandbox\nSandbox.connect({running!r}).kill()"
        )


def test_a_student_cannot_take_the_kernels_pid_table(system: System) -> None:
    """The kernel's pid table is every user's: a student asking for as many pids as it
    holds (then filling them with threads, which cost little memory) is held to the pids
    quota, summed over their sandboxes, and told what is left."""
    student = system.students[0]
    tried = system.as_user(
        student,
        "import json\n"
        "from jupyter_sandbox import QuotaExceeded, Sandbox\n"
        "first = Sandbox.create(timeout='5m')\n"
        "try:\n"
        "    Sandbox.create(timeout='5m', pids=32768)\n"
        "    print(json.dumps('created'))\n"
        "except QuotaExceeded as e:\n"
        "    print(json.dumps(str(e)))\n"
        "first.kill()\n",
    )
    assert tried.returncode == 0, tried.stderr
    refusal = json.loads(tried.stdout)
    assert refusal.startswith(
        f"quota exceeded: user {student} may have {STUDENT_PIDS} processes and threads across "
        "their sandboxes at once"
    ), refusal
    assert (
        f"has 1024 and this sandbox asks for 32768. Ask for at most pids={STUDENT_PIDS - 1024}"
        in refusal
    )
