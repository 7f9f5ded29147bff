"""The teacher's audit in a class: a system service, real students and an instructor.

A student's SSH session is logged with the student's own OS user; its recording is
read by the student and an instructor, never by another student (who gets the same
answer as for a sandbox that does not exist); the instructor's replay is a line in
the student's log.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import UNPINNED_SSH
from tests.system_fixtures import (
    Classroom,
    SystemService,
    python_as,
    root_only,
    start_system_service,
)

pytestmark = [root_only, pytest.mark.timeout(600)]

RECORDED_SESSION = r"""
import json, subprocess, sys, time
from jupyter_sandbox import Sandbox
sb = Sandbox.create(timeout="10m", record_terminals=True)
access = sb.expose_ssh()
argv = ["ssh", "-tt", *sys.argv[1:], "-p", str(access.port), access.username + "@127.0.0.1"]
subprocess.run(argv, input=b"echo student-work\nexit\n", capture_output=True, timeout=60)
deadline = time.monotonic() + 30
while not any(" closed after " in e.text for e in sb.logs()) and time.monotonic() < deadline:
    time.sleep(0.1)
print(json.dumps({"id": sb.id, "names": [r.name for r in sb.recordings()],
                  "log": [e.text for e in sb.logs() if e.source == "ssh"]}))
"""

READ_RECORDING = r"""
import json, sys
from jupyter_sandbox.client._async import shared_transport
from jupyter_sandbox.client._sync import portal
sandbox_id, name = sys.argv[1:]
answers = {}
listing = f"/v1/sandboxes/{sandbox_id}/recordings"
for path in (listing, f"{listing}/{name}"):
    async def get():
        client = await shared_transport().client()
        answer = await client.get(path)
        return answer.status_code, answer.content.decode(errors="replace")
    answers[path.rsplit("/", 1)[-1]] = portal().call(get())
print(json.dumps(answers))
"""

LOG_AND_KILL = r"""
import json, sys
from jupyter_sandbox import Sandbox
sb = Sandbox.connect(sys.argv[1])
print(json.dumps([e.text for e in sb.logs()]))
sb.kill()
"""


@pytest.fixture(scope="module")
def system(classroom: Classroom, shared_venv: Path) -> Iterator[SystemService]:
    service = start_system_service([classroom.instructor_group], JUPYTER_SANDBOX_SSH_WORKERS="2")
    try:
        yield service
    finally:
        service.stop()


def test_a_students_recording_is_for_the_student_and_the_instructor(
    classroom: Classroom, system: SystemService
):
    alice, bob = classroom.students[:2]
    teacher = classroom.instructors[0]
    done = python_as(alice, system, RECORDED_SESSION, *UNPINNED_SSH)
    assert done.returncode == 0, done.stderr
    made = json.loads(done.stdout.splitlines()[-1])
    try:
        [name] = made["names"]
        starts = [t for t in made["log"] if t.startswith("SSH session 1 from ")]
        assert f"(local user {alice.name}, uid {alice.uid})" in starts[0], starts

        by_bob = json.loads(python_as(bob, system, READ_RECORDING, made["id"], name).stdout)
        unknown = json.loads(python_as(bob, system, READ_RECORDING, "sb-0000000000", name).stdout)
        for what in ("recordings", name):
            status, body = by_bob[what]
            assert status == 404 and "student-work" not in body
            assert body.replace(made["id"], "X") == unknown[what][1].replace("sb-0000000000", "X")

        by_teacher = json.loads(python_as(teacher, system, READ_RECORDING, made["id"], name).stdout)
        assert by_teacher["recordings"][0] == 200 and name in by_teacher["recordings"][1]
        assert by_teacher[name][0] == 200 and "student-work" in by_teacher[name][1]
        by_alice = json.loads(python_as(alice, system, READ_RECORDING, made["id"], name).stdout)
        assert by_alice[name] == by_teacher[name]
    finally:
        ended = python_as(alice, system, LOG_AND_KILL, made["id"])
    assert ended.returncode == 0, ended.stderr
    log = json.loads(ended.stdout.splitlines()[-1])
    replays = [t for t in log if t.endswith(f"replayed the terminal recording {name}")]
    assert replays == [f"instructor {teacher.name}: replayed the terminal recording {name}"]
