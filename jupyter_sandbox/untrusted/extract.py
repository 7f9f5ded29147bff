"""Writing sandbox-made files and trees onto the host.

Every operation is relative to a directory descriptor opened with ``O_NOFOLLOW``,
so no link that already exists in the target, or that an earlier member made,
is ever followed. Files are written to ``O_EXCL|O_NOFOLLOW`` temp files with
unpredictable names and renamed into place. Only regular files, directories,
symlinks (recreated, never followed) and hard links to files this same download
wrote are made; modes are limited to ``0o777`` and the user's umask; owners
are never applied. Sizes and member counts are bounded; names are checked
component by component (``names``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .._errors import FileError
from . import names

MAX_MEMBERS = 1_000_000
MAX_HEADER = 1 << 20  # bytes of extended (pax, GNU long name) headers before one member
MAX_TRAILER = 1 << 20  # bytes after the end of an archive (tar pads to a record)
HELD_DIRECTORIES = 64  # open descriptors kept for the directory chain of a deep tree
COPY_CHUNK = 1 << 20

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def umask() -> int:
    """This process's umask, read without changing it (other threads may create files)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


def allowed_mode(mode: object) -> int:
    """At most the permission bits, within the umask: no set-id, no sticky bit."""
    return (mode if isinstance(mode, int) else 0o644) & 0o777 & ~umask()


def free_space(directory: str | os.PathLike) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def host_budget(directory_fd: int) -> int:
    """Bytes a download may write under `directory_fd`: the free space but a margin
    (a tenth of it, at most 1 GiB), so a sandbox never fills the host's disk."""
    free = free_space(directory_fd)
    return free - min(free // 10, 1 << 30)


def _temp_name(name: str) -> str:
    return f".{name[:64]}.{secrets.token_hex(8)}.part"


def open_directory(path: str | os.PathLike, parents: bool = False) -> int:
    """A descriptor of the directory `path`, which must not be a symlink itself."""
    if parents:
        Path(path).mkdir(parents=True, exist_ok=True)
    try:
        return os.open(path, _DIR_FLAGS)
    except OSError as e:
        raise FileError(
            f"cannot download into {path}: {e.strerror} (downloads never go through a symlink)"
        ) from None


@dataclass
class Limits:
    """Bounds of one download: `max_bytes` (what the sandbox can hold) within the
    target's ``host_budget``, and MAX_MEMBERS."""

    max_bytes: int | None = None
    max_members: int | None = None


def _budget(directory_fd: int, limits: Limits) -> int:
    budget = host_budget(directory_fd)
    return budget if limits.max_bytes is None else min(budget, limits.max_bytes)


# -- one file ------------------------------------------------------------------------


class FileDownload:
    """A sandbox file on its way to `target`, written to a private temp file.

    If `target` is a directory, the file goes into it under the last component of
    `remote`, the path the user asked for (the agent's name for the file is never
    used). The user named the destination either way, so an existing regular file
    there is replaced, as ``cp`` would; an existing symlink or directory is refused,
    never followed or replaced. At most `size` bytes are accepted, and exactly
    `size` must arrive before ``commit()`` renames the file into place.
    """

    def __init__(
        self, target: str | os.PathLike, info: dict[str, Any], remote: str, limits: Limits
    ) -> None:
        target = Path(target)
        self.size: int = info["size"]
        if info["type"] != "file":
            raise FileError(f"not a regular file in the sandbox: {info['path']}")
        if target.is_dir() and not target.is_symlink():
            directory, self.name = target, names.remote_name(remote)
        else:
            directory, self.name = target.parent, names.check_name(target.name, "target name")
        self.dir_fd = open_directory(directory)
        self.fd = -1
        try:
            self._check_destination()
            if self.size > _budget(self.dir_fd, limits):
                raise FileError(
                    f"{self.size} bytes are more than the sandbox can hold "
                    f"or than fit in the free space of {directory}"
                )
            self.tmp = _temp_name(self.name)
            self.fd = os.open(self.tmp, _NEW_FILE, allowed_mode(info["mode"]), dir_fd=self.dir_fd)
        except BaseException:
            self.close()
            raise
        self.path = directory / self.name
        self.written = 0

    def _check_destination(self) -> None:
        try:
            st = os.stat(self.name, dir_fd=self.dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISLNK(st.st_mode):
            raise FileError(f"{self.name} is a symlink: a download never writes through one")
        if stat.S_ISDIR(st.st_mode):
            raise FileError(f"{self.name} is a directory")

    def write(self, data: bytes) -> None:
        if self.written + len(data) > self.size:
            raise FileError(f"the sandbox sent more than the {self.size} bytes it announced")
        _write_all(self.fd, data)
        self.written += len(data)

    def commit(self) -> None:
        """Check the size that arrived and move the file into place."""
        written = os.fstat(self.fd).st_size
        if written != self.size:
            raise FileError(
                f"the sandbox sent {written} of the {self.size} bytes it announced for {self.name}"
            )
        self._check_destination()
        os.rename(self.tmp, self.name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
        self.tmp = None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            if self.tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(self.tmp, dir_fd=self.dir_fd)
        if self.dir_fd >= 0:
            os.close(self.dir_fd)
            self.dir_fd = -1

    def __enter__(self) -> FileDownload:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


# -- trees ---------------------------------------------------------------------------


class _BoundedTarInfo(tarfile.TarInfo):
    """Refuses what tarfile would otherwise read into memory unbounded."""

    def _proc_member(self, tar: tarfile.TarFile):  # tarfile's documented extension point
        if self.type in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, *_PAX):
            used = getattr(tar, "header_bytes", 0) + self.size
            if used > MAX_HEADER:
                raise FileError(f"archive headers over {MAX_HEADER} bytes for one member")
            tar.header_bytes = used
        else:
            tar.header_bytes = 0
        if self.type == tarfile.XGLTYPE:
            raise FileError("archives with global headers are not accepted")
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise FileError(f"sparse archive members are not accepted: {self.name[:200]}")
        return super()._proc_member(tar)


_PAX = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)


class _Cursor:
    """The directory a member goes into, reached from the root one component at a time.

    Each component is opened with O_NOFOLLOW relative to its parent; missing ones
    are created. Descriptors for the upper part of a deep chain are closed (at most
    HELD_DIRECTORIES stay open) and reopened the same way when needed again.
    """

    def __init__(self, root_fd: int) -> None:
        self.path: list[str] = []
        self.fds: list[int] = [root_fd]

    def enter(self, parts: list[str], create: bool = True) -> int:
        common = 0
        while common < min(len(self.path), len(parts)) and self.path[common] == parts[common]:
            common += 1
        self._truncate(common)
        fd = self._fd_at(common)
        for name in parts[common:]:
            fd = _open_subdir(fd, name, create, "/".join(parts))
            self.path.append(name)
            self.fds.append(fd)
            oldest = len(self.fds) - 1 - HELD_DIRECTORIES
            if oldest > 0 and self.fds[oldest] >= 0:
                os.close(self.fds[oldest])
                self.fds[oldest] = -1
        return fd

    def _truncate(self, depth: int) -> None:
        for fd in self.fds[depth + 1 :]:
            if fd >= 0:
                os.close(fd)
        del self.fds[depth + 1 :], self.path[depth:]

    def _fd_at(self, depth: int) -> int:
        if self.fds[depth] < 0:
            base = max(i for i in range(depth) if self.fds[i] >= 0)
            fd, opened = self.fds[base], []
            for name in self.path[base:depth]:
                fd = _open_subdir(fd, name, False, "/".join(self.path[:depth]))
                opened.append(fd)
            for extra in opened[:-1]:
                os.close(extra)
            self.fds[depth] = fd
        return self.fds[depth]

    def close(self) -> None:
        self._truncate(0)


def _open_subdir(parent: int, name: str, create: bool, member: str) -> int:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent)
    except FileNotFoundError:
        if not create:
            raise
    except OSError as e:
        raise FileError(
            f"archive member {member[:200]} goes through a symlink or a file: refused "
            f"({e.strerror})"
        ) from None
    os.mkdir(name, 0o700, dir_fd=parent)
    return os.open(name, _DIR_FLAGS, dir_fd=parent)


class TreeExtraction:
    """Unpacks one tar stream from a sandbox under a host directory, member by member."""

    def __init__(self, root_fd: int, limits: Limits) -> None:
        self.cursor = _Cursor(root_fd)
        self.budget = _budget(root_fd, limits)
        self.members_left = limits.max_members or MAX_MEMBERS
        self.mask = umask()
        self.files: dict[tuple[str, ...], tuple[int, int]] = {}  # written here: (dev, inode)
        self.modes_later: list[tuple[list[str], int]] = []
        self.skipped: list[str] = []

    def add(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        self.members_left -= 1
        if self.members_left < 0:
            raise FileError("the archive from the sandbox has too many members")
        parts = names.member_parts(member.name)
        key = tuple(parts)
        self.files.pop(key, None)
        if member.isdir():
            self._directory(parts, member.mode)
        elif member.isreg():
            self._file(parts, member, tar)
        elif member.issym():
            self._place(
                parts,
                lambda fd, tmp: os.symlink(
                    names.check_link_target(member.linkname), tmp, dir_fd=fd
                ),
            )
        elif member.islnk():
            self._hard_link(parts, member.linkname)
        elif member.ischr() or member.isblk() or member.isfifo():
            self.skipped.append(member.name[:200])
        else:
            raise FileError(f"unsupported archive member type {member.type!r}: {member.name[:200]}")

    def _directory(self, parts: list[str], mode: int) -> None:
        parent = self.cursor.enter(parts[:-1])
        name = parts[-1]
        with contextlib.suppress(FileNotFoundError):
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):  # a link or file an earlier download left
                os.unlink(name, dir_fd=parent)
        fd = self.cursor.enter(parts)
        wanted = mode & 0o777 & ~self.mask
        os.chmod(fd, wanted | 0o700)
        if wanted & 0o700 != 0o700:
            self.modes_later.append((parts, wanted))

    def _file(self, parts: list[str], member: tarfile.TarInfo, tar: tarfile.TarFile) -> None:
        if member.size > self.budget:
            raise FileError("the tree from the sandbox is larger than its download may be")
        self.budget -= member.size
        source = tar.extractfile(member)

        def write(fd: int, tmp: str) -> None:
            out = os.open(tmp, _NEW_FILE, member.mode & 0o777, dir_fd=fd)
            try:
                while data := source.read(COPY_CHUNK):
                    _write_all(out, data)
                with contextlib.suppress(OSError, OverflowError, ValueError):
                    os.utime(out, (member.mtime, member.mtime))
            finally:
                os.close(out)

        st = self._place(parts, write)
        self.files[tuple(parts)] = (st.st_dev, st.st_ino)

    def _hard_link(self, parts: list[str], linkname: str) -> None:
        source = names.member_parts(linkname)
        known = self.files.get(tuple(source))
        if known is None:
            raise FileError(
                f"hard link {'/'.join(parts)[:200]} does not point to a file of this download"
            )
        source_dir = os.dup(self.cursor.enter(source[:-1], create=False))
        try:
            st = os.stat(source[-1], dir_fd=source_dir, follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != known:
                raise FileError(f"hard link target changed during the download: {linkname}")
            self._place(
                parts,
                lambda fd, tmp: os.link(
                    source[-1], tmp, src_dir_fd=source_dir, dst_dir_fd=fd, follow_symlinks=False
                ),
            )
        finally:
            os.close(source_dir)
        self.files[tuple(parts)] = known

    def _place(self, parts: list[str], make) -> os.stat_result:
        """Make the entry under a fresh temp name, then rename it over `parts`."""
        parent = self.cursor.enter(parts[:-1])
        tmp = _temp_name(parts[-1])
        try:
            make(parent, tmp)
            st = os.stat(tmp, dir_fd=parent, follow_symlinks=False)
            os.rename(tmp, parts[-1], src_dir_fd=parent, dst_dir_fd=parent)
        except BaseException as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=parent)
            if isinstance(e, (IsADirectoryError, NotADirectoryError)):
                raise FileError(f"cannot replace a directory: {'/'.join(parts)[:200]}") from None
            raise
        return st

    def finish(self) -> None:
        """Apply the modes that would have locked extraction out of a directory."""
        for parts, mode in sorted(self.modes_later, key=lambda item: -len(item[0])):
            os.chmod(self.cursor.enter(parts, create=False), mode)
        self.cursor.close()


def extract_tree(source: IO[bytes], target: str | os.PathLike, limits: Limits | None = None) -> int:
    """Unpack a tar stream from a sandbox into `target`; the number of members.

    Devices and FIFOs are skipped and named in the FileError raised at the end.
    """
    root_fd = open_directory(target, parents=True)
    extraction = TreeExtraction(root_fd, limits or Limits())
    count = 0
    try:
        with tarfile.open(fileobj=source, mode="r|", tarinfo=_BoundedTarInfo) as tar:
            while (member := tar.next()) is not None:
                tar.members.clear()  # tarfile would keep every member's header
                extraction.add(tar, member)
                count += 1
        _drain(source)
        extraction.finish()
    except FileError:
        raise
    except tarfile.TarError as e:
        raise FileError(f"the archive from the sandbox is malformed: {e}") from None
    except OSError as e:
        raise FileError(f"writing the download failed: {e}") from None
    except RecursionError:
        raise FileError("the archive from the sandbox nests its headers too deeply") from None
    finally:
        extraction.cursor.close()
        os.close(root_fd)
    if extraction.skipped:
        raise FileError(
            f"skipped {len(extraction.skipped)} device or FIFO file(s) a download never "
            f"creates: {', '.join(extraction.skipped[:10])}"
        )
    return count


def _drain(source: IO[bytes]) -> None:
    """Read the padding after the last member; a sandbox may not send more than that."""
    left = MAX_TRAILER
    while data := source.read(1 << 16):
        left -= len(data)
        if left < 0:
            raise FileError("the sandbox kept sending after the end of the archive")
