"""The real nbgrader grades a course whose cells run in sandboxes (``tests/grading/course``).

The course's one assignment asks for ``squares(n)`` in a ``%%sandbox`` cell, with a visible
test cell and a hidden one. Four students submitted: alice is right; bob hard-codes the
answer to the visible test; dave's answer never returns for the hidden test's input, so
nbgrader's cell timeout interrupts it; mallory answers right but also looks for what
earlier students left, leaves files and processes behind, and gives sandboxes deadlines
of an hour so they outlive her kernel. The course is graded twice with ``nbgrader
autograde`` (the CLI, in a subprocess, with nbgrader's default cell timeout of 30 s:
a shorter one would fail honest cells on a busy machine) in a copy of the course.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest
from nbgrader.api import Gradebook

from jupyter_sandbox import Sandbox, SandboxInfo
from tests.conftest import ROOT, ServiceEnv

pytestmark = pytest.mark.timeout(600)  # two gradings, each waiting out dave's 30 s

COURSE = Path(__file__).resolve().parent / "course"
STUDENTS = ("alice", "bob", "dave", "mallory")
MARK = "mallory-was-here"  # the name mallory's background processes carry
LOOK = "leave anything behind?"  # in the comment of mallory's first cell


@dataclass
class Grading:
    """One ``nbgrader autograde`` run: its grades and the sandboxes its kernels made."""

    grades: dict[str, dict[str, float]]  # student -> grade cell -> score
    sandboxes: list[SandboxInfo]  # every sandbox created during the run, as it is after it
    live_after: set[str]  # ids of sandboxes running when the run returned
    looked: str  # what mallory's first cell printed about her new sandbox
    marked_processes: list[str]  # host processes carrying mallory's mark after the run


def nbgrader(course: Path, *args: str) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    run = subprocess.run(
        [sys.executable, "-m", "nbgrader", *args, f"--db=sqlite:///{course}/gradebook.db"],
        cwd=course,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, f"nbgrader {' '.join(args)} failed:\n{run.stderr[-5000:]}"


def autograde(course: Path) -> Grading:
    before = {s.id for s in Sandbox.list(include_ended=True)}
    nbgrader(course, "autograde", "ps1", "--create", "--force")
    live_after = {s.id for s in Sandbox.list()}
    made = [s for s in Sandbox.list(include_ended=True) if s.id not in before]
    with Gradebook(f"sqlite:///{course}/gradebook.db") as gradebook:
        grades = {
            student: {
                grade.name: grade.score
                for notebook in gradebook.find_submission("ps1", student).notebooks
                for grade in notebook.grades
            }
            for student in STUDENTS
        }
    return Grading(grades, made, live_after, mallory_first_output(course), marked_processes())


def mallory_first_output(course: Path) -> str:
    notebook = nbformat.read(course / "autograded/mallory/ps1/squares.ipynb", as_version=4)
    cell = next(c for c in notebook.cells if LOOK in c.source)
    return "".join(o.get("text", "") for o in cell.outputs)


def marked_processes() -> list[str]:
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if MARK.encode() in cmdline:
            found.append(f"{entry}: {cmdline.replace(bytes(1), b' ').decode()}")
    return found


@pytest.fixture(scope="module")
def gradings(service_env: ServiceEnv, tmp_path_factory: pytest.TempPathFactory) -> list[Grading]:
    course = tmp_path_factory.mktemp("grading") / "course"
    shutil.copytree(COURSE, course)
    nbgrader(course, "generate_assignment", "ps1")
    return [autograde(course), autograde(course)]


def test_grades_are_right(gradings: list[Grading]) -> None:
    assert gradings[0].grades == {
        "alice": {"test_squares": 1.0, "test_squares_hidden": 2.0},
        "bob": {"test_squares": 1.0, "test_squares_hidden": 0.0},  # the hidden test caught him
        "dave": {"test_squares": 1.0, "test_squares_hidden": 0.0},  # timed out
        "mallory": {"test_squares": 1.0, "test_squares_hidden": 2.0},
    }


def test_grading_twice_gives_the_same_grades(gradings: list[Grading]) -> None:
    assert gradings[1].grades == gradings[0].grades


def test_each_student_ran_in_a_fresh_sandbox(gradings: list[Grading], sandbox: Sandbox) -> None:
    notebook = nbformat.read(COURSE / "submitted/mallory/ps1/squares.ipynb", as_version=4)
    look = next(c for c in notebook.cells if LOOK in c.source)
    script = look.source.split("\n", 1)[1]  # the cell without its %%sandbox line
    fresh = seen(sandbox.sh("exec bash -c " + shlex.quote(script)).stdout)  # as %%sandbox does
    assert fresh["home"] == set()  # a new sandbox's home is empty
    # The second run's mallory comes after every student of the first run, herself included.
    for grading in gradings:
        assert seen(grading.looked) == fresh
    for grading in gradings:
        kernels = {s.labels["kernel"] for s in grading.sandboxes}
        assert len(kernels) == len(STUDENTS)  # one kernel per student, each its own sandboxes
        assert len(grading.sandboxes) == len(STUDENTS) + 1  # + mallory's "stash"


def seen(looked: str) -> dict[str, set[str]]:
    """What mallory's look printed: names in the home, in /tmp, and the processes running
    besides the look's own commands (ps sees its pipeline at one stage or another)."""
    found = {}
    for line in looked.splitlines():
        what, _, names = line.partition(":")
        found[what] = set(names.split())
    found["processes"] -= {"bash", "ps", "sort", "tr"}
    return found


def test_no_sandbox_outlives_the_run(gradings: list[Grading]) -> None:
    for grading in gradings:
        assert not grading.live_after & {s.id for s in grading.sandboxes}
        # Each ended by a kill as its kernel shut down, not later by a lapsed lease;
        # mallory's deadlines of an hour included.
        assert {(s.name.split("-")[0], s.end_reason) for s in grading.sandboxes} == {
            ("default", "killed"),
            ("stash", "killed"),
        }
        assert grading.marked_processes == []
