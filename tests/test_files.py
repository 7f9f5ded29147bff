"""The file API: transfers, modes, symlinks, path resolution inside the sandbox."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from jupyter_sandbox import FileError, FileNotFound, PermissionDenied, Sandbox
from tests.conftest import ServiceEnv

pytestmark = [pytest.mark.unprivileged, pytest.mark.backends("local", "kubernetes")]
MiB = 1 << 20


def test_read_write_list_stat_mkdir_rename_remove(sandbox):
    sandbox.fs.write_text("notes/a.txt", "héllo\n")
    sandbox.fs.write_bytes("notes/b.bin", b"\x00\xff" * 10, mode=0o600)
    assert sandbox.fs.read_text("notes/a.txt") == "héllo\n"
    assert sandbox.fs.read_bytes("/home/sandbox/notes/b.bin") == b"\x00\xff" * 10
    assert [(f.name, f.type, f.size) for f in sandbox.fs.list("notes")] == [
        ("a.txt", "file", 7),
        ("b.bin", "file", 20),
    ]
    assert sandbox.fs.stat("notes/b.bin").mode == 0o600
    assert sandbox.fs.mkdir("deep/er/dir").type == "dir"
    sandbox.fs.rename("notes/a.txt", "deep/a.txt")
    assert not sandbox.fs.exists("notes/a.txt") and sandbox.fs.exists("deep/a.txt")
    with pytest.raises(FileError):
        sandbox.fs.remove("deep")  # not empty, not recursive
    sandbox.fs.remove("deep", recursive=True)
    assert not sandbox.fs.exists("deep")
    assert sandbox.sh("ls").stdout == "notes\n"
    with pytest.raises(FileNotFound):
        sandbox.fs.read_text("missing.txt")
    host_passwd = Path("/etc/passwd").read_text()
    with pytest.raises((PermissionDenied, FileError)):
        sandbox.fs.write_text("/etc/passwd", "root::0:0::/:/bin/sh\n")
    assert Path("/etc/passwd").read_text() == host_passwd


def make_tree(root):
    (root / "app" / "static").mkdir(parents=True)
    (root / "app" / "main.py").write_text("print('hi')\n")
    (root / "app" / "run.sh").write_text("#!/bin/sh\necho run\n")
    os.chmod(root / "app" / "run.sh", 0o755)
    (root / "app" / "static" / "data.bin").write_bytes(os.urandom(3 * MiB + 17))
    os.symlink("main.py", root / "app" / "link-inside")
    os.symlink("/etc/hostname", root / "app" / "link-absolute")
    (root / "app" / "empty").mkdir()
    return root / "app"


def tree_of(root):
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            rel = os.path.relpath(path, root)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir",)
            else:
                out[rel] = (
                    "file",
                    stat.S_IMODE(st.st_mode),
                    hashlib.sha256(Path(path).read_bytes()).hexdigest(),
                )
    return out


def test_upload_and_download_a_tree(sandbox, tmp_path):
    source = make_tree(tmp_path)
    progress = []
    sandbox.fs.upload(source, "app", progress=lambda done, total: progress.append((done, total)))
    assert progress[-1][0] >= 3 * MiB and progress[-1][1] >= 3 * MiB
    assert [p[0] for p in progress] == sorted(p[0] for p in progress)
    assert sandbox.sh("./app/run.sh").stdout == "run\n"
    assert sandbox.sh("readlink app/link-absolute").stdout == "/etc/hostname\n"
    # The absolute link resolves inside the sandbox, to the sandbox's own hostname file.
    assert sandbox.sh("cat app/link-absolute").stdout.strip() == sandbox.id
    sandbox.fs.download("app", tmp_path / "back")
    assert tree_of(tmp_path / "back") == tree_of(source)


def test_single_file_transfer_keeps_mode(sandbox, tmp_path):
    script = tmp_path / "tool.sh"
    script.write_text("#!/bin/sh\necho tool\n")
    os.chmod(script, 0o750)
    sandbox.fs.upload(script, "bin/tool.sh")
    assert sandbox.sh("bin/tool.sh").stdout == "tool\n"
    assert sandbox.fs.stat("bin/tool.sh").mode == 0o750
    sandbox.fs.download("bin/tool.sh", tmp_path / "out")
    assert (tmp_path / "out").read_text() == script.read_text()
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o750
    (tmp_path / "dir").mkdir()
    sandbox.fs.download("bin/tool.sh", tmp_path / "dir")
    assert (tmp_path / "dir" / "tool.sh").exists()


def test_paths_resolve_inside_the_sandbox(sandbox, service_env: ServiceEnv):
    """Traversal and absolute host paths reach nothing of the host."""
    secret = service_env.storage / "host-secret.txt"
    secret.write_text("host only")
    try:
        for path in (
            "../../etc/shadow",
            "/etc/shadow",
            str(secret),
            f"../../../../..{secret}",
            "/root/.bashrc",
        ):
            with pytest.raises((FileNotFound, PermissionDenied)):
                sandbox.fs.read_bytes(path)
        sandbox.sh(f"ln -s {secret} escape; ln -s ../../../../../../{secret} escape2")
        for link in ("escape", "escape2"):
            with pytest.raises(FileNotFound):
                sandbox.fs.read_text(link)
        # The same absolute path names a file of the sandbox's own (throwaway /var/tmp).
        sandbox.fs.write_text(str(secret), "sandbox copy")
        assert sandbox.fs.read_text(str(secret)) == "sandbox copy"
        assert secret.read_text() == "host only"
    finally:
        secret.unlink()


def test_download_cannot_write_outside_the_target(sandbox, tmp_path):
    """A symlink in the sandbox pointing at a local directory is not written through."""
    outside = tmp_path / "outside"
    outside.mkdir()
    sandbox.sh(
        f"mkdir -p tree && ln -s {outside} tree/link && mkdir -p tree/link2 && "
        "echo x > tree/link2/file"
    )
    sandbox.fs.download("tree", tmp_path / "got")
    assert os.readlink(tmp_path / "got" / "link") == str(outside)
    assert list(outside.iterdir()) == []


def test_large_upload_streams_without_buffering(service_env: ServiceEnv, tmp_path):
    """A 256 MiB round trip is byte-identical and the service's memory stays small."""
    with Sandbox.create(timeout="5m") as sb:
        big = tmp_path / "big.bin"
        with open(big, "wb") as f:
            for _ in range(256):
                f.write(os.urandom(MiB))
        before = _peak_rss(service_env.service_pid())
        sb.fs.upload(big, "big.bin")
        sb.fs.download("big.bin", tmp_path / "back.bin")
        grown = _peak_rss(service_env.service_pid()) - before
        assert _sha(big) == _sha(tmp_path / "back.bin")
        assert sb.sh("sha256sum big.bin").stdout.split()[0] == _sha(big)
        assert grown < 64 * MiB, f"service peak memory grew by {grown >> 20} MiB"


def _sha(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            digest.update(chunk)
    return digest.hexdigest()


def _peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")
