"""The short form of the classroom bench (bench/bench_class.py --short): five students'
kernels run the same cells at the same moment; every cell gives its output, and after
the kernels shut down nothing is left.

The run starts a service of its own and checks, after stopping it, that no sandbox,
sandbox process, mount, cgroup or directory is left; its exit status says whether all
went well.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.unprivileged
def test_the_short_class_run_has_no_failed_cells_and_leaves_nothing() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTER")}
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_class.py"), "--short"],
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    print(run.stdout)
    assert run.returncode == 0, f"{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    assert "5 students, per-user mode" in run.stdout
    assert "failed cells: 0; left after the end: 0" in run.stdout
