"""Downloads from a real sandbox whose user code lays traps for the host.

Code inside the sandbox controls what a download sends: symlinks aimed at the
client's own directories, FIFOs, trees deeper than Python's recursion limit,
set-id modes. Each test downloads both ways a client takes (through the
service, and over pipes straight from the agent) and checks the host.
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from jupyter_sandbox import FileError, SandboxError
from jupyter_sandbox.untrusted import extract
from jupyter_sandbox.untrusted.streams import ANSWER_TIMEOUT
from tests.security._trees import remove

pytestmark = pytest.mark.unprivileged


@pytest.fixture(params=["http", "pipe"])
def fs(request, sandbox):
    """The sandbox's file API, forced onto one transfer path."""
    if request.param == "http":
        sandbox.fs._fs._direct_transfer = False  # as for a client on another machine
    return sandbox.fs


def listing(root: Path) -> dict[str, tuple[int, int]]:
    """Every name under `root` with its mode and owner (links not followed)."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            found[os.path.relpath(path, root)] = (st.st_mode, st.st_uid)
    return found


def test_symlinks_to_the_clients_directories_are_never_followed(sandbox, fs, tmp_path):
    """Attack: the tree holds `up -> <target's parent>` and `dot -> ..`; a second
    download replaces them with directories holding files, hoping to write through
    the links the first download left."""
    outside, parent_mode = listing(tmp_path), tmp_path.stat().st_mode
    sandbox.sh(f"mkdir -p tree && ln -s {tmp_path} tree/up && ln -s .. tree/dot && echo a > tree/a")
    fs.download("tree", tmp_path / "target")
    assert os.readlink(tmp_path / "target" / "up") == str(tmp_path)
    sandbox.sh(
        "rm tree/up tree/dot && mkdir -p tree/up tree/dot && chmod 777 tree/up && "
        "echo pwned > tree/up/pwned && echo pwned > tree/dot/pwned"
    )
    fs.download("tree", tmp_path / "target")
    assert (tmp_path / "target" / "up" / "pwned").read_text() == "pwned\n"
    assert not (tmp_path / "pwned").exists()
    assert {k: v for k, v in listing(tmp_path).items() if not k.startswith("target")} == outside
    assert tmp_path.stat().st_mode == parent_mode
    sandbox.sh("ln -s /etc/passwd tree/passwd")
    fs.download("tree", tmp_path / "target")
    with pytest.raises(FileError, match="symlink"):
        fs.download("tree/a", tmp_path / "target" / "passwd")


def test_fifos_never_hang_a_download(sandbox, fs, tmp_path):
    """Attack: FIFOs with no writer, alone and inside a tree (reading one blocks forever)."""
    sandbox.sh("mkfifo lone && mkdir tree && mkfifo tree/pipe && echo kept > tree/file")
    started = time.monotonic()
    with pytest.raises(FileError, match="not a regular file"):
        fs.download("lone", tmp_path / "lone")
    with pytest.raises(FileError, match="pipe"):
        fs.download("tree", tmp_path / "tree")
    assert os.listdir(tmp_path / "tree") == ["file"]
    with pytest.raises(SandboxError):
        fs.read_bytes("lone")
    assert time.monotonic() - started < ANSWER_TIMEOUT + 10
    assert not (tmp_path / "lone").exists()


def test_deep_tree_downloads(sandbox, fs, tmp_path):
    """A 1,200-deep tree (past Python's recursion limit) downloads completely."""
    deep = "$(printf 'd/%.0s' $(seq 1200))"
    sandbox.sh(f"mkdir -p {deep} && echo leaf > {deep}leaf")
    try:
        fs.download("d", tmp_path / "deep")
        leaf = tmp_path / "deep" / "/".join(["d"] * 1199) / "leaf"
        assert leaf.read_text() == "leaf\n"
    finally:
        remove(tmp_path / "deep")


def test_set_id_and_sticky_modes_never_reach_the_host(sandbox, fs, tmp_path):
    """Attack: mode 4755, 2755 and 6777 files and a 1777 directory made in the sandbox."""
    sandbox.sh(
        "mkdir -p tree/shared && cp /bin/true tree/suid && cp /bin/true tree/sgid && "
        "cp /bin/true tree/both && chmod 4755 tree/suid && chmod 2755 tree/sgid && "
        "chmod 6777 tree/both && chmod 1777 tree/shared"
    )
    assert sandbox.fs.stat("tree/suid").mode == 0o4755
    fs.download("tree", tmp_path / "tree")
    fs.download("tree/suid", tmp_path / "suid")
    mask = extract.umask()
    modes = {name: mode for name, (mode, uid) in listing(tmp_path).items()}
    assert {name: stat.S_IMODE(mode) for name, mode in modes.items()} == {
        "tree": 0o755 & ~mask,
        "tree/shared": 0o777 & ~mask,
        "tree/suid": 0o755 & ~mask,
        "tree/sgid": 0o755 & ~mask,
        "tree/both": 0o777 & ~mask,
        "suid": 0o755 & ~mask,
    }
    assert {uid for _, uid in listing(tmp_path).values()} == {os.getuid()}
