"""Limits every sandbox gets without asking: attacks on the host's memory, CPU and files.

A sandbox that nobody gave limits must still not be able to take the host's RAM
(through its processes or through tmpfs, which lives in RAM), its CPUs, its
process table or its file table; absurd limits are refused with a message.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jupyter_sandbox import InvalidRequest, Sandbox
from jupyter_sandbox._config import Settings, host_cpus, host_memory
from jupyter_sandbox.backends import homes
from jupyter_sandbox.backends.cgroups import USER, Controller
from tests.conftest import wait_for

pytestmark = pytest.mark.unprivileged

SCRATCH = ("/tmp", "/var/tmp", "/dev/shm", "/run")


def tmpfs_bytes(sandbox: Sandbox) -> dict[str, int]:
    lines = sandbox.sh(f"df -B1 --output=target,size {' '.join(SCRATCH)}").stdout.splitlines()
    return {target: int(size) for target, size in (line.split() for line in lines[1:])}


def cgroup_value(sandbox: Sandbox, v1: tuple[str, str], v2: str) -> str | None:
    """A limit as the kernel holds it for user code's cgroup; None without cgroups."""
    controller = Controller()
    if controller.unavailable:
        return None
    if controller.version == 2:
        return (controller.bases["unified"] / sandbox.id / v2).read_text().split()[0]
    return (controller.bases[v1[0]] / sandbox.id / USER / v1[1]).read_text().strip()


def test_a_default_sandbox_is_limited(sandbox):
    """Nobody asked for limits: memory, CPUs, processes, open files and every writable
    tmpfs are bounded anyway, and info() shows the numbers."""
    defaults = Settings.from_env()
    info = sandbox.info()
    assert info.limits["memory"] == defaults.default_memory <= host_memory() // 4
    assert info.limits["cpus"] == defaults.default_cpus <= host_cpus()
    assert info.limits["pids"] == defaults.default_pids
    assert info.limits["fds"] == defaults.default_fds
    assert sandbox.sh("ulimit -n; ulimit -Hn").stdout.split() == [str(defaults.default_fds)] * 2
    sizes = tmpfs_bytes(sandbox)
    assert sizes == info.limits["tmpfs"]
    assert sum(sizes.values()) < info.limits["memory"] * 0.7  # room for the processes
    memory = cgroup_value(sandbox, ("memory", "memory.limit_in_bytes"), "memory.max")
    note = info.limits_note or ""
    if memory is None:
        assert "NOT enforced" in note and "open files and tmpfs sizes are enforced" in note
    else:
        assert int(memory) == defaults.default_memory
        quota = cgroup_value(sandbox, ("cpu", "cpu.cfs_quota_us"), "cpu.max")
        assert int(quota) == int(defaults.default_cpus * 100_000)
        pids = cgroup_value(sandbox, ("pids", "pids.max"), "pids.max")
        assert int(pids) == defaults.default_pids
    assert info.limits["disk"] == defaults.default_disk
    home = int(sandbox.sh("df -B1 --output=size ~").stdout.split()[1])
    if homes.unavailable(privileged=os.geteuid() == 0):
        assert "the home has no disk quota" in note
    else:
        assert 0.9 * defaults.default_disk < home <= defaults.default_disk


def test_nothing_else_bwrap_built_is_writable(sandbox):
    """bwrap's own root, /usr's overlay and /dev are tmpfs with no size: writing there
    would fill host RAM past every tmpfs limit, so they are read-only."""
    result = sandbox.sh("for d in / /usr /dev /etc /var; do touch $d/fill-$$; done", check=False)
    assert result.stderr.count("Read-only file system") == 5


def test_filling_every_tmpfs_fails_cleanly_under_a_small_memory_limit(service_env):
    """Under memory=200M, fill /dev/shm, then /tmp, /var/tmp and /run (RAM the sandbox's
    cgroup pays for): each write ends in ENOSPC, the agent is not OOM-killed, the
    sandbox answers and the home is intact."""
    with Sandbox.create(memory="200M") as sb:
        sb.fs.write_text("precious.txt", "keep me\n")
        assert sum(tmpfs_bytes(sb).values()) < 200 * 2**20 * 0.7
        for path in ("/dev/shm", "/tmp", "/var/tmp", "/run"):
            fill = sb.sh(f"head -c 300M /dev/zero > {path}/fill", check=False, timeout=60)
            assert fill.exit_code != 0 and "No space left on device" in fill.stderr, path
        assert sb.sh("true").exit_code == 0
        assert sb.sh("echo alive").stdout == "alive\n"
        assert sb.fs.read_text("precious.txt") == "keep me\n"
        assert sb.info().status == "running"


def test_overrides_apply(service_env):
    """Per-sandbox limits replace the defaults, tmpfs sizes follow the memory limit."""
    with Sandbox.create(memory="256M", cpus=0.5, pids=100, fds=256) as sb:
        info = sb.info()
        assert (info.limits["memory"], info.limits["cpus"]) == (256 * 2**20, 0.5)
        assert (info.limits["pids"], info.limits["fds"]) == (100, 256)
        assert sb.sh("ulimit -n").stdout == "256\n"
        assert tmpfs_bytes(sb)["/tmp"] == 96 * 2**20


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"memory": "100T"}, "RAM"),
        ({"memory": "16M"}, "at least 64M"),
        ({"memory": "-1G"}, "invalid size"),
        ({"cpus": host_cpus() + 1}, "CPUs"),
        ({"cpus": 0}, "CPUs"),
        ({"cpus": -2}, "CPUs"),
        ({"pids": 0}, "whole number from 8"),
        ({"fds": 10}, "whole number from 64"),
        ({"fds": 1 << 40}, "open files a process of this service may have"),
        ({"pids": 1 << 40}, "processes and threads this host's kernel can hold"),
        ({"disk": "8M"}, "at least 16M"),
        ({"disk": "100T"}, "at most"),
    ],
)
def test_absurd_limits_are_refused(service_env, options, message):
    """Limits the host cannot honour (more RAM or CPUs than it has) or that leave nothing
    to run on are refused before any sandbox starts, saying what is accepted."""
    with pytest.raises(InvalidRequest, match=message):
        Sandbox.create(**options)


def test_limits_note_is_honest_where_cgroups_are_missing(tmp_path: Path):
    """Without cgroups and without root (an ordinary user on cgroup v1), the note must
    not pretend: memory, CPU and process limits are NOT enforced, open files and tmpfs
    sizes are, and the home has no quota."""
    from jupyter_sandbox.backends.cgroups import Limits
    from jupyter_sandbox.backends.local import LocalBackend

    backend = LocalBackend(tmp_path)
    if not backend.cgroups.unavailable:  # root here: what an ordinary user's service finds
        backend.cgroups.unavailable = "cgroup v1 hierarchies are writable only by root"
        backend.home_quota_unavailable = homes.unavailable(privileged=False)
    note = backend.limits_note(Limits(memory=1 << 30, cpus=1.0, pids=64, fds=512), None, 0)
    assert note.startswith("limits NOT enforced (memory, cpus, pids)")
    assert "open files and tmpfs sizes are enforced" in note
    assert "the home has no disk quota" in note and "root" in note
    assert "the agent shares these limits with user code" in note


def test_limits_note_says_the_agent_shares_cgroup_v2_limits(tmp_path: Path):
    """On cgroup v2 a process's threads cannot be in different memory groups, so user
    code that fills the limits can stop the agent too: the note must say so."""
    from jupyter_sandbox.backends.cgroups import Group, Limits
    from jupyter_sandbox.backends.local import LocalBackend

    backend = LocalBackend(tmp_path)
    limits = Limits(memory=1 << 30, cpus=1.0, pids=64)
    v2 = backend.limits_note(limits, Group(2, {"unified": str(tmp_path)}), 1 << 30)
    assert v2 is not None and "the agent shares these limits with user code" in v2
    v1 = backend.limits_note(limits, Group(1, {"memory": str(tmp_path)}), 1 << 30)
    assert v1 is None or "agent shares" not in v1


@pytest.mark.skipif(homes.unavailable(os.geteuid() == 0) is not None, reason="needs root")
def test_a_full_home_stops_at_its_quota(service_env):
    """Filling the home (persistent, on the host's disk) under a 64M quota: the write
    fails with ENOSPC at the quota, the sandbox answers, its files are intact, and the
    home's filesystem is gone from the host's mounts once the sandbox ends."""
    with Sandbox.create(disk="64M") as sb:
        sb.fs.write_text("precious.txt", "keep me\n")
        fill = sb.sh("head -c 100M /dev/zero > ~/fill", check=False, timeout=60)
        assert "No space left on device" in fill.stderr
        size = int(sb.sh("df -B1 --output=size ~").stdout.split()[1])
        assert 48 << 20 < size <= 64 << 20  # ext4 keeps some for itself
        assert sb.info().limits_note is None or "disk quota" not in sb.info().limits_note
        assert sb.sh("echo alive").stdout == "alive\n"
        assert sb.fs.read_text("precious.txt") == "keep me\n"
    assert sb.id not in Path("/proc/self/mountinfo").read_text()


def test_the_default_home_quota_is_configurable(tmp_path, separate_service_env):
    """JUPYTER_SANDBOX_DEFAULT_DISK sets every sandbox's home quota (and info shows it)."""
    env = {**separate_service_env, "JUPYTER_SANDBOX_POOL": "0"}
    env["JUPYTER_SANDBOX_DEFAULT_DISK"] = "64M"
    service = subprocess.Popen(
        [sys.executable, "-m", "jupyter_sandbox", "serve"], env=env, stderr=subprocess.DEVNULL
    )
    code = (
        "import json\n"
        "from jupyter_sandbox import Sandbox\n"
        "with Sandbox.create() as sb:\n"
        "    print(json.dumps(sb.info().limits['disk']))\n"
    )
    try:
        wait_for((tmp_path / "rt" / "jupyter-sandbox.json").exists, 30, message="the service")
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
        )
    finally:
        service.terminate()
        service.wait(30)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == 64 << 20
