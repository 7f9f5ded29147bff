"""Trees a sandbox leaves behind: removal always completes and never stops the service.

The attacker owns a sandbox's home and builds what makes a recursive or
link-following removal fail or go astray: trees thousands of levels deep, very
wide directories, directories and files with no permissions, names with
newlines or bytes that are not UTF-8, links to host directories. Each test fails
if such a tree survives the sandbox, if anything outside it is touched, or if
the service cannot start while one is left over.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from jupyter_sandbox import Sandbox
from jupyter_sandbox.backends.removal import remove_tree
from jupyter_sandbox.backends.storage import IDENTITY_FILE, MANIFEST, UID_RANGE_FILE
from tests.conftest import ServiceEnv, storage_parent, wait_for

pytestmark = pytest.mark.unprivileged

# Builds the tree in sys.argv[1]: stdlib only, run inside a sandbox or as its host uid.
HOSTILE_TREE = r"""
import os, sys
root, depths, canary = sys.argv[1], [int(d) for d in sys.argv[2].split(",")], sys.argv[3]
os.makedirs(root, exist_ok=True)
for depth in depths:
    fd = os.open(root, os.O_RDONLY)
    name = f"deep{depth}"
    for _ in range(depth):
        os.mkdir(name, dir_fd=fd)
        child = os.open(name, os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd, name = child, "d"
    os.close(fd)
wide = os.path.join(root, "wide")
os.mkdir(wide)
for i in range(20000):
    os.close(os.open(os.path.join(wide, f"f{i}"), os.O_CREAT | os.O_WRONLY, 0))
for mode in (0o000, 0o100, 0o500, 0o300):
    locked = os.path.join(root, f"mode{mode:o}")
    os.makedirs(os.path.join(locked, "inner"))
    os.close(os.open(os.path.join(locked, "inner", "f"), os.O_CREAT | os.O_WRONLY, 0))
    os.close(os.open(os.path.join(locked, "f"), os.O_CREAT | os.O_WRONLY, 0))
    os.chmod(os.path.join(locked, "inner"), mode)
    os.chmod(locked, mode)
os.mkdir(os.path.join(root, "new\nline"))
os.mkdir(os.fsencode(root) + b"/not-utf8-\xff\xfe")
os.close(os.open(os.fsencode(root) + b"/not-utf8-\xff\xfe/file\n\x80", os.O_CREAT, 0))
os.symlink(canary, os.path.join(root, "to-canary"))
os.symlink(canary + "/precious", os.path.join(root, "to-precious"))
os.mkfifo(os.path.join(root, "fifo"))
print("built")
"""


@pytest.fixture
def canary() -> Path:
    """A host directory the hostile trees link to: removing a tree must not touch it."""
    path = Path(tempfile.mkdtemp(prefix="jsb-canary-", dir=storage_parent()))
    (path / "precious").write_text("keep me")
    os.chmod(path, 0o755)
    yield path
    assert (path / "precious").read_text() == "keep me"
    shutil.rmtree(path)


def build_on_host(root: Path, depths: str, canary: Path, uid: int | None = None) -> None:
    """Build the hostile tree on the host, as `uid` when given (the sandbox's host uid)."""
    drop = []
    if uid is not None and uid != os.getuid():
        drop = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    subprocess.run(
        [*drop, "/usr/bin/python3", "-c", HOSTILE_TREE, str(root), depths, str(canary)],
        check=True,
        capture_output=True,
        timeout=120,
    )


def test_removal_takes_any_tree_and_follows_no_link(tmp_path: Path, canary: Path) -> None:
    """Attack: a tree 100,000 deep, 20,000 wide, unreadable and unwritable directories,
    newline and non-UTF-8 names, links to a host directory. Removal must finish, leave
    nothing, and leave the linked host directory as it was."""
    tree = tmp_path / "tree"
    build_on_host(tree, "1200,100000", canary)
    started = time.monotonic()
    assert remove_tree(tree)
    assert not os.path.lexists(tree)
    assert time.monotonic() - started < 60
    assert sorted(os.listdir(canary)) == ["precious"]


def test_removal_does_not_enter_another_filesystem(tmp_path: Path) -> None:
    """Attack: a filesystem mounted inside a tree (root only). Removal must fail, say so,
    and leave the mounted filesystem's files alone."""
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    tree = tmp_path / "tree"
    (tree / "mnt").mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "none", str(tree / "mnt")], check=True)
    try:
        (tree / "mnt" / "other-fs-file").write_text("x")
        assert not remove_tree(tree, attempts=2)
        assert (tree / "mnt" / "other-fs-file").exists()
    finally:
        subprocess.run(["umount", str(tree / "mnt")], check=True)
    assert remove_tree(tree)


def test_killed_sandbox_leaves_no_hostile_tree(service_env: ServiceEnv, canary: Path) -> None:
    """Attack: from inside, build trees 1,200 and 10,000 deep, a directory of 20,000
    files, mode 000/0100/0500 directories and links to a host directory, then get
    killed. The sandbox's directory must be gone, the host directory untouched."""
    sb = Sandbox.create()
    directory = service_env.storage / "sandboxes" / sb.id
    sb.fs.write_text("build.py", HOSTILE_TREE)
    built = sb.sh(f"python3 build.py junk 1200,10000 {canary}", timeout=120, check=False)
    assert built.stdout == "built\n", built.stderr
    assert (directory / "home" / "junk" / "wide").exists()
    sb.kill()
    assert not os.path.lexists(directory)


def leftover_dir(env: ServiceEnv, sandbox_id: str) -> Path:
    """A sandbox directory as the service would have left it: with this storage's manifest."""
    storage_id = json.loads((env.storage / IDENTITY_FILE).read_text())["id"]
    directory = env.storage / "sandboxes" / sandbox_id
    uid = sandbox_uid(env)
    (directory / "home").mkdir(parents=True)
    os.chown(directory / "home", uid, uid)
    manifest = {"storage": storage_id, "sandbox": sandbox_id, "host_uid": uid}
    (directory / MANIFEST).write_text(json.dumps(manifest))
    return directory


def sandbox_uid(env: ServiceEnv) -> int:
    """The host uid sandboxes of this service run as: the first of its range, as root."""
    if os.geteuid() != 0:
        return os.getuid()
    return json.loads((env.storage / UID_RANGE_FILE).read_text())["first"]


def test_service_starts_over_a_hostile_leftover_and_removes_it(
    service_env: ServiceEnv, canary: Path
) -> None:
    """Attack: a hostile tree left in the storage by a sandbox whose service died before
    removing it. The next service must start, serve, and remove the leftover."""
    Sandbox.list()  # the storage exists and has its identity
    service_env.stop_service()
    directory = leftover_dir(service_env, "sb-leftover01")
    build_on_host(directory / "home" / "junk", "1200,10000", canary, sandbox_uid(service_env))
    with Sandbox.create() as sb:
        assert sb.sh("true").exit_code == 0
    # A start waits a few seconds for leftovers at most; a long removal goes on meanwhile.
    wait_for(lambda: not os.path.lexists(directory), 60, message="the leftover to be removed")
    assert "stopped sandbox sb-leftover01" in service_env.log_file.read_text()


def test_service_starts_when_a_leftover_cannot_be_removed(service_env: ServiceEnv) -> None:
    """Attack: a leftover whose removal fails (a filesystem mounted inside it; root only).
    The service must still start and serve, log the path, and remove it with a later
    cleanup once that is possible."""
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    Sandbox.list()
    service_env.stop_service()
    directory = leftover_dir(service_env, "sb-leftover02")
    mount = directory / "home" / "mnt"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "none", str(mount)], check=True)
    try:
        with Sandbox.create() as sb:
            assert sb.sh("true").exit_code == 0
        wait_for(
            lambda: f"could not remove {directory}" in service_env.log_file.read_text(),
            60,
            message="the failed removal to be logged",
        )
        assert (directory / MANIFEST).exists()  # still known as this storage's
    finally:
        subprocess.run(["umount", str(mount)], check=True)
    with Sandbox.create() as sb:  # its cleanup tries the leftover again
        sb.sh("true")
    assert not os.path.lexists(directory)
