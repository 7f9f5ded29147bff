"""The state database is no single point of loss: deleted, emptied, damaged or locked.

Each test runs a service of its own with real sandboxes holding files, a background
process and SSH credentials, then damages or locks its ``state.sqlite3`` the way a
disk, a user or another program would. Afterwards every sandbox is still listed and
running with its files, its SSH credential still lets one in, the log says in one
line what happened and where the damaged file went, and nothing is left after kill.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import select
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from jupyter_sandbox.backends.local import GENERATED_ETC
from jupyter_sandbox.backends.storage import MANIFEST, RECORD
from tests.conftest import (
    UNPINNED_SSH,
    ServiceEnv,
    _alive,
    sandbox_mounts,
    sandbox_pids,
    sandbox_processes,
    wait_for,
)

pytestmark = pytest.mark.unprivileged

SETUP = """
import json, sys
from jupyter_sandbox import Sandbox
sb = Sandbox.create(timeout="10m")
sb.fs.write_text("kept.txt", "still here")
sb.fs.write_bytes("data.bin", bytes(range(256)) * 4096)
sb.spawn("while true; do echo tick >> ticks; sleep 0.1; done")
ssh = sb.expose_ssh()
print(json.dumps({"id": sb.id, "token": ssh.username}))
"""

# A session sandbox whose owner keeps renewing its lease, before and after the fault.
OWNER = """
import sys, time
from jupyter_sandbox import Sandbox
sb = Sandbox.create()
sb.fs.write_text("kept.txt", "owned")
print(sb.id, flush=True)
time.sleep(3600)
"""

CHECK = """
import hashlib, sys
from jupyter_sandbox import Sandbox
sb = Sandbox.connect(sys.argv[1])
digest = hashlib.sha256(sb.fs.read_bytes("data.bin")).hexdigest()
print(sb.fs.read_text("kept.txt"), digest, sb.sh("wc -l < ticks").stdout.strip())
"""

LIST = "from jupyter_sandbox import Sandbox; print(' '.join(s.id for s in Sandbox.list()))"

KILL_ALL = (
    "from jupyter_sandbox import Sandbox\nfor s in Sandbox.list(): Sandbox.connect(s.id).kill()"
)

DATA_DIGEST = hashlib.sha256(bytes(range(256)) * 4096).hexdigest()  # data.bin of SETUP


class StoreService(ServiceEnv):
    """A service of this test's own, driven through the client in separate processes."""

    @property
    def data_dir(self) -> Path:
        return Path(self.env["JUPYTER_DATA_DIR"]) / "sandbox"

    @property
    def database(self) -> Path:
        return self.data_dir / "state.sqlite3"

    def python(self, code: str, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-c", code, *args],
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    def listed(self) -> set[str]:
        return set(self.python(LIST).split())

    def log_since(self, offset: int) -> list[str]:
        with open(self.log_file, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace").splitlines()

    def log_size(self) -> int:
        return self.log_file.stat().st_size if self.log_file.exists() else 0

    def ssh_port(self) -> int:
        return json.loads(self.runtime_file.read_text())["ssh_port"]

    def ssh(self, token: str, command: str) -> subprocess.CompletedProcess:
        argv = ["ssh", *UNPINNED_SSH, "-p", str(self.ssh_port()), f"{token}@127.0.0.1", command]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60)

    def kill_at_once(self, fault) -> None:
        """Stop the service, apply `fault` while it can do nothing, then SIGKILL it."""
        pid = self.service_pid()
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        try:
            fault()
        finally:
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not _alive(pid), 20, message="the service to die")

    def still_running(self, sandbox_id: str) -> None:
        """Its files are intact and its background process keeps writing."""
        kept, digest, before = self.python(CHECK, sandbox_id).rsplit(" ", 2)
        assert (kept, digest) == ("still here", DATA_DIGEST)
        wait_for(
            lambda: int(self.python(CHECK, sandbox_id).rsplit(" ", 1)[1]) > int(before),
            15,
            message="the background process to keep running",
        )


@pytest.fixture
def store(tmp_path: Path, separate_service_env: dict[str, str]) -> Iterator[StoreService]:
    service = StoreService(tmp_path, Path(separate_service_env["JUPYTER_SANDBOX_DIR"]))
    service.env.update(JUPYTER_SANDBOX_SSH_PORT="0", JUPYTER_SANDBOX_POOL="0")
    yield service
    if service.service_pid() is not None:
        service.python(KILL_ALL)
    service.stop_service()
    sandboxes = service.storage / "sandboxes"
    left = sorted(p.name for p in sandboxes.iterdir()) if sandboxes.exists() else []
    processes = sandbox_processes(service.storage)
    mounted = sandbox_mounts(service.storage)
    for pid in processes:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"sandbox directories left after kill: {left}"
    assert not processes, f"sandbox processes left after kill: {processes}"
    assert not mounted, f"sandbox homes still mounted after kill: {mounted}"


def start_owner(service: StoreService) -> tuple[subprocess.Popen, str]:
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER],
        env={**os.environ, **service.env},
        stdout=subprocess.PIPE,
        text=True,
    )
    sandbox_id = owner.stdout.readline().strip()
    assert sandbox_id.startswith("sb-")
    return owner, sandbox_id


def lease_expires(service: StoreService, sandbox_id: str) -> float:
    with sqlite3.connect(f"file:{service.database}?mode=ro", uri=True, timeout=5) as db:
        row = db.execute("SELECT lease_expires FROM sandboxes WHERE id = ?", (sandbox_id,))
        return (row.fetchone() or [0.0])[0] or 0.0


def delete(path: Path) -> None:
    path.unlink()


def empty(path: Path) -> None:
    os.truncate(path, 0)


def garble(path: Path) -> None:
    # Once its pages are back in the file itself: until then, the WAL holds the header.
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    with open(path, "r+b") as f:
        f.write(b"this is no database header, nor anything else" * 4)


@pytest.mark.parametrize("fault", [delete, empty, garble], ids=["deleted", "emptied", "garbled"])
def test_a_lost_or_damaged_database_loses_no_sandbox(store: StoreService, fault) -> None:
    """The state file deleted, truncated to nothing or with a garbled header, at the worst
    moment (the service SIGKILLed with it). The next service must re-adopt every sandbox
    from its own record: running, files intact, its SSH credential still valid, the
    session sandbox still its owner's; and say in one line what it did."""
    first = json.loads(store.python(SETUP))
    owner, owned = start_owner(store)
    try:
        assert store.ssh(first["token"], "cat kept.txt").stdout == "still here"
        offset = store.log_size()
        store.kill_at_once(lambda: fault(store.database))
        restarted = time.time()

        assert store.listed() == {first["id"], owned}
        store.still_running(first["id"])
        assert store.ssh(first["token"], "cat kept.txt").stdout == "still here"
        # The owner renews the lease it had before the fault; the sandbox stays its own.
        wait_for(
            lambda: lease_expires(store, owned) > restarted + 4,
            20,
            message="the owner to renew its lease with the new service",
        )
        assert owned in store.listed()

        lines = [line for line in store.log_since(offset) if "state database" in line]
        assert len(lines) == 1, lines
        [line] = lines
        assert str(store.database) in line and "rebuilt 2 sandbox(es)" in line
        assert "lost: the list of sandboxes that ended before;" in line
        if fault is delete:
            assert "was missing" in line
        else:
            kept = re.search(r"kept it as (\S+) and", line)
            assert kept, line
            assert Path(kept[1]).exists() and Path(kept[1]).parent == store.data_dir
        assert not [line for line in store.log_since(offset) if "stopped sandbox" in line]
    finally:
        owner.kill()
        owner.wait()


@pytest.mark.parametrize("command", ["status", "list"])
def test_a_service_that_cannot_start_says_why_in_one_line(
    store: StoreService, tmp_path: Path, command: str
) -> None:
    """A service that cannot start at all (here its storage is a file, not a directory):
    every client call must end with one line naming the cause and the log, never a
    traceback, and the next call must try again rather than hang."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    store.env["JUPYTER_SANDBOX_DIR"] = str(blocker)
    for _ in range(2):
        done = store.run_cli(command, check=False)
        assert done.returncode == 1
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
        assert "could not start" in done.stderr and str(blocker) in done.stderr
        assert str(store.log_file) in done.stderr
    assert store.service_pid() is None


LOCKER = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.readline()
db.execute("COMMIT")
"""

# Calls sh("true") in a sandbox for a while, paced, from a session sandbox of its own
# (whose lease it renews all along); creates a sandbox halfway. Prints what it saw.
PROBE = """
import json, sys, time
from jupyter_sandbox import Sandbox
target, seconds = Sandbox.connect(sys.argv[1]), float(sys.argv[2])
with Sandbox.create() as own:
    print("ready", flush=True)
    sys.stdin.readline()
    worst, calls, created = 0.0, 0, None
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        started = time.monotonic()
        target.sh("true")
        own.sh("true")
        worst = max(worst, time.monotonic() - started)
        calls += 1
        if created is None and time.monotonic() > end - seconds / 2:
            created = Sandbox.create(timeout="10m").id
        time.sleep(0.05)
print(json.dumps({"worst": worst, "calls": calls, "created": created}), flush=True)
"""

LOCK_SECONDS = 10.0


class Terminal:
    """An interactive `ssh -tt` session; `round_trip` times one command's answer."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        self.seen = b""
        self.count = 0

    def round_trip(self, timeout: float = 30.0) -> float:
        """Seconds from typing a command to seeing its output (not the echo of the line)."""
        self.count += 1
        expected = f"x{self.count + 1000}y".encode()
        started = time.monotonic()
        self.proc.stdin.write(f"echo x$(({self.count} + 1000))y\n".encode())
        self.proc.stdin.flush()
        while expected not in self.seen:
            left = started + timeout - time.monotonic()
            assert left > 0, f"no answer from the SSH session in {timeout} s"
            readable, _, _ = select.select([self.proc.stdout], [], [], left)
            if readable:
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                assert chunk, "the SSH session closed"
                self.seen += chunk
        self.seen = self.seen.split(expected, 1)[1]
        return time.monotonic() - started

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def lock(service: StoreService) -> subprocess.Popen:
    """Another process holding the database's write lock, until `release`."""
    locker = subprocess.Popen(
        [sys.executable, "-c", LOCKER, str(service.database)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert locker.stdout.readline() == "locked\n"
    return locker


def release(locker: subprocess.Popen) -> None:
    locker.stdin.write("\n")
    locker.stdin.flush()
    assert locker.wait(10) == 0


def in_database(service: StoreService, sandbox_id: str) -> bool:
    with sqlite3.connect(f"file:{service.database}?mode=ro", uri=True, timeout=5) as db:
        row = db.execute("SELECT 1 FROM sandboxes WHERE id = ?", (sandbox_id,)).fetchone()
        return row is not None


def test_a_locked_database_holds_up_nothing(store: StoreService) -> None:
    """Another process holds the database's write lock for 10 s. Meanwhile `sh` calls,
    lease renewals and an interactive SSH session must keep answering within 1 s; a
    sandbox created meanwhile is written once the lock is released; the log says once
    that writes are delayed (not once per write), and when they went in. A service
    SIGKILLed and started again under the lock ends nothing, and both sandboxes are
    there after a restart once it is released."""
    first = json.loads(store.python(SETUP))
    terminal = Terminal(
        ["ssh", "-tt", *UNPINNED_SSH, "-p", str(store.ssh_port()), f"{first['token']}@127.0.0.1"]
    )
    probe = subprocess.Popen(
        [sys.executable, "-c", PROBE, first["id"], str(LOCK_SECONDS)],
        env={**os.environ, **store.env},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    locker = None
    try:
        terminal.round_trip()
        assert probe.stdout.readline() == "ready\n"
        offset = store.log_size()
        locker = lock(store)
        locked_at = time.monotonic()
        probe.stdin.write("go\n")
        probe.stdin.flush()
        worst_ssh = 0.0
        while probe.poll() is None and time.monotonic() < locked_at + 4 * LOCK_SECONDS:
            worst_ssh = max(worst_ssh, terminal.round_trip())
            time.sleep(0.1)  # pacing the probes, not waiting for anything
        seen = json.loads(probe.stdout.readline())
        assert time.monotonic() - locked_at >= LOCK_SECONDS and locker.poll() is None
        print(
            f"under the lock: sh worst {seen['worst']:.3f} s over {seen['calls']} calls, "
            f"ssh worst {worst_ssh:.3f} s over {terminal.count} round trips"
        )
        assert seen["worst"] < 1.0 and seen["calls"] >= 10, seen
        assert worst_ssh < 1.0 and terminal.count >= 10
        created = seen["created"]
        assert not in_database(store, created)  # the lock really kept it out
        delayed = [line for line in store.log_since(offset) if "are delayed" in line]
        assert len(delayed) == 1 and str(store.database) in delayed[0], delayed

        terminal.close()
        release(locker)
        wait_for(lambda: in_database(store, created), 15, message="the delayed writes to land")
        wait_for(
            lambda: any("delayed writes went in" in line for line in store.log_since(offset)),
            message="the log to say the writes went in",
        )

        # Locked again, the service SIGKILLed and started under the lock: nothing ends.
        locker = lock(store)
        store.kill_at_once(lambda: None)
        assert {first["id"], created} <= store.listed()
        store.still_running(first["id"])
        release(locker)
        store.stop_service()
        assert {first["id"], created} <= store.listed()
    finally:
        terminal.close()
        for proc in (probe, locker):
            if proc is not None:
                proc.kill()
                proc.wait()


def test_a_database_deleted_under_a_running_service_is_written_anew(store: StoreService) -> None:
    """The state file deleted while the service runs (its connection still writes to the
    unlinked file). At its next change the service must notice, write a new database
    with everything it holds, ended sandboxes included, and say so in one line; the
    next service then starts from it with nothing to rebuild."""
    first = json.loads(store.python(SETUP))
    ended = json.loads(store.python(SETUP))["id"]
    store.python(f"from jupyter_sandbox import Sandbox; Sandbox.connect({ended!r}).kill()")
    offset = store.log_size()
    store.database.unlink()
    second = json.loads(store.python(SETUP))  # a change for the service to write
    wait_for(
        lambda: store.database.exists() and in_database(store, second["id"]),
        15,
        message="a new database with the new sandbox",
    )
    assert in_database(store, first["id"]) and in_database(store, ended)
    lines = [line for line in store.log_since(offset) if "state database" in line]
    assert len(lines) == 1 and "was deleted while the service ran" in lines[0], lines

    offset = store.log_size()
    store.kill_at_once(lambda: None)
    assert store.listed() == {first["id"], second["id"]}
    assert store.ssh(second["token"], "cat kept.txt").stdout == "still here"
    ended_list = store.python(
        "from jupyter_sandbox import Sandbox\n"
        "print(' '.join(s.id for s in Sandbox.list(include_ended=True) if s.status == 'ended'))"
    )
    assert ended in ended_list.split()
    assert not [line for line in store.log_since(offset) if "state database" in line]


def test_a_record_that_does_not_check_out_makes_its_sandbox_failed(store: StoreService) -> None:
    """A sandbox's record file with a field of the wrong type, and no database to fall
    back on. The service must neither sweep that sandbox nor leave it running unseen
    (no deadline, no kill would reach it): it is adopted as failed, its processes
    stopped, its files kept and readable, its record kept aside; one log line says which
    record, why, and what became of it. Restarting it brings it back with its files."""
    first = json.loads(store.python(SETUP))
    directory = store.storage / "sandboxes" / first["id"]
    record_file = directory / RECORD

    def damage() -> None:
        data = json.loads(record_file.read_bytes())
        data["record"]["created_at"] = "yesterday"
        record_file.write_text(json.dumps(data))
        delete(store.database)

    offset = store.log_size()
    store.kill_at_once(damage)
    assert store.listed() == {first["id"]}
    assert not sandbox_processes(directory)
    [aside] = directory.glob(f"{RECORD}.unreadable-*")
    assert "yesterday" in aside.read_text()
    [line] = [line for line in store.log_since(offset) if "adopted it as failed" in line]
    assert first["id"] in line and "created_at is 'yesterday'" in line and str(aside) in line
    read = (
        "import sys\nfrom jupyter_sandbox import Sandbox\nsb = Sandbox.connect(sys.argv[1])\n"
        "print(sb.info().status, sb.fs.read_text('kept.txt'))\n"
        "print(sb.restart().status, sb.sh('cat kept.txt').stdout)"
    )
    assert store.python(read, first["id"]).split("\n")[:2] == [
        "failed still here",
        "running still here",
    ]


def test_the_record_is_out_of_the_sandboxs_reach(store: StoreService) -> None:
    """From inside, a sandbox must see no part of its own directory on the host but its
    home, its state directory and its generated /etc files: never the record or the
    manifest, which decide what the service does with it."""
    first = json.loads(store.python(SETUP))
    directory = store.storage / "sandboxes" / first["id"]
    assert (directory / RECORD).exists() and (directory / MANIFEST).exists()
    mounts = store.python(
        "import sys\nfrom jupyter_sandbox import Sandbox\n"
        "print(Sandbox.connect(sys.argv[1]).sh('cat /proc/self/mountinfo').stdout)",
        first["id"],
    )
    roots = [line.split()[3] for line in mounts.splitlines() if line.strip()]
    inside = [r.split(f"/sandboxes/{first['id']}", 1)[1] for r in roots if first["id"] in r]
    reachable = {"/home", "/state", *(f"/etc/{name}" for name in GENERATED_ETC)}
    assert inside and set(inside) <= reachable, inside


def test_a_revoked_credential_stays_revoked_whatever_the_record_file_says(
    store: StoreService,
) -> None:
    """A revocation whose record file could not be written (the disk was full, say),
    stood in for by the record file as it was before the revocation: the next start
    must not let the revoked credential in again, and must say it dropped one."""
    first = json.loads(store.python(SETUP))
    record_file = store.storage / "sandboxes" / first["id"] / RECORD
    before = record_file.read_bytes()
    revoke = (
        "import sys\nfrom jupyter_sandbox import Sandbox\nSandbox.connect(sys.argv[1]).revoke_ssh()"
    )
    store.python(revoke, first["id"])
    assert store.ssh(first["token"], "true").returncode == 255
    wait_for(lambda: not in_database_token(store, first["token"]), message="the revocation")
    offset = store.log_size()
    store.kill_at_once(lambda: record_file.write_bytes(before))
    assert store.listed() == {first["id"]}
    denied = store.ssh(first["token"], "true")
    assert denied.returncode == 255 and "Permission denied" in denied.stderr
    assert any("dropped 1 SSH credential" in line for line in store.log_since(offset))


def in_database_token(service: StoreService, token: str) -> bool:
    token_hash = hashlib.sha256(token.encode()).hexdigest()
    with sqlite3.connect(f"file:{service.database}?mode=ro", uri=True, timeout=5) as db:
        row = db.execute("SELECT 1 FROM ssh_tokens WHERE token_hash = ?", (token_hash,))
        return row.fetchone() is not None


INFO = """
import json, sys
from jupyter_sandbox import Sandbox
info = Sandbox.connect(sys.argv[1]).info()
print(json.dumps({"status": info.status, "failure": info.failure}))
"""


def test_a_failed_sandbox_stays_failed_when_the_database_is_lost(store: StoreService) -> None:
    """A sandbox that failed (its agent SIGKILLed from the host), then its service SIGKILLed
    with a garbled database: the next service must know it from its record alone, as
    failed for the same reason, with its files readable; nothing of it is swept."""
    first = json.loads(store.python(SETUP))
    os.kill(sandbox_pids(store.storage, first["id"])["agent"], signal.SIGKILL)
    failed = wait_for(
        lambda: (
            (info := json.loads(store.python(INFO, first["id"])))["status"] == "failed" and info
        ),
        30,
        message="the sandbox to fail",
    )
    store.kill_at_once(lambda: garble(store.database))
    assert json.loads(store.python(INFO, first["id"])) == failed
    read = "import sys\nfrom jupyter_sandbox import Sandbox\n"
    read += "print(Sandbox.connect(sys.argv[1]).fs.read_text('kept.txt'))"
    assert store.python(read, first["id"]) == "still here"


def test_rows_from_before_a_column_existed_read_as_its_default(tmp_path: Path) -> None:
    """A database of an earlier release: columns an upgrade adds are NULL in its rows."""
    from jupyter_sandbox.service.state import SandboxRecord, _connect, _load, _row

    path = tmp_path / "state.sqlite3"
    row = _row(SandboxRecord(id="sb-0123456789", name="old", status="ended", created_at=1.0))
    del row["recording"]  # added with terminal recordings
    db = _connect(path, 5)
    with db:
        db.execute(
            f"INSERT INTO sandboxes ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
            list(row.values()),
        )
    db.close()
    loaded = _load(path)
    loaded.db.close()
    assert loaded.skipped == 0
    assert loaded.records["sb-0123456789"].recording is False
