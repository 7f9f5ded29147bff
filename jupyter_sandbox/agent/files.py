"""File operations and tar streams, on paths as the sandbox user means them."""

from __future__ import annotations

import os
import stat
import subprocess
import threading

import protocol
from channel import AgentError, Channel, FrameReader, FrameWriter
from protocol import CHUNK, Frame

PIPE_CHUNK = 1 << 20


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
    tmp = os.path.join(
        directory, f".{os.path.basename(target)}.upload-{os.getpid()}-{threading.get_ident()}"
    )
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            if pipe:
                source = channel.receive_pipe()
                try:
                    write_with_fresh_process(source, fd)
                finally:
                    os.close(source)
            else:
                for data in channel.data_frames():
                    f.write(data)
        os.chmod(tmp, 0o644 if mode is None else int(mode) & 0o7777)
        os.replace(tmp, target)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    channel.send_json(Frame.RESULT, describe(target))


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

    with tarfile.open(fileobj=reader, mode="r|") as tar:
        for member in tar:
            protocol.check_tar_member(root, member)
            tar.extract(member, root, set_attrs=not member.issym())
            count += 1
    drain(reader)
    if pipe:
        reader.close()
    channel.send_json(Frame.RESULT, {"files": count})


def write_with_fresh_process(source: int, target: int) -> None:
    """Copy a pipe into a file with a short-lived `cat`.

    Linux throttles a process by how many pages it has dirtied so far, so a
    long-lived agent writing its third large upload crawls at the disk's pace
    while a fresh process writes into the page cache at memory speed.
    """
    done = subprocess.run(["cat"], stdin=source, stdout=target, stderr=subprocess.PIPE)
    if done.returncode:
        raise AgentError("FileError", done.stderr.decode(errors="replace").strip())


def drain(reader) -> None:
    """Read a stream to its end (tar leaves padding behind the last member)."""
    while reader.read(CHUNK):
        pass


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
