"""A full disk gives DiskFull naming what is full, loses nothing and leaves nothing behind.

Each test runs its own service whose sandbox storage (JUPYTER_SANDBOX_DIR) is a small
tmpfs mounted for it, so "full" is reached in seconds without touching the host's
disk. Mounting needs root: as another user these tests skip. A home without a quota of
its own (an unprivileged service's) is a directory on the host's disk, which no test
here fills. What needs no mount runs as any user: a full tmpfs inside a sandbox.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from jupyter_sandbox import Sandbox
from jupyter_sandbox._durations import format_size
from jupyter_sandbox._errors import DiskFull
from jupyter_sandbox.backends import space
from tests.conftest import _alive, cgroup_dirs, sandbox_processes, service_status, wait_for

MiB = 1 << 20


@dataclass
class SmallDisk:
    """A service whose sandboxes live on a tmpfs of `size` bytes at `storage`."""

    storage: Path
    env: dict[str, str]
    size: int

    @property
    def log_file(self) -> Path:
        return Path(self.env["JUPYTER_DATA_DIR"]) / "sandbox" / "service.log"

    def sandbox_dirs(self) -> set[str]:
        sandboxes = self.storage / "sandboxes"
        return {p.name for p in sandboxes.iterdir()} if sandboxes.exists() else set()

    def pooled(self) -> set[str]:
        """Sandboxes of the warm pool, ready or starting."""
        return set(service_status()["pool"])

    def fill(self, leave: int) -> Path:
        """Take all but `leave` bytes of the disk with one file; returns it."""
        filler = self.storage / "filler"
        stats = os.statvfs(self.storage)
        free = stats.f_bavail * stats.f_frsize
        with open(filler, "ab") as f:
            os.posix_fallocate(f.fileno(), os.fstat(f.fileno()).st_size, max(free - leave, 1))
        return filler

    def free(self) -> int:
        stats = os.statvfs(self.storage)
        return stats.f_bavail * stats.f_frsize


@contextlib.contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _service_pid(env: dict[str, str]) -> int | None:
    runtime = Path(env["JUPYTER_RUNTIME_DIR"]) / "jupyter-sandbox.json"
    try:
        return json.loads(runtime.read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


def _mounted_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p.startswith(f"{path}/")]


def small_disk_fixture(size: int, pool: int):
    @pytest.fixture
    def fixture(separate_service_env: dict[str, str]) -> Iterator[SmallDisk]:
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs as the sandbox storage needs root")
        storage = Path(separate_service_env["JUPYTER_SANDBOX_DIR"])
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0711", "tmpfs", str(storage)],
            check=True,
        )
        env = {**separate_service_env, "JUPYTER_SANDBOX_POOL": str(pool)}
        disk = SmallDisk(storage, env, size)
        ids: set[str] = set()
        try:
            with _environment(env):
                yield disk
                if _service_pid(env) is not None:
                    ids = {info.id for info in Sandbox.list(include_ended=True)}
                    for info in Sandbox.list():
                        Sandbox.connect(info.id).kill()
        finally:
            pid = _service_pid(env)
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
                wait_for(lambda: not _alive(pid), 30, message=f"service {pid} to exit")
            left = {
                "processes": sandbox_processes(storage),
                "mounts": _mounted_under(storage),
                "loop devices": _loop_devices_after(storage, 10),
                "directories": sorted(disk.sandbox_dirs()),
                "cgroups": [c for c in cgroup_dirs() if Path(c).name in ids],
            }
            subprocess.run(["umount", "--lazy", str(storage)], check=True)
            assert not any(left.values()), f"left behind by the service: {left}"

    return fixture


small_disk = small_disk_fixture(64 * MiB, pool=1)
tight_disk = small_disk_fixture(64 * MiB, pool=0)  # no pool starting beside the test
roomy_disk = small_disk_fixture(256 * MiB, pool=0)


def _assert_names_the_disk(error: DiskFull, disk: SmallDisk) -> None:
    message = str(error)
    assert isinstance(error, OSError)  # DiskFull is also an OSError, as open() would raise
    assert str(disk.storage) in message and "tmpfs" in message, message
    assert f"{format_size(disk.size)} in all" in message, message
    assert re.search(r"[\d.]+ (bytes?|KiB|MiB) free", message), message
    assert "JUPYTER_SANDBOX_DIR" in message and "End sandboxes" in message, message


def test_create_until_full_names_the_disk_and_leaves_nothing(small_disk: SmallDisk):
    """Sandboxes with the default 10 GiB home (sparse images) until the disk is full:
    then DiskFull, no half-made directory, the pool waits instead of retrying, and the
    running sandboxes and the service carry on."""
    made = [Sandbox.create(timeout="5m")]
    small_disk.fill(leave=space.MIN_FREE + MiB)  # room for a few more at most
    with pytest.raises(DiskFull) as caught:
        for _ in range(40):
            made.append(_with_quota())  # a home of its own takes room; a plain one hardly any
            assert os.path.ismount(small_disk.storage), "the tmpfs was unmounted under the test"
    _assert_names_the_disk(caught.value, small_disk)
    for _ in range(3):  # more attempts: each is refused the same way, nothing piles up
        with pytest.raises(DiskFull):
            Sandbox.create(timeout="5m")
    assert small_disk.sandbox_dirs() == {sb.id for sb in made} | small_disk.pooled()
    log = small_disk.log_file.read_text()
    assert log.count("the warm pool stays empty") <= 1, log
    assert "No space left on device" not in log, log  # no traceback of a failed start
    for sb in made:
        assert sb.sh("echo ok").stdout == "ok\n"
    (small_disk.storage / "filler").unlink()
    with Sandbox.create() as sb:  # room again: starts work
        assert sb.sh("echo ok").stdout == "ok\n"
    for sb in made:
        sb.kill()


def test_start_that_runs_out_half_way_is_undone(tight_disk: SmallDisk):
    """Room enough to begin (above space.MIN_FREE) but not for the filesystem of the
    home asked for: the start is undone (no directory, image, loop device or mount)
    and says what did not fit, instead of going on without a quota."""
    os.environ["JUPYTER_SANDBOX_DEFAULT_DISK"] = "8T"  # read by the service at its start
    Sandbox.list()  # the service starts
    tight_disk.fill(leave=space.MIN_FREE + MiB)
    with pytest.raises(DiskFull) as caught:
        Sandbox.create(timeout="5m")
    _assert_names_the_disk(caught.value, tight_disk)
    assert "8 TiB home" in str(caught.value)
    assert tight_disk.sandbox_dirs() == tight_disk.pooled() == set()
    assert not _mounted_under(tight_disk.storage)
    assert not _loop_devices_after(tight_disk.storage, 10)
    (tight_disk.storage / "filler").unlink()
    with Sandbox.create(timeout="5m", disk="32M") as sb:  # with room again, starts work
        assert sb.sh("echo ok").stdout == "ok\n"


def _loop_devices_after(storage: Path, seconds: float) -> list[str]:
    """Loop devices under `storage` still there after `seconds` (a home unmounted lazily
    lets go of its device once the last process that used it is gone)."""
    deadline = time.monotonic() + seconds
    while (devices := _loop_devices(storage)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return devices


def _loop_devices(storage: Path) -> list[str]:
    """Loop devices backed by a file under `storage`."""
    found = subprocess.run(
        ["losetup", "-n", "-l", "-O", "NAME,BACK-FILE"], capture_output=True, text=True
    )
    return [line for line in found.stdout.splitlines() if str(storage) in line]


def test_full_home_gives_disk_full_and_keeps_files(roomy_disk: SmallDisk, tmp_path: Path):
    """A home with a 32 MiB quota filled by uploads and writes: DiskFull naming the home
    and its quota, every earlier file intact, no partial upload left, the sandbox usable;
    a command filling it just gets ENOSPC."""
    blob = tmp_path / "blob"
    blob.write_bytes(os.urandom(40 * MiB))
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "part").write_bytes(os.urandom(40 * MiB))
    with _with_quota(disk="32M") as sb:
        kept = os.urandom(4 * MiB)
        sb.fs.write_bytes("kept.bin", kept)
        sb.fs.write_text("notes.txt", "precious")
        attempts = {
            "write_bytes": lambda: sb.fs.write_bytes("big", os.urandom(40 * MiB)),
            "upload file": lambda: sb.fs.upload(blob, "big"),
            "upload tree": lambda: sb.fs.upload(tree, "tree"),
        }
        for what, attempt in attempts.items():
            with pytest.raises(DiskFull) as caught:
                attempt()
            message = str(caught.value)
            assert f"the home of sandbox {sb.id} is full" in message, (what, message)
            assert "quota" in message and "disk=" in message, (what, message)
            assert sb.fs.read_bytes("kept.bin") == kept, what
            assert sb.fs.read_text("notes.txt") == "precious", what
        sb.fs.remove("tree", recursive=True)
        names = {f.name for f in sb.fs.list(".")}
        assert names == {"kept.bin", "notes.txt"}, names  # no half-written upload
        filled = sb.sh("dd if=/dev/zero of=fill bs=1M count=64", check=False)
        assert filled.exit_code != 0 and "No space left on device" in filled.stderr
        assert sb.sh("rm fill; echo ok").stdout == "ok\n"
        sb.fs.write_bytes("after", b"x" * MiB)  # room again: writes work
        assert sb.fs.read_bytes("kept.bin") == kept
        assert sb.info().status == "running"


def test_full_host_disk_under_a_home(roomy_disk: SmallDisk):
    """The host's disk fills before a home's quota does (homes are sparse images, so
    their quotas add up to more than the disk): an upload says so instead of counting
    bytes the disk could not take; earlier files stay readable; the agent, whose log is
    on that disk too, keeps serving, and so does a service restarted meanwhile."""
    with _with_quota() as sb:
        kept = os.urandom(2 * MiB)
        sb.fs.write_bytes("kept.bin", kept)
        sb.sh("sync")
        filler = roomy_disk.fill(leave=0)
        with pytest.raises(DiskFull) as caught:
            sb.fs.write_bytes("big", os.urandom(8 * MiB))
        message = str(caught.value)
        assert "host's disk" in message and sb.id in message, message
        assert sb.fs.read_bytes("kept.bin") == kept
        # A command writes on regardless: what the disk could not take is lost, and the
        # home's filesystem may stop taking writes. Writes then say so, typed.
        sb.sh("dd if=/dev/zero of=lost bs=1M count=64; sync", check=False)
        with pytest.raises(DiskFull) as caught:
            sb.fs.write_bytes("more", os.urandom(MiB))
        assert sb.id in str(caught.value) and "host's disk" in str(caught.value)
        assert sb.fs.read_bytes("kept.bin") == kept
        with pytest.raises(DiskFull) as caught:  # its record, on that disk, cannot change
            sb.extend_timeout("10m")
        assert str(roomy_disk.storage) in str(caught.value), str(caught.value)
        service = _service_pid(roomy_disk.env)
        os.kill(service, signal.SIGKILL)  # a service restarting on the full disk writes nothing
        wait_for(lambda: not _alive(service), 10, message="the killed service to go")
        assert sb.id in {info.id for info in Sandbox.list()}  # back, and it re-adopted the sandbox
        assert sb.fs.read_bytes("kept.bin") == kept
        proc = sb.spawn("echo logged while full")
        assert proc.wait(timeout=30) == 0
        with sb.logs() as entries:
            assert any(e.text == "logged while full\n" for e in entries)
        assert sb.sh("echo alive").stdout == "alive\n"
        filler.unlink()
        assert sb.fs.read_bytes("kept.bin") == kept
        assert sb.spawn("echo logged again").wait(timeout=30) == 0
        log_file = roomy_disk.storage / "sandboxes" / sb.id / "state" / "log.jsonl"
        lines = log_file.read_bytes().splitlines()
        assert all(json.loads(line) for line in lines)  # no entry broken by the full disk
        assert any(json.loads(line)["text"] == "logged again\n" for line in lines)
        assert sb.sh("echo alive").stdout == "alive\n"
        assert sb.info().status == "running"


def test_pool_on_a_full_disk_waits(small_disk: SmallDisk):
    """The warm pool meets a full disk: one warning, then it waits (no retry loop)."""
    Sandbox.list()  # start the service; its pool fills while there is room
    wait_for(small_disk.pooled, 30, message="the pool to start a sandbox")
    small_disk.fill(leave=MiB)  # room for a record, not for a start
    # Only a sandbox from the pool can start now; until the pool's is ready, none can.
    sb = wait_for(lambda: _create_or_none(), 30, message="a sandbox from the pool")
    with sb:
        warning = "the warm pool stays empty"
        wait_for(lambda: warning in small_disk.log_file.read_text(), 30, message="a warning")
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:  # watched for a while: no second try, no spam
            assert small_disk.log_file.read_text().count(warning) == 1
            assert small_disk.sandbox_dirs() == {sb.id}
            time.sleep(0.2)
        assert sb.sh("echo ok").stdout == "ok\n"


def _with_quota(**options: str) -> Sandbox:
    """A sandbox whose home has its own filesystem (setting up a loop device can fail
    when many are set up at once on the host; the home then has no quota, and says so)."""
    for _ in range(3):
        sb = Sandbox.create(timeout="5m", **options)
        if "no disk quota" not in (sb.info().limits_note or ""):
            return sb
        sb.kill()
    pytest.fail("three sandboxes in a row got no home of their own; see the service log")


def _create_or_none() -> Sandbox | None:
    try:
        return Sandbox.create(timeout="5m")
    except DiskFull:
        return None


@pytest.mark.unprivileged
def test_full_tmpfs_in_a_sandbox(service_env):
    """A tmpfs inside the sandbox (/var/tmp, sized from its memory) filled by a write:
    DiskFull names it and its size; a command filling it gets ENOSPC; nothing breaks."""
    with Sandbox.create(memory="128M") as sb:
        size = sb.info().limits["tmpfs"]["/var/tmp"]
        sb.fs.write_text("/var/tmp/kept", "precious")
        with pytest.raises(DiskFull) as caught:
            sb.fs.write_bytes("/var/tmp/big", os.urandom(size + MiB))
        message = str(caught.value)
        assert f"/var/tmp of sandbox {sb.id} is full ({format_size(size)})" in message, message
        assert "write into the home" in message, message
        assert sb.fs.read_text("/var/tmp/kept") == "precious"
        assert [f.name for f in sb.fs.list("/var/tmp")] == ["kept"]  # no partial file
        filled = sb.sh(
            f"dd if=/dev/zero of=/var/tmp/fill bs=1M count={size // MiB + 1}", check=False
        )
        assert filled.exit_code != 0 and "No space left on device" in filled.stderr
        assert sb.sh("rm /var/tmp/fill; echo ok").stdout == "ok\n"
        sb.fs.write_bytes("/var/tmp/after", b"x" * MiB)
        assert sb.info().status == "running"
