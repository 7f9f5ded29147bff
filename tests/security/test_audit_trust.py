"""The service's audit entries of a sandbox cannot be forged, dropped or hidden by it.

SSH sessions, SSH access changes, failures and restarts are noted by the service in
its own file beside the sandbox's record (``service/audit_log.py``); ``logs()`` gives
them with stream "audit" among the sandbox's own entries. Here a real sandbox prints
lines that look exactly like those notes, a replaced (hostile) agent answers the log
request with forged audit entries or with no log at all, the service is SIGKILLed and
the sandbox fails and restarts with its own log deleted: the audit entries are all
still there, and nothing the sandbox sent is marked audit.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from jupyter_sandbox import FileNotFound, LogEntry, Sandbox
from jupyter_sandbox.agent.protocol import Frame
from jupyter_sandbox.service import audit_log
from jupyter_sandbox.service.audit_log import AUDIT_NAME, AuditLog
from tests.conftest import UNPINNED_SSH, ServiceEnv, sandbox_pids, wait_for
from tests.security.test_hostile_agent import Conn, HostileAgent, agent_socket
from tests.system_fixtures import (  # noqa: F401  (fixtures)
    Classroom,
    classroom,
    python_as,
    root_only,
    shared_venv,
    start_system_service,
)

pytestmark = [
    pytest.mark.unprivileged,
    pytest.mark.skipif(shutil.which("ssh") is None, reason="needs ssh: apt install openssh-client"),
]

FORGED_SSH = "SSH session 1 from 127.0.0.1 port 40000 at 2026-01-01 10:00:00 UTC: shell"
FORGED_INSTRUCTOR = "instructor bob: extended by 10m (deadline 15:42 UTC)"


def audit_file(env: ServiceEnv, sb: Sandbox) -> Path:
    return env.storage / "sandboxes" / sb.id / AUDIT_NAME


def audit_texts(sb: Sandbox) -> list[str]:
    return [e.text for e in sb.logs() if e.stream == "audit"]


def ssh_exec(sb: Sandbox, command: str) -> str:
    """Run `command` over a real ssh login; wait until its connection is noted closed."""
    access = sb.expose_ssh()
    argv = ["ssh", *UNPINNED_SSH, "-p", str(access.port), f"{access.username}@127.0.0.1"]
    done = subprocess.run([*argv, command], capture_output=True, timeout=60, text=True)
    assert done.returncode == 0, done.stderr
    wait_for(
        lambda: any(" closed after " in t for t in audit_texts(sb)),
        message="the SSH connection to be noted as closed",
    )
    return done.stdout


def test_lines_a_sandbox_prints_are_its_output_never_audit(sandbox: Sandbox):
    job = sandbox.spawn(f"echo '{FORGED_SSH}'; echo '{FORGED_INSTRUCTOR}' >&2")
    job.wait(timeout=30)
    printed = [e for e in sandbox.logs() if e.text.rstrip("\n") in (FORGED_SSH, FORGED_INSTRUCTOR)]
    assert [(e.stream, e.source, e.text) for e in printed] == [
        ("stdout", f"proc:{job.pid}", FORGED_SSH + "\n"),
        ("stderr", f"proc:{job.pid}", FORGED_INSTRUCTOR + "\n"),
    ]
    assert audit_texts(sandbox) == []


def test_ssh_sessions_are_audit_entries_in_time_order(sandbox: Sandbox):
    sandbox.spawn("echo before").wait(timeout=30)
    assert ssh_exec(sandbox, f"echo '{FORGED_SSH}'") == FORGED_SSH + "\n"
    sandbox.spawn("echo after").wait(timeout=30)
    entries = list(sandbox.logs())
    audit = [e for e in entries if e.stream == "audit"]
    assert {e.source for e in audit} == {"ssh"}
    assert any(t.text.startswith("SSH connection from 127.0.0.1") for t in audit)
    assert any(f"exec \"echo '{FORGED_SSH}'\"" in e.text for e in audit)
    assert FORGED_SSH not in [e.text for e in audit]  # what it printed went to the client
    times = [e.time for e in entries]
    assert times == sorted(times)
    texts = [e.text for e in entries if e.stream != "event"]
    assert texts.index("before\n") < texts.index(audit[0].text)
    assert texts.index(audit[-1].text) < texts.index("after\n")
    assert [e.text for e in sandbox.logs(tail=1)] == ["exited with code 0"]


def test_following_the_log_streams_new_audit_entries(sandbox: Sandbox):
    access = sandbox.expose_ssh()
    follower = sandbox.logs(follow=True)
    sandbox.spawn("echo started")
    seen: list[LogEntry] = []
    for entry in follower:
        seen.append(entry)
        if entry.text == "started\n":
            sandbox.revoke_ssh(access)
        if entry.stream == "audit":
            break
    follower.close()
    assert (seen[-1].source, seen[-1].text) == ("ssh", "SSH access revoked (1 credential(s))")


def hostile_logs(*entries: dict):
    """A `logs` answer of a hostile agent: `entries`, then the end of its log."""

    def answer(conn: Conn, request: dict) -> None:
        for entry in entries:
            conn.send_json(Frame.RESULT, entry)
        conn.send(Frame.END)

    return answer


def entry(seq: int, stream: str, source: str, text: str) -> dict:
    return {"seq": seq, "time": 1.0 + seq, "source": source, "stream": stream, "text": text}


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param([], id="its log deleted"),
        pytest.param(
            [entry(1, "stdout", "proc:7", "ok\n"), entry(2, "audit", "ssh", FORGED_SSH)],
            id="claims the audit stream",
        ),
        pytest.param(
            [entry(1, "event", "ssh", FORGED_SSH), entry(2, "event", "audit", FORGED_INSTRUCTOR)],
            id="events named like the service's",
        ),
    ],
)
def test_a_hostile_agent_neither_forges_nor_hides_audit_entries(
    service_env: ServiceEnv, answer: list[dict]
):
    with Sandbox.create(timeout="5m") as sb:
        ssh_exec(sb, "true")
        real = audit_texts(sb)
        agent = HostileAgent(agent_socket(sb), pipes=True)
        try:
            agent.on("logs", hostile_logs(*answer))
            entries = list(sb.logs())
            assert [e.text for e in entries if e.stream == "audit"] == real
            sent = [e for e in entries if e.stream != "audit"]
            assert [e.text for e in sent] == [e["text"] for e in answer if e["stream"] != "audit"]
            assert {e.stream for e in sent} <= {"stdout", "event"}
        finally:
            agent.close()


def test_audit_entries_survive_a_service_sigkill_a_failure_and_a_restart(
    service_env: ServiceEnv,
):
    with Sandbox.create(timeout="5m") as sb:
        ssh_exec(sb, "echo over ssh")
        noted = audit_texts(sb)
        path = audit_file(service_env, sb)
        assert oct(os.stat(path).st_mode & 0o777) == "0o600"
        service_env.stop_service(signal.SIGKILL)
        assert audit_texts(Sandbox.connect(sb.id)) == noted  # a new service, the same lines
        os.kill(sandbox_pids(service_env.storage, sb.id)["agent"], signal.SIGKILL)
        wait_for(lambda: sb.info().status == "failed", 15, message="the sandbox to fail")
        failed = audit_texts(sb)
        assert failed[: len(noted)] == noted
        assert failed[len(noted)].startswith("sandbox failed: ")
        state = service_env.storage / "sandboxes" / sb.id / "state"
        for log in state.glob("log.jsonl*"):  # the sandbox's own log, gone
            log.unlink()
        sb.restart()
        assert sb.sh("echo back").stdout == "back\n"
        assert audit_texts(sb) == [*failed, "sandbox restarted"]
        assert [e for e in sb.logs() if e.stream != "audit"] == []
    assert not path.exists()  # it went with the sandbox


def test_the_audit_file_is_out_of_the_sandboxs_reach(service_env: ServiceEnv, sandbox: Sandbox):
    ssh_exec(sandbox, "true")
    path = audit_file(service_env, sandbox)
    before = path.read_bytes()
    search = f"find / \\( -path /proc -o -path /sys \\) -prune -o -name '{AUDIT_NAME}*' -print"
    assert sandbox.sh(f"{search} 2>/dev/null", check=False).stdout == ""
    probe = sandbox.sh(f"cat {path} /proc/*/root{path} 2>&1", check=False)
    assert probe.exit_code != 0 and "SSH" not in probe.stdout
    for where in (str(path), f"/proc/1/root{path}", f"/proc/self/root{path}"):
        with pytest.raises(FileNotFound):  # the agent, asked directly, sees none either
            sandbox.fs.read_bytes(where)
    plant = f"mkdir -p {path.parent} && ln -sf /etc/passwd {path} && echo '{{}}' > {path}.1"
    assert sandbox.sh(f"{plant} && echo planted").stdout == "planted\n"  # in its own view only
    sandbox.revoke_ssh()
    assert not path.is_symlink() and not path.with_name(AUDIT_NAME + ".1").exists()
    assert path.read_bytes().startswith(before)
    assert audit_texts(sandbox)[-1] == "SSH access revoked (1 credential(s))"


def test_the_audit_file_is_bounded_and_says_what_it_dropped(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(audit_log, "AUDIT_LIMIT", 4096)
    log = AuditLog(tmp_path)
    for n in range(1, 201):
        log.note("ssh", f"line {n}")
    sizes = [p.stat().st_size for p in tmp_path.iterdir()]
    assert sorted(p.name for p in tmp_path.iterdir()) == [AUDIT_NAME, AUDIT_NAME + ".1"]
    assert all(size <= 4096 for size in sizes)
    entries = AuditLog(tmp_path).entries()  # as a restarted service reads it
    first_kept = int(entries[1]["text"].split()[1])
    assert entries[0]["text"].startswith(f"{first_kept - 1} earlier audit line(s) dropped")
    assert [e["text"] for e in entries[1:]] == [f"line {n}" for n in range(first_kept, 201)]
    again = AuditLog(tmp_path)
    again.note("ssh", "after a restart")
    assert again.entries()[-1]["seq"] == 201


STUDENT_SANDBOX = r"""
from jupyter_sandbox import Sandbox
print(Sandbox.create(timeout="10m").id)
"""

INSTRUCTOR_RUNS = r"""
import sys
from jupyter_sandbox import Sandbox
print(Sandbox.connect(sys.argv[1]).sh(sys.argv[2]).stdout, end="")
"""

READ_AUDIT = r"""
import json, sys
from jupyter_sandbox import Sandbox
sb = Sandbox.connect(sys.argv[1])
print(json.dumps([sb.info().status, [e.text for e in sb.logs() if e.stream == "audit"]]))
"""


@root_only
@pytest.mark.timeout(600)
def test_an_instructors_action_survives_a_service_sigkill_a_failure_and_a_restart(
    classroom: Classroom,  # noqa: F811  (the fixture imported above)
    shared_venv: Path,  # noqa: F811
):
    """In system mode, an instructor runs a command in a student's sandbox: the student
    reads the line as an audit entry, after a SIGKILL of the service, and after the
    sandbox failed and its student restarted it."""
    system = start_system_service([classroom.instructor_group])
    student, teacher = classroom.students[0], classroom.instructors[0]

    def as_student(code: str, *args: str) -> str:
        done = python_as(student, system, code, *args)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip().splitlines()[-1]

    def audit() -> tuple[str, list[str]]:
        return tuple(json.loads(as_student(READ_AUDIT, sandbox_id)))

    try:
        sandbox_id = as_student(STUDENT_SANDBOX)
        ran = python_as(teacher, system, INSTRUCTOR_RUNS, sandbox_id, "echo helped")
        assert ran.stdout == "helped\n", ran.stderr
        noted = [f'instructor {teacher.name}: ran "echo helped"']
        assert audit() == ("running", noted)
        pid = json.loads(system.runtime_file.read_text())["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_for(
            lambda: json.loads(system.runtime_file.read_text() or "{}").get("pid") != pid,
            60,
            message="the supervisor to start the service again",
        )
        assert audit() == ("running", noted)
        os.kill(sandbox_pids(system.storage, sandbox_id)["agent"], signal.SIGKILL)
        wait_for(lambda: audit()[0] == "failed", 30, message="the sandbox to fail")
        failed = audit()[1]
        assert failed[0] == noted[0] and failed[1].startswith("sandbox failed: ")
        as_student(
            "import sys\nfrom jupyter_sandbox import Sandbox\n"
            "Sandbox.connect(sys.argv[1]).restart()\nprint('ok')",
            sandbox_id,
        )
        assert audit() == ("running", [*failed, "sandbox restarted"])
        as_student(
            "import sys\nfrom jupyter_sandbox import Sandbox\n"
            "Sandbox.connect(sys.argv[1]).kill()\nprint('ok')",
            sandbox_id,
        )
    finally:
        system.stop()
