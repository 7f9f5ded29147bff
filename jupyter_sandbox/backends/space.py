"""Room on the disk that holds sandboxes, and the DiskFull error that names that disk.

A sandbox needs a little of the storage disk to start (its directory, its generated
files, the filesystem of its home) and more to be of use. A start is refused with
DiskFull while less than MIN_FREE is free, and a start that runs out of space half
way is undone and reported the same way: the error says which disk, its size and
what is free, and what to do.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from .._durations import format_size as size
from .._errors import DiskFull

MIN_FREE = 16 << 20  # bytes a start needs free on the storage disk
MIN_FREE_FILES = 64  # and inodes
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def is_full(error: BaseException) -> bool:
    """Did `error` come from a full disk (no space, no inodes or over a quota)?"""
    return isinstance(error, DiskFull) or (
        isinstance(error, OSError) and error.errno in FULL_ERRNOS
    )


def has_room(storage: Path) -> bool:
    """Has the storage disk room for a new sandbox?"""
    stats = os.statvfs(storage)
    return stats.f_bavail * stats.f_frsize >= MIN_FREE and stats.f_favail >= MIN_FREE_FILES


def check_room(storage: Path) -> None:
    """Raise DiskFull unless the storage disk has room for a new sandbox."""
    if not has_room(storage):
        raise full_error(storage)


def full_error(storage: Path, home: int | None = None) -> DiskFull:
    """DiskFull for a sandbox that cannot be started because `storage` is full.

    `home`: the size of the home whose filesystem did not fit, when that is what failed.
    """
    step = f"; making the filesystem of a {size(home)} home ran out of it" if home else ""
    return DiskFull(
        f"no room for a new sandbox: the disk that holds sandboxes is full ({describe(storage)}"
        f"; a sandbox needs {size(MIN_FREE)} to start{step}). {_WHAT_TO_DO}, ask for a "
        "smaller disk=, or set JUPYTER_SANDBOX_DIR to a directory on a larger disk"
    )


def unsaved_error(storage: Path) -> DiskFull:
    """DiskFull for a change the service could not write down because `storage` is full."""
    return DiskFull(
        "the service could not save this change: the disk that holds sandboxes is full "
        f"({describe(storage)}). {_WHAT_TO_DO}, then try again"
    )


_WHAT_TO_DO = (
    "End sandboxes you no longer need (their homes are kept there), free space on that disk"
)


def describe(path: Path) -> str:
    """`path`, the filesystem it is on, its size and what is free, in words."""
    stats = os.statvfs(path)
    fs_type, mount = filesystem_of(path)
    free = stats.f_bavail * stats.f_frsize
    text = (
        f"{path}, on the {fs_type} filesystem mounted at {mount}: "
        f"{size(stats.f_blocks * stats.f_frsize)} in all, {size(free)} free"
    )
    if stats.f_files and stats.f_favail < MIN_FREE_FILES:
        text += f", {stats.f_favail} of {stats.f_files} inodes free (too many files)"
    return text


def filesystem_of(path: Path) -> tuple[str, str]:
    """(type, mount point) of the filesystem that holds `path`."""
    best = ("unknown", "/")
    real = os.path.realpath(path)
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                mount = fields[4].replace("\\040", " ")
                fs_type = fields[fields.index("-") + 1]
                inside = real == mount or real.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best[1]):
                    best = (fs_type, mount)
    except (OSError, ValueError, IndexError):
        pass
    return best
