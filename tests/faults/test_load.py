"""The short form of the load run (bench/load.py --short): no error, nothing left behind.

The run starts a service of its own and checks, after stopping it, that no sandbox
process, mount, cgroup or directory is left; its exit status says whether all went well.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="100 sandboxes at once run as root")


def test_the_short_load_run_has_no_errors_and_leaves_nothing() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTER")}
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "load.py"), "--short"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    print(run.stdout)
    assert run.returncode == 0, f"{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    assert "errors: 0; left after the end: 0" in run.stdout
