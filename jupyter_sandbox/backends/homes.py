"""Disk quotas for sandbox homes: each home is an ext4 image of its own, loop-mounted.

Project quotas would need the storage filesystem mounted with ``prjquota``, which
cannot be turned on under a running host. A sparse image per sandbox bounds its
home instead: it costs disk only for what is written (``discard`` gives freed
blocks back to the host), takes a few ms to make, and a full home fails with
ENOSPC inside the sandbox while the host disk stays free. Only root can mount it;
an unprivileged service keeps plain directories and says so.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

IMAGE = "home.img"
SYSTEM_PATH = "/usr/sbin:/sbin:/usr/bin:/bin"
MKFS = shutil.which("mkfs.ext4", path=SYSTEM_PATH)
MOUNT = shutil.which("mount", path=SYSTEM_PATH)
UMOUNT = shutil.which("umount", path=SYSTEM_PATH)


def unavailable(privileged: bool) -> str | None:
    """Why homes cannot get a quota here, or None when they can."""
    if not privileged:
        return "only a service running as root can mount a home of limited size"
    if not (MKFS and MOUNT and UMOUNT):
        return "mkfs.ext4, mount or umount is missing (apt-get install e2fsprogs mount)"
    if not os.path.exists("/dev/loop-control"):
        return "this host has no loop devices (/dev/loop-control)"
    return None


def has_image(home: Path) -> bool:
    """Was `home` given an image of its own (by `mount_home`)?"""
    return (home.parent / IMAGE).is_file()


def mount_home(home: Path, size: int, owner: int) -> None:
    """Make the empty directory `home` an ext4 filesystem of `size` bytes owned by `owner`.

    A home that has its image already (its sandbox starts again) mounts that image,
    files and all; its size stays the one it was made with.
    """
    image = home.parent / IMAGE
    if has_image(home):
        if not os.path.ismount(home):
            _mount(home)
        return
    fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    options = f"lazy_itable_init=1,lazy_journal_init=1,root_owner={owner}:{owner}"
    _run([MKFS, "-q", "-F", "-m", "0", "-E", options, IMAGE], home.parent)
    _mount(home)
    os.rmdir(home / "lost+found")
    os.chmod(home, 0o700)


def _mount(home: Path) -> None:
    _run([MOUNT, "-o", "loop,nosuid,nodev,discard", IMAGE, home.name], home.parent)


def unmount_home(home: Path) -> None:
    """Detach a home mounted by `mount_home` (lazily, should anything still hold it)."""
    if os.path.ismount(home):
        _run([UMOUNT, "--lazy", home.name], home.parent)


def _run(argv: list[str | None], cwd: Path) -> None:
    """Run a tool in the sandbox's directory, naming its files relative to it.

    Relative names keep the storage path out of the tool's command line, where
    anything that looks for a sandbox's processes by their arguments would find it.
    """
    try:
        subprocess.run(argv, check=True, capture_output=True, timeout=60, cwd=cwd)
    except subprocess.CalledProcessError as e:
        raise OSError(f"{argv[0]} failed: {e.stderr.decode(errors='replace').strip()}") from None
