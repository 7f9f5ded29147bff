"""File operations and tar streams, on paths as the sandbox user means them."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import subprocess
import threading

import protocol
from channel import AgentError, Channel, FrameReader, FrameWriter
from protocol import CHUNK, Frame

PIPE_CHUNK = 1 << 20
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# Free bytes of the host's disk below which an upload into a home of its own (a sparse
# image on that disk) is synced before it counts: the image may outgrow what is free,
# and bytes its filesystem took but the disk could not would be lost unseen.
HOST_NEARLY_FULL = 256 << 20
HOST_FULL = 1 << 20  # free bytes of the host's disk below which it, not a quota, is full
# A directory on the host disk that holds this sandbox (the agent's state directory, a
# descriptor set at start): its free space is that disk's, whatever the home is.
host_disk: int | None = None
# How the agent starts a helper process of its own (set by the agent from its isolation).
own_popen = subprocess.Popen


def resolve(path: str) -> str:
    """A path as the sandbox user means it: relative to the home directory."""
    if not isinstance(path, str) or "\x00" in path:
        raise AgentError("BadRequest", "path must be a string without NUL bytes")
    return os.path.normpath(os.path.join(protocol.SANDBOX_HOME, os.path.expanduser(path)))


def describe(path: str) -> dict:
    return _describe(path, os.lstat(path))


def _describe(path: str, st: os.stat_result) -> dict:
    kind = (
        "dir"
        if stat.S_ISDIR(st.st_mode)
        else "file"
        if stat.S_ISREG(st.st_mode)
        else "symlink"
        if stat.S_ISLNK(st.st_mode)
        else "other"
    )
    return {
        "name": os.path.basename(path) or path,
        "path": path,
        "type": kind,
        "size": st.st_size,
        "mode": stat.S_IMODE(st.st_mode),
        "mtime": st.st_mtime,
        "target": os.readlink(path) if kind == "symlink" else None,
    }


def open_regular(path: str) -> tuple[int, dict]:
    """Open a regular file for reading, or fail at once (a FIFO or device would block)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise AgentError("FileError", f"not a regular file: {path}")
        os.set_blocking(fd, True)
        return fd, _describe(path, st)
    except BaseException:
        os.close(fd)
        raise


def op_stat(channel: Channel, path: str) -> None:
    channel.send_json(Frame.RESULT, describe(resolve(path)))


def op_list(channel: Channel, path: str) -> None:
    base = resolve(path)
    entries = []
    with os.scandir(base) as it:
        for item in it:
            entries.append(describe(item.path))
    entries.sort(key=lambda e: e["name"])
    channel.send_json(Frame.RESULT, {"entries": entries})


def op_mkdir(
    channel: Channel, path: str, parents: bool = True, exist_ok: bool = True, mode: int = 0o755
) -> None:
    target = resolve(path)
    if parents:
        os.makedirs(target, mode, exist_ok=exist_ok)
    else:
        os.mkdir(target, mode)
    channel.send_json(Frame.RESULT, describe(target))


def op_remove(channel: Channel, path: str, recursive: bool = False) -> None:
    target = resolve(path)
    if os.path.isdir(target) and not os.path.islink(target):
        if recursive:
            import shutil  # imported on use: agent start-up time counts

            shutil.rmtree(target)
        else:
            os.rmdir(target)
    else:
        os.unlink(target)
    channel.send_json(Frame.RESULT, {})


def op_rename(channel: Channel, src: str, dst: str) -> None:
    target = resolve(dst)
    os.replace(resolve(src), target)
    channel.send_json(Frame.RESULT, describe(target))


def op_read(channel: Channel, path: str, pipe: bool = False) -> None:
    """Send a file: as DATA frames, or with `pipe` into a pipe the client passes."""
    fd, info = open_regular(resolve(path))
    with os.fdopen(fd, "rb") as f:
        channel.send_json(Frame.RESULT, info)
        if pipe:
            out = channel.receive_pipe()
            try:
                while os.sendfile(out, fd, None, PIPE_CHUNK):
                    pass
            finally:
                os.close(out)
        else:
            while data := f.read(CHUNK):
                channel.send(Frame.DATA, data)
    channel.send(Frame.END)


def op_write(
    channel: Channel,
    path: str,
    mode: int | None = None,
    parents: bool = True,
    pipe: bool = False,
) -> None:
    """Receive a file into `path`, atomically: DATA frames until END, or a pipe."""
    target = resolve(path)
    directory = os.path.dirname(target)
    if parents:
        os.makedirs(directory, exist_ok=True)
    if os.path.isdir(target):
        raise AgentError("FileError", f"is a directory: {path}")
    with replacing(target) as f:
        if pipe:
            source = channel.receive_pipe()
            try:
                write_with_fresh_process(source, f.fileno(), target)
            finally:
                os.close(source)
        else:
            for data in channel.data_frames():
                f.write(data)
        os.fchmod(f.fileno(), 0o644 if mode is None else int(mode) & 0o7777)
    channel.send_json(Frame.RESULT, describe(target))


@contextlib.contextmanager
def replacing(target: str):
    """A new file (open for writing) that becomes `target` only once it is complete.

    Until then `target` keeps what it had; a write that fails (a full disk) leaves no
    part of the new file behind. Synced first where the host's disk is nearly full.
    """
    directory, name = os.path.split(target)
    tmp = os.path.join(directory, f".{name}.upload-{os.getpid()}-{threading.get_ident()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            settle(fd)
        os.replace(tmp, target)
    except OSError as e:
        _unlink_quietly(tmp)
        if e.errno in FULL_ERRNOS and e.filename is None:  # a write: say where it went
            raise OSError(e.errno, e.strerror, target) from None
        raise
    except BaseException:
        _unlink_quietly(tmp)
        raise


def op_tar_out(channel: Channel, path: str, pipe: bool = False) -> None:
    """Send `path` (file or tree) as a tar stream; symlinks stay symlinks."""
    target = resolve(path)
    channel.send_json(Frame.RESULT, describe(target))
    writer = os.fdopen(channel.receive_pipe(), "wb") if pipe else FrameWriter(channel)
    import tarfile  # imported on use: agent start-up time counts

    with tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        if os.path.isdir(target) and not os.path.islink(target):
            for full, name in tree_entries(target):
                tar.add(full, arcname=name, recursive=False)
        else:
            tar.add(target, arcname=os.path.basename(target), recursive=False)
    writer.flush()
    if pipe:
        writer.close()
    channel.send(Frame.END)


def tree_entries(root: str):
    """(path, name relative to `root`) of everything below `root`, parents first.

    The walk keeps its own stack, so a tree of any depth goes out (tarfile's
    recursive add stops at Python's recursion limit); symlinks are never entered.
    """
    stack = [("", root)]
    while stack:
        prefix, directory = stack.pop()
        for name in sorted(os.listdir(directory)):
            full, relative = os.path.join(directory, name), prefix + name
            yield full, relative
            if os.path.isdir(full) and not os.path.islink(full):
                stack.append((relative + "/", full))


def op_tar_in(channel: Channel, path: str, pipe: bool = False) -> None:
    """Unpack a tar stream into directory `path`, refusing names that leave it."""
    root = resolve(path)
    os.makedirs(root, exist_ok=True)
    reader = os.fdopen(channel.receive_pipe(), "rb") if pipe else FrameReader(channel)
    count = 0
    import tarfile

    try:
        with tarfile.open(fileobj=reader, mode="r|") as tar:
            for member in tar:
                protocol.check_tar_member(root, member)
                if member.isfile():
                    _extract_file(tar, member, os.path.join(root, os.path.normpath(member.name)))
                else:
                    tar.extract(member, root, set_attrs=not member.issym())
                count += 1
    except tarfile.TarError as e:
        raise AgentError("BadRequest", f"the upload is not a tar stream ({e})") from None
    drain(reader)
    if pipe:
        reader.close()
    channel.send_json(Frame.RESULT, {"files": count})


def _extract_file(tar, member, target: str) -> None:
    """A file of a tar stream, written whole or not at all (an earlier file there stays)."""
    os.makedirs(os.path.dirname(target), exist_ok=True)
    source = tar.extractfile(member)
    with replacing(target) as f:
        while data := source.read(CHUNK):
            f.write(data)
        os.fchmod(f.fileno(), member.mode & 0o7777)
        with contextlib.suppress(OSError, OverflowError, ValueError):  # as tarfile does
            os.utime(f.fileno(), (member.mtime, member.mtime))


def write_with_fresh_process(source: int, target: int, path: str) -> None:
    """Copy a pipe into the file `path` (open as `target`) with a short-lived `cat`.

    Linux throttles a process by how many pages it has dirtied so far, so a
    long-lived agent writing its third large upload crawls at the disk's pace
    while a fresh process writes into the page cache at memory speed.
    """
    cat = own_popen(["cat"], stdin=source, stdout=target, stderr=subprocess.PIPE)
    _, errors = cat.communicate()
    if cat.returncode:
        output = errors.decode(errors="replace").strip()
        for code in FULL_ERRNOS:  # cat says why in the sandbox's C.UTF-8 locale
            if os.strerror(code) in output:
                raise OSError(code, os.strerror(code), path)
        raise AgentError("FileError", output)


def settle(fd: int) -> None:
    """Sync a file just written into a home of its own while the host's disk is nearly full.

    A write failing there for want of disk then fails here, before it counts; with
    room on the host, nothing waits.
    """
    if host_disk is None or not _home_has_own_disk():
        return
    host = os.fstatvfs(host_disk)
    if host.f_bavail * host.f_frsize < HOST_NEARLY_FULL:
        os.fsync(fd)


def _home_has_own_disk() -> bool:
    return (
        host_disk is not None
        and os.fstat(host_disk).st_dev != os.stat(protocol.SANDBOX_HOME).st_dev
    )


def full_message(path: str | None) -> str:
    """What a write to `path` filled (it failed with ENOSPC or EDQUOT) and what to do."""
    try:
        return _full_message(path)
    except OSError:
        return f"no space left on the disk that holds {path}: remove files, then try again"


def _full_message(path: str | None) -> str:
    sandbox = socket.gethostname()
    home = protocol.SANDBOX_HOME
    where = _existing(path or home)
    if os.stat(where).st_dev != os.stat(home).st_dev:
        fs = os.statvfs(where)
        total = _size(fs.f_blocks * fs.f_frsize)
        return (
            f"{_mount_point(where)} of sandbox {sandbox} is full ({total}{_no_inodes(fs)}): "
            f"remove files there, or write into the home ({home}) instead"
        )
    fs = os.statvfs(home)
    total, free = fs.f_blocks * fs.f_frsize, fs.f_bavail * fs.f_frsize
    if not _home_has_own_disk():
        return (
            f"the home of sandbox {sandbox} is full: it has no quota of its own, and the "
            f"host's disk that holds it is full ({_size(total)} in all, {_size(free)} free"
            f"{_no_inodes(fs)}): remove files, end sandboxes you no longer need, or free "
            "space on the host"
        )
    host = os.fstatvfs(host_disk)
    if host.f_bavail * host.f_frsize < HOST_FULL:  # the disk under the home's image is full
        return (
            f"the host's disk that holds sandbox {sandbox} is full ("
            f"{_size(host.f_bavail * host.f_frsize)} free), before the home's {_size(total)} "
            "quota was reached: this write did not happen. End sandboxes you no longer need "
            "or free space on the host, then write again"
        )
    return (
        f"the home of sandbox {sandbox} is full (its {_size(total)} quota{_no_inodes(fs)}): "
        "remove files, or create the sandbox with a larger disk="
    )


def read_only_home(path: str | None) -> str | None:
    """Why a write to `path` met a read-only home, if its filesystem turned read-only.

    The home is mounted writable; a home of its own refuses writes to what is in it
    only once its image could not be written (the host's disk under it was full, its
    journal stopped; the mount still says writable): its files can still be read.
    The home directory itself is an entry of the read-only /home.
    """
    try:
        home = protocol.SANDBOX_HOME
        if (
            not os.path.normpath(path or "/").startswith(home + "/")  # the home itself: /home's
            or not _home_has_own_disk()
            or os.stat(_existing(path)).st_dev != os.stat(home).st_dev
        ):
            return None
        host = os.fstatvfs(host_disk)
    except OSError:
        return None
    return (
        f"the home of sandbox {socket.gethostname()} turned read-only: the host's disk "
        f"under it filled up (it has {_size(host.f_bavail * host.f_frsize)} free now). Its "
        "files can still be read and downloaded: download what you need and create a new "
        "sandbox once the host has room"
    )


def _no_inodes(fs: os.statvfs_result) -> str:
    return ", no inodes left for new files" if fs.f_files and not fs.f_favail else ""


def _existing(path: str) -> str:
    """`path`, or its nearest ancestor that exists."""
    while not os.path.lexists(path) and path != os.path.dirname(path):
        path = os.path.dirname(path)
    return path


def _mount_point(path: str) -> str:
    path = os.path.realpath(path)
    while path != "/" and os.stat(os.path.dirname(path)).st_dev == os.stat(path).st_dev:
        path = os.path.dirname(path)
    return path


def _size(size: float) -> str:
    """Bytes in binary units, as the host's ``format_size`` (the agent imports none)."""
    for power, unit in ((4, "TiB"), (3, "GiB"), (2, "MiB"), (1, "KiB")):
        value = size / 1024**power
        if value >= 1:
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    count = int(size)
    return "1 byte" if count == 1 else f"{count} bytes"


def drain(reader) -> None:
    """Read a stream to its end (tar leaves padding behind the last member)."""
    while reader.read(CHUNK):
        pass


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
