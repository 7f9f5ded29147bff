"""Quotas in system mode, with real OS users running the real client against ``serve
--system``: each user is held to their own quota (user table, most generous group,
default), counts are per user, an instructor extending a student's sandbox is not bound
by the student's lifetime, a student racing creates from several processes gets no
more than the count, and SIGHUP reads the quotas again.
"""

from __future__ import annotations

import grp
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from jupyter_sandbox._config import Settings
from tests.conftest import wait_for
from tests.system.test_system_mode import kill_all, run_json, serving
from tests.system_fixtures import (
    Classroom,
    OsUser,
    SystemService,
    cli_as,
    popen_as,
    root_only,
)

pytestmark = [root_only, pytest.mark.timeout(600)]
GiB = 1 << 30

CREATE = r"""
import json, sys
from jupyter_sandbox import QuotaExceeded, Sandbox
try:
    sb = Sandbox.create(timeout=sys.argv[1])
    print(json.dumps({"id": sb.id}))
except QuotaExceeded as e:
    print(json.dumps({"refused": str(e)}))
"""

EXTEND = r"""
import json, sys
from jupyter_sandbox import QuotaExceeded, Sandbox
try:
    info = Sandbox.connect(sys.argv[1]).extend_timeout(sys.argv[2])
    print(json.dumps({"expires_at": info.expires_at}))
except QuotaExceeded as e:
    print(json.dumps({"refused": str(e)}))
"""

# Waits for the test's go (a file) so that every process creates at the same moment.
RACE = r"""
import os, sys, time
from jupyter_sandbox import QuotaExceeded, Sandbox
while not os.path.exists(sys.argv[1]):
    time.sleep(0.01)
try:
    print(Sandbox.create(timeout="10m").id)
except QuotaExceeded:
    print("refused")
"""


def primary_group(user: OsUser) -> str:
    return grp.getgrgid(user.gid).gr_name


def quota_config(classroom: Classroom, default_sandboxes: int = 1) -> str:
    (alice, _), (teacher,) = classroom.students, classroom.instructors
    return f"""
instructors = ["{classroom.instructor_group}"]

[quota.default]
sandboxes = {default_sandboxes}
memory = "4G"
lifetime = "10m"

[quota.user.{alice.name}]
sandboxes = 2

[quota.group.{primary_group(teacher)}]
sandboxes = 1

[quota.group.{classroom.instructor_group}]
sandboxes = 3
lifetime = "2h"
"""


@pytest.fixture(scope="module")
def system(classroom: Classroom, shared_venv: Path) -> Iterator[SystemService]:
    with serving(config=quota_config(classroom)) as service:
        yield service


@pytest.fixture
def users(classroom: Classroom, system: SystemService) -> Iterator[tuple[OsUser, ...]]:
    """(alice, bob, teacher); every sandbox of the service is killed after the test."""
    yield (*classroom.students, *classroom.instructors)
    kill_all(system)


def usage_of(user: OsUser, system: SystemService) -> dict[str, Any]:
    done = cli_as(user, system, "usage", "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_each_user_has_their_own_quota_from_user_group_and_default_tables(classroom, users, system):
    alice, bob, teacher = users
    assert usage_of(alice, system)["quota"]["sandboxes"] == 2
    assert usage_of(alice, system)["source"]["sandboxes"] == f"the quota set for {alice.name}"
    bob_usage = usage_of(bob, system)
    assert bob_usage == {
        "user": bob.name,
        "uid": bob.uid,
        "instructor": False,
        "mode": "system",
        "quota": {"sandboxes": 1, "memory": 4 * GiB, "cpus": None, "lifetime": 600.0},
        "source": {
            "sandboxes": "the default quota",
            "memory": "the default quota",
            "cpus": None,
            "lifetime": "the default quota",
        },
        "usage": {"sandboxes": 0, "memory": 0, "cpus": 0.0},
    }
    teacher_usage = usage_of(teacher, system)  # the larger of the teacher's two groups
    assert teacher_usage["instructor"] is True
    assert (teacher_usage["quota"]["sandboxes"], teacher_usage["quota"]["lifetime"]) == (3, 7200)
    assert teacher_usage["source"]["sandboxes"] == f'group "{classroom.instructor_group}"'


def test_counts_are_per_user_and_the_message_names_the_quota(users, system):
    alice, bob, _ = users
    made = run_json(bob, system, CREATE, "5m")
    assert "id" in made
    refused = run_json(bob, system, CREATE, "5m")["refused"]
    assert refused == (
        f"quota exceeded: user {bob.name} may have 1 sandbox at once (the default quota), "
        "and has 1. Kill one (jupyter-sandbox kill ID) or ask an administrator to raise "
        f'"sandboxes" in {system.config}.'
    )
    cli = cli_as(bob, system, "create")
    assert cli.returncode == 1 and cli.stderr.startswith("jupyter-sandbox: quota exceeded")
    # Bob's sandbox is not Alice's: she has her own two.
    assert "id" in run_json(alice, system, CREATE, "5m")
    assert "id" in run_json(alice, system, CREATE, "5m")
    assert "refused" in run_json(alice, system, CREATE, "5m")
    defaults = Settings.from_env()
    assert usage_of(alice, system)["usage"] == {
        "sandboxes": 2,
        "memory": 2 * defaults.default_memory,
        "cpus": 2 * defaults.default_cpus,
    }
    assert usage_of(bob, system)["usage"]["sandboxes"] == 1


def test_an_instructor_extending_a_students_sandbox_is_not_bound_by_its_lifetime(users, system):
    _, bob, teacher = users
    assert "at most 10m to live" in run_json(bob, system, CREATE, "11m")["refused"]
    sandbox = run_json(bob, system, CREATE, "5m")["id"]
    refused = run_json(bob, system, EXTEND, sandbox, "20m")["refused"]
    assert "extending this sandbox would end it in 20m" in refused
    extended = run_json(teacher, system, EXTEND, sandbox, "1h")
    assert 3500 < extended["expires_at"] - time.time() <= 3600
    # The instructor's own sandboxes are bound by the instructor's own quota.
    assert "at most 2h to live" in run_json(teacher, system, CREATE, "3h")["refused"]
    own = run_json(teacher, system, CREATE, "1h")["id"]
    assert "refused" in run_json(teacher, system, EXTEND, own, "2h1m")
    assert "expires_at" in run_json(teacher, system, EXTEND, own, "2h")


def test_a_student_racing_creates_from_four_processes_gets_one(users, system):
    _, bob, _ = users
    go = system.base / "go"
    racers = [popen_as(bob, system, ["python", "-c", RACE, str(go)]) for _ in range(4)]
    try:
        go.touch()
        for racer in racers:
            racer.wait(120)
        answers = sorted(racer.stdout.read().strip() for racer in racers)
    finally:
        go.unlink()
    assert answers.count("refused") == 3, answers
    assert usage_of(bob, system)["usage"]["sandboxes"] == 1


def test_sighup_reads_the_quotas_again_and_a_bad_file_keeps_them(classroom, users, system):
    _, bob, _ = users
    saved = system.config.read_text()
    try:
        system.config.write_text(quota_config(classroom, default_sandboxes=2))
        system.reload()
        wait_for(lambda: usage_of(bob, system)["quota"]["sandboxes"] == 2, 30, message="reload")
        system.config.write_text(saved + '\n[quota.user.nobody]\nmemory = "plenty"\n')
        system.reload()
        line = '[quota.user.nobody]: memory = "plenty" is not valid'
        wait_for(lambda: line in system.log, 30, message="the refusal in the log")
        refusals = [entry for entry in system.log.splitlines() if line in entry]
        assert len(refusals) == 1 and "keeping the configuration read before" in refusals[0]
        assert usage_of(bob, system)["quota"]["sandboxes"] == 2
    finally:
        system.config.write_text(saved)
        system.reload()
        wait_for(lambda: usage_of(bob, system)["quota"]["sandboxes"] == 1, 30, message="restore")


def test_an_instructor_sees_a_students_usage_and_a_student_sees_only_their_own(users, system):
    alice, bob, teacher = users
    run_json(bob, system, CREATE, "5m")
    seen = cli_as(teacher, system, "usage", "--user", bob.name, "--json")
    assert seen.returncode == 0, seen.stderr
    assert json.loads(seen.stdout) == usage_of(bob, system)
    assert json.loads(seen.stdout)["usage"]["sandboxes"] == 1
    refused = cli_as(alice, system, "usage", "--user", bob.name)
    assert refused.returncode == 1
    assert "only an instructor may see another user's usage" in refused.stderr
    assert bob.name not in refused.stderr.replace(f"--user {bob.name}", "")
    unknown = cli_as(teacher, system, "usage", "--user", "jsbt-nobody-x")
    assert "no user named 'jsbt-nobody-x' on this machine" in unknown.stderr
