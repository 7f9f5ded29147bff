"""The short form of the classroom bench (bench/bench_class.py --short): five students'
kernels run the same cells at the same moment; every cell gives its output, and after
the kernels shut down nothing is left.

The run starts a service of its own and checks, after stopping it, that no sandbox,
sandbox process, mount, cgroup or directory is left; its exit status says whether all
went well. In system mode it also makes the students' OS users, and removes them.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.system_fixtures import root_only, shared_venv  # noqa: F401 (fixture)


def run_short(*args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTER")}
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_class.py"), "--short", *args],
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    print(run.stdout)
    assert run.returncode == 0, f"{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    assert "failed cells: 0; left after the end: 0" in run.stdout
    return run.stdout


@pytest.mark.unprivileged
def test_the_short_class_run_has_no_failed_cells_and_leaves_nothing() -> None:
    assert "5 students, per-user mode" in run_short()


@root_only
@pytest.mark.usefixtures("shared_venv")
def test_the_short_class_run_in_system_mode_has_no_failed_cells_and_leaves_nothing() -> None:
    """Left over would also be any of the students' OS users the run made."""
    assert "5 students, system mode (one service as root, 5 OS users" in run_short("--system")
