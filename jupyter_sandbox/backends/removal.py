"""Removing a tree a sandbox left behind, whatever its depth, width, modes or names.

The walk is iterative and descriptor-relative: one open directory at a time
(plus the parent of the tree), entries removed with ``dir_fd``, directories
opened with ``O_NOFOLLOW`` so no symlink is ever followed, and the way back up
through ``..`` checked against the device and inode recorded on the way down;
a filesystem mounted inside the tree is never entered.
Directories the sandbox made unreadable or unwritable are given back their
owner's permissions first. Names are passed back exactly as read, so newlines
and bytes that are not UTF-8 are no obstacle.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("jupyter_sandbox.service")

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
OWNER_ALL = stat.S_IRWXU


@dataclass
class _Level:
    """A directory on the way down: its name in its parent, identity, subdirectories left."""

    name: str
    identity: tuple[int, int]
    subdirs: list[str] = field(default_factory=list)


def remove_tree(path: Path, keep_last: str | None = None, attempts: int = 10) -> bool:
    """Remove `path` and everything below it; True once it is gone.

    With `keep_last`, that entry of `path` is removed only after everything else
    (a sandbox's manifest, so a removal cut short still shows whose tree it was).
    A removal that races with a last write is tried again; one that keeps failing
    is logged with its path and returns False, so the caller can try again later.
    """
    error: OSError | None = None
    for attempt in range(attempts):
        try:
            _remove(path, keep_last)
            return True
        except OSError as e:
            if not os.path.lexists(path):
                return True
            error = e
        time.sleep(min(0.01 * 2**attempt, 0.2))
    log.warning("could not remove %s (will try again later): %s", path, error)
    return False


def _remove(path: Path, keep_last: str | None) -> None:
    parent_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = _open_dir(parent_fd, path.name)
        top = _Level(path.name, _identity(fd))
        try:
            _clear(fd, top, skip=keep_last)
        except BaseException:
            os.close(fd)
            raise
        fd = _empty_below(fd, [top])
        try:
            if keep_last is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(keep_last, dir_fd=fd)
        finally:
            os.close(fd)
        os.rmdir(path.name, dir_fd=parent_fd)
    finally:
        os.close(parent_fd)


def _empty_below(fd: int, levels: list[_Level]) -> int:
    """Remove every subdirectory below the directory of `levels[0]`; return its fd.

    `fd` is the open directory of `levels[-1]`; only that one is open at any time.
    """
    try:
        while True:
            level = levels[-1]
            if level.subdirs:
                name = level.subdirs.pop()
                try:
                    child = _open_dir(fd, name)
                except FileNotFoundError:
                    continue
                except OSError as e:
                    if e.errno not in (errno.ENOTDIR, errno.ELOOP):
                        raise
                    os.unlink(name, dir_fd=fd)  # no longer a directory: a link or file now
                    continue
                os.close(fd)
                fd = child
                levels.append(_Level(name, _identity(fd)))
                if levels[-1].identity[0] != levels[0].identity[0]:
                    raise OSError(errno.EXDEV, "another filesystem is mounted here", name)
                _clear(fd, levels[-1])
                continue
            if len(levels) == 1:
                return fd
            levels.pop()
            parent = os.open("..", _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = parent
            if _identity(fd) != levels[-1].identity:
                raise OSError(errno.EXDEV, "a directory was moved during its removal")
            try:
                os.rmdir(level.name, dir_fd=fd)
            except FileNotFoundError:
                pass  # someone else removed it meanwhile
            except OSError as e:
                if e.errno != errno.ENOTEMPTY:
                    raise
                levels[-1].subdirs.append(level.name)  # written to meanwhile: once more
    except BaseException:
        os.close(fd)
        raise


def _clear(fd: int, level: _Level, skip: str | None = None) -> None:
    """Unlink every entry of `fd` that is not a directory; note the directories."""
    with os.scandir(fd) as entries:
        for entry in entries:
            if entry.name == skip:
                continue
            if entry.is_dir(follow_symlinks=False):
                level.subdirs.append(entry.name)
                continue
            try:
                os.unlink(entry.name, dir_fd=fd)
            except FileNotFoundError:
                pass
            except IsADirectoryError:  # replaced by a directory since it was read
                level.subdirs.append(entry.name)


def _open_dir(dir_fd: int, name: str) -> int:
    """Open a subdirectory without following links, making it fully usable by its owner."""
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except PermissionError:
        # Not readable (mode 000, 0100...): chmod it by name, never through a link.
        os.chmod(name, OWNER_ALL, dir_fd=dir_fd, follow_symlinks=False)
        fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    try:
        if os.fstat(fd).st_mode & OWNER_ALL != OWNER_ALL:
            with contextlib.suppress(PermissionError):
                os.fchmod(fd, OWNER_ALL)  # entries of a directory need its w and x to go
    except BaseException:
        os.close(fd)
        raise
    return fd


def _identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino
