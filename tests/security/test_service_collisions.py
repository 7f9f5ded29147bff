"""Two services on one machine: neither ever ends, touches or shares the other's sandboxes.

Real services, each with its own runtime and data directories, started the way
a user starts them. The attacks are the mistakes and leftovers that made one
service's start-up sweep kill another's sandboxes: root services with their
default storage, a restart, two services pointed at one storage, a process that
only names a sandbox's directory, a directory in the storage that is not the
service's own. Each test fails if a service ends or shares what is not its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from jupyter_sandbox._config import SYSTEM_DIR, service_storage
from jupyter_sandbox.backends.storage import (
    MANIFEST,
    RECORD,
    UID_RANGE_FILE,
    UID_REGISTRY,
    Storage,
)
from tests.conftest import _alive, sandbox_processes, wait_for

CREATE = """
from jupyter_sandbox import Sandbox
sb = Sandbox.create(timeout="10m")
sb.fs.write_text("kept.txt", "still here")
sb.spawn("while true; do date +%s%N >> ticks; sleep 0.1; done")
print(sb.id)
"""

CHECK = """
import sys
from jupyter_sandbox import Sandbox
sb = Sandbox.connect(sys.argv[1])
print(sb.fs.read_text("kept.txt"), sb.sh("wc -l < ticks").stdout.strip())
"""

LIST = "from jupyter_sandbox import Sandbox; print(' '.join(s.id for s in Sandbox.list()))"

KILL_ALL = (
    "from jupyter_sandbox import Sandbox\nfor s in Sandbox.list(): Sandbox.connect(s.id).kill()"
)


class Service:
    """A sandbox service of its own, driven through the client in separate processes."""

    def __init__(self, base: Path, storage: Path | None = None) -> None:
        self.base = base
        self.env = {k: v for k, v in os.environ.items() if k != "JUPYTER_SANDBOX_DIR"}
        self.env.update(
            JUPYTER_RUNTIME_DIR=str(base / "rt"),
            JUPYTER_DATA_DIR=str(base / "data"),
            JUPYTER_SANDBOX_SSH_PORT="0",
            JUPYTER_SANDBOX_POOL="1",
        )
        if storage is not None:
            self.env["JUPYTER_SANDBOX_DIR"] = str(storage)
        self.data_dir = base / "data" / "sandbox"
        self.storage = storage or service_storage(self.data_dir)

    def python(self, code: str, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-c", code, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    def serve(self) -> subprocess.CompletedProcess:
        """`serve` in the foreground; for a service that must refuse to start."""
        return subprocess.run(
            [sys.executable, "-m", "jupyter_sandbox", "serve"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError, KeyError):
            pid = json.loads((self.base / "rt" / "jupyter-sandbox.json").read_text())["pid"]
            os.kill(pid, 0)
            return pid
        return None

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the service and wait until its process is gone (not only its runtime file)."""
        pid = self.pid()
        if pid is not None:
            os.kill(pid, sig)
            wait_for(lambda: not _alive(pid), 20, message=f"service {pid} to exit")

    def host_uids(self, sandbox_id: str = "") -> set[int]:
        """Host uids of this service's sandbox processes (of one sandbox), from /proc."""
        where = self.storage / "sandboxes" / sandbox_id if sandbox_id else self.storage
        return {_uid(pid) for pid in sandbox_processes(where)} - {None}

    def tick_count(self, sandbox_id: str) -> tuple[str, int]:
        kept, ticks = self.python(CHECK, sandbox_id).rsplit(" ", 1)
        return kept, int(ticks)

    def still_running(self, sandbox_id: str) -> bool:
        """Its files are intact and its background process keeps writing."""
        kept, before = self.tick_count(sandbox_id)
        assert kept == "still here"
        return bool(wait_for(lambda: self.tick_count(sandbox_id)[1] > before, 15))

    def tear_down(self) -> None:
        try:
            if self.pid() is not None:
                self.python(KILL_ALL)
            self.stop()
        finally:
            for pid in sandbox_processes(self.storage):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            shutil.rmtree(self.storage, ignore_errors=True)
            _forget_uid_claims(self.storage)


def _uid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("Uid:"))
    except (OSError, StopIteration):
        return None


def _forget_uid_claims(storage: Path) -> None:
    """Remove the registry entries of a storage the test made (only root services claim)."""
    if os.geteuid() != 0 or not UID_REGISTRY.is_dir():
        return
    for entry in UID_REGISTRY.iterdir():
        with contextlib.suppress(OSError, ValueError):
            if json.loads(entry.read_text()).get("storage") == str(storage):
                entry.unlink()


@pytest.fixture
def services(tmp_path: Path) -> Iterator[Callable[..., Service]]:
    """Makes services of their own; stops them and removes all they made afterwards."""
    made: list[Service] = []

    def make(name: str, storage: Path | None = None) -> Service:
        service = Service(tmp_path / name, storage)
        made.append(service)
        return service

    yield make
    for service in made:
        service.tear_down()


root_only = pytest.mark.skipif(
    os.geteuid() != 0,
    reason="only a root service has a default storage under /var/lib and "
    "runs sandboxes on a range of host uids",
)


@root_only
def test_root_services_with_default_storage_never_collide(services) -> None:
    """Attack: two root services with different data dirs and the default storage, each
    with sandboxes; the second restarts after a SIGKILL (its start-up sweep runs). The
    first's sandboxes must keep running with their files; the two must never share a
    storage or a host uid; the second's sandbox is re-adopted with the uid it had."""
    first, second = services("first"), services("second")
    assert first.storage != second.storage
    assert {first.storage.parent, second.storage.parent} == {SYSTEM_DIR / "services"}
    first_id, second_id = first.python(CREATE), second.python(CREATE)
    first_uids, second_uids = first.host_uids(), second.host_uids()
    assert first_uids and second_uids and 0 not in first_uids | second_uids
    assert not first_uids & second_uids
    ranges = [json.loads((s.storage / UID_RANGE_FILE).read_text()) for s in (first, second)]
    spans = sorted((r["first"], r["first"] + r["size"]) for r in ranges)
    assert spans[0][1] <= spans[1][0], f"uid ranges overlap: {ranges}"
    first_pids = set(sandbox_processes(first.storage))
    second_uid = second.host_uids(second_id)
    assert len(second_uid) == 1

    second.stop(signal.SIGKILL)
    assert second_id in second.python(LIST).split()  # restarted, swept, re-adopted

    assert first.still_running(first_id)
    assert first_pids <= set(sandbox_processes(first.storage))
    assert second.still_running(second_id)
    assert second.host_uids(second_id) == second_uid
    assert not second.host_uids() & first.host_uids()


@root_only
def test_root_service_with_the_same_data_dir_by_mistake_refuses(services) -> None:
    """Attack: a second root service with the same data dir (so the same default storage)
    but its own runtime dir, which would have swept the first's sandboxes at its start."""
    first = services("first")
    sandbox_id = first.python(CREATE)
    twin = services("twin")
    twin.env["JUPYTER_DATA_DIR"] = first.env["JUPYTER_DATA_DIR"]
    twin.storage = first.storage
    refused = twin.serve()
    assert refused.returncode != 0
    assert f"is in use by another sandbox service (pid {first.pid()}" in refused.stderr
    assert first.still_running(sandbox_id)


@pytest.mark.unprivileged
def test_second_service_on_the_same_storage_refuses(services, separate_service_env) -> None:
    """Attack: two services with their own data dirs pointed at one JUPYTER_SANDBOX_DIR.
    While the first runs, the second must refuse to start, naming the first's pid and
    data dir; while it is stopped too (the storage is the first's); and the first's
    sandbox keeps running, then is re-adopted when the first starts again."""
    storage = Path(separate_service_env["JUPYTER_SANDBOX_DIR"])
    first, second = services("first", storage), services("second", storage)
    sandbox_id = first.python(CREATE)

    refused = second.serve()
    assert refused.returncode != 0
    message = refused.stderr
    assert f"in use by another sandbox service (pid {first.pid()}" in message
    assert os.path.realpath(first.data_dir) in message and "JUPYTER_SANDBOX_DIR" in message
    assert first.still_running(sandbox_id)

    first.stop()
    refused = second.serve()
    assert refused.returncode != 0
    owner = os.path.realpath(first.data_dir)
    assert f"belongs to the sandbox service with data dir {owner}" in refused.stderr
    assert sandbox_id in first.python(LIST).split()
    assert first.still_running(sandbox_id)


@pytest.mark.unprivileged
def test_sweep_ends_only_its_own_sandboxes_and_their_processes(
    services, separate_service_env
) -> None:
    """Attack: a host process whose command line names a sandbox's directory, and a
    directory in the storage whose manifest is another storage's. A sandbox that was
    never recorded (its service was killed while starting it: no record in its directory
    nor in the database) is swept at the next start: its own processes and directory
    must go, the bystander process and the foreign directory must stay."""
    storage = Path(separate_service_env["JUPYTER_SANDBOX_DIR"])
    service = services("service", storage)
    orphan_id = service.python(CREATE)
    orphan_dir = storage / "sandboxes" / orphan_id
    orphan_pids = set(sandbox_processes(orphan_dir))
    assert orphan_pids
    bystander = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(300)", f"{orphan_dir}/home"]
    )
    foreign = storage / "sandboxes" / "sb-foreign000"
    (foreign / "home").mkdir(parents=True)
    manifest = {"storage": "another-storage", "sandbox": foreign.name, "host_uid": os.getuid()}
    (foreign / MANIFEST).write_text(json.dumps(manifest))
    try:
        service.stop(signal.SIGKILL)
        with sqlite3.connect(service.data_dir / "state.sqlite3") as db:
            db.execute("DELETE FROM sandboxes WHERE id = ?", (orphan_id,))
        (orphan_dir / RECORD).unlink()
        assert orphan_id not in service.python(LIST).split()
        assert not os.path.lexists(orphan_dir)
        assert not orphan_pids & set(sandbox_processes(orphan_dir))
        assert bystander.poll() is None, "a process that only named the directory was killed"
        assert (foreign / MANIFEST).exists()
    finally:
        bystander.kill()
        bystander.wait()
        shutil.rmtree(foreign)


@root_only
def test_uid_range_never_holds_a_users_or_subordinate_id(tmp_path: Path) -> None:
    """Attack: a service configured to take host uids from 0 (JUPYTER_SANDBOX_UID_BASE=0).
    Its range must still hold no user's or group's id, no /etc/subuid or /etc/subgid id,
    nothing useradd would hand out next, and no id of a running process."""
    storage = tmp_path / "storage"
    claim = Storage.claim(storage, uid_base=0)
    try:
        uids = claim.uids
        assert uids is not None and uids.size > 0
        for path in ("/etc/passwd", "/etc/group"):
            ids = [int(line.split(":")[2]) for line in Path(path).read_text().splitlines()]
            assert not [i for i in ids if i in uids], path
        for path in ("/etc/subuid", "/etc/subgid"):
            for line in Path(path).read_text().splitlines():
                _, start, count = line.split(":")
                assert not uids.overlaps(int(start), int(start) + int(count) - 1), line
        assert uids.first > 600_100_000  # above useradd's default SUB_UID_MAX
        assert not {_uid(int(p)) for p in os.listdir("/proc") if p.isdigit()} & set(
            range(uids.first, uids.first + uids.size)
        )
    finally:
        claim.close()
        _forget_uid_claims(storage)
