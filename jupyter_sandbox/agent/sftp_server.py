"""A built-in SFTP server (protocol version 3, as OpenSSH's clients speak it; stdlib only).

Run inside the sandbox as the sandbox user, on stdin and stdout, where the host has no
OpenSSH ``sftp-server``: ``python3 -E -s -S -B sftp_server.pyc``. It serves the requests
and extensions that ``sftp``, ``scp`` (SFTP mode) and other clients use, with OpenSSH's
status codes, limits (packets up to 256 KiB; reads and writes up to 255 KiB) and quirks
(SYMLINK takes the target first; RENAME never replaces a file).

Requests are answered in order. Everything that arrived in one read is served before the
replies go out in one write, so the many READ and WRITE requests a client keeps in flight
cost one system call each way per batch; input and READ data go through buffers that are
reused, not allocated per request. It is not a boundary (it has the user's rights,
nothing more): a malformed request gets a "Bad message" status, an oversized packet ends
the session.
"""

from __future__ import annotations

import errno
import fcntl
import grp
import os
import pwd
import stat
import struct
import sys
import time

VERSION = 3
MAX_PACKET = 256 * 1024  # OpenSSH's SFTP_MAX_MSG_LENGTH: larger packets end the session
MAX_IO = MAX_PACKET - 1024  # bytes per READ reply and per WRITE, as OpenSSH's limits say
MAX_HANDLES = 1024
READDIR_BATCH = 100  # names per READDIR reply, as OpenSSH
READ_SIZE = 1 << 20
FLUSH_SIZE = 1 << 20  # replies waiting before they are written out
IOV_MAX = 1024
PIPE_SIZE = 1 << 20
F_SETPIPE_SZ = 1031

# Packet types.
INIT, VERSION_REPLY, OPEN, CLOSE, READ, WRITE, LSTAT, FSTAT = 1, 2, 3, 4, 5, 6, 7, 8
SETSTAT, FSETSTAT, OPENDIR, READDIR, REMOVE, MKDIR, RMDIR = 9, 10, 11, 12, 13, 14, 15
REALPATH, STAT, RENAME, READLINK, SYMLINK = 16, 17, 18, 19, 20
STATUS, HANDLE, DATA, NAME, ATTRS, EXTENDED, EXTENDED_REPLY = 101, 102, 103, 104, 105, 200, 201

# Status codes and OpenSSH's words for them.
OK, EOF, NO_SUCH_FILE, PERMISSION_DENIED, FAILURE, BAD_MESSAGE = 0, 1, 2, 3, 4, 5
OP_UNSUPPORTED = 8
MESSAGES = {
    OK: "Success",
    EOF: "End of file",
    NO_SUCH_FILE: "No such file",
    PERMISSION_DENIED: "Permission denied",
    FAILURE: "Failure",
    BAD_MESSAGE: "Bad message",
    OP_UNSUPPORTED: "Operation unsupported",
}
ERRNO_STATUS = {
    errno.ENOENT: NO_SUCH_FILE,
    errno.ENOTDIR: NO_SUCH_FILE,
    errno.EBADF: NO_SUCH_FILE,
    errno.ELOOP: NO_SUCH_FILE,
    errno.EPERM: PERMISSION_DENIED,
    errno.EACCES: PERMISSION_DENIED,
    errno.EFAULT: PERMISSION_DENIED,
    errno.ENAMETOOLONG: BAD_MESSAGE,
    errno.EINVAL: BAD_MESSAGE,
    errno.ENOSYS: OP_UNSUPPORTED,
}

# OPEN flags and attribute flags.
FXF_READ, FXF_WRITE, FXF_APPEND, FXF_CREAT, FXF_TRUNC, FXF_EXCL = 1, 2, 4, 8, 0x10, 0x20
ATTR_SIZE, ATTR_UIDGID, ATTR_PERMISSIONS, ATTR_ACMODTIME = 1, 2, 4, 8
ATTR_EXTENDED = 0x80000000
ATTR_ALL = ATTR_SIZE | ATTR_UIDGID | ATTR_PERMISSIONS | ATTR_ACMODTIME

# Extensions as OpenSSH's server announces them (name, version), and their handlers.
EXTENSIONS = {
    b"posix-rename@openssh.com": (b"1", "posix_rename"),
    b"statvfs@openssh.com": (b"2", "statvfs"),
    b"fstatvfs@openssh.com": (b"2", "fstatvfs"),
    b"hardlink@openssh.com": (b"1", "hardlink"),
    b"fsync@openssh.com": (b"1", "fsync"),
    b"lsetstat@openssh.com": (b"1", "lsetstat"),
    b"limits@openssh.com": (b"1", "limits"),
    b"expand-path@openssh.com": (b"1", "expand_path"),
    b"copy-data": (b"1", "copy_data"),
    b"home-directory": (b"1", "home_directory"),
    b"users-groups-by-id@openssh.com": (b"1", "users_groups_by_id"),
}

U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
REPLY_HEAD = struct.Struct(">IBI")  # length, type, id
DATA_HEAD = struct.Struct(">IBII")  # length, DATA, id, data length
STATUS_HEAD = struct.Struct(">IBII")  # length, STATUS, id, code
ATTRS_FULL = struct.Struct(">IQIIIII")  # flags, size, uid, gid, mode, atime, mtime
HALF_YEAR = 365 * 24 * 3600 // 2


class BadMessage(Exception):
    """A request that does not parse."""


class Reader:
    """The fields of one request, read in order; running past its end is a BadMessage."""

    __slots__ = ("data", "pos")

    def __init__(self, data: memoryview, pos: int = 0) -> None:
        self.data, self.pos = data, pos

    def _number(self, layout: struct.Struct) -> int:
        try:
            (value,) = layout.unpack_from(self.data, self.pos)
        except struct.error:
            raise BadMessage from None
        self.pos += layout.size
        return value

    def u32(self) -> int:
        return self._number(U32)

    def u64(self) -> int:
        return self._number(U64)

    def view(self) -> memoryview:
        size = self.u32()
        end = self.pos + size
        if end > len(self.data):
            raise BadMessage
        value, self.pos = self.data[self.pos : end], end
        return value

    def string(self) -> bytes:
        return bytes(self.view())

    def path(self) -> bytes:
        """A path; the empty path is the current directory, as for OpenSSH."""
        value = self.string()
        if b"\0" in value:
            raise BadMessage
        return value or b"."

    def attrs(self) -> dict:
        """The attributes a client sets: only the fields it sent."""
        flags = self.u32()
        out: dict = {}
        if flags & ATTR_SIZE:
            out["size"] = self.u64()
        if flags & ATTR_UIDGID:
            out["uid"], out["gid"] = self.u32(), self.u32()
        if flags & ATTR_PERMISSIONS:
            out["mode"] = self.u32() & 0o7777
        if flags & ATTR_ACMODTIME:
            out["times"] = (self.u32(), self.u32())
        if flags & ATTR_EXTENDED:
            for _ in range(self.u32()):
                self.view(), self.view()
        return out


def string(value: bytes) -> bytes:
    return U32.pack(len(value)) + value


def encode_attrs(st: os.stat_result) -> bytes:
    return ATTRS_FULL.pack(
        ATTR_ALL,
        st.st_size,
        st.st_uid,
        st.st_gid,
        st.st_mode,
        int(st.st_atime) & 0xFFFFFFFF,
        int(st.st_mtime) & 0xFFFFFFFF,
    )


NO_ATTRS = U32.pack(0)


def long_name(name: bytes, st: os.stat_result, now: float) -> bytes:
    """The ``ls -l`` line OpenSSH's server sends with each directory entry."""
    recent = now - HALF_YEAR < st.st_mtime <= now
    when = time.strftime("%b %e %H:%M" if recent else "%b %e  %Y", time.localtime(st.st_mtime))
    user, group = _user_name(st.st_uid), _group_name(st.st_gid)
    line = (
        f"{stat.filemode(st.st_mode)}  {st.st_nlink:3d} {user:<8} {group:<8} "
        f"{st.st_size:8d} {when} "
    )
    return line.encode() + name


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


class Handle:
    """An open file, or a directory being listed."""

    __slots__ = ("append", "entries", "fd")

    def __init__(self, fd: int = -1, append: bool = False, entries=None) -> None:
        self.fd, self.append, self.entries = fd, append, entries

    def close(self) -> None:
        if self.entries is not None:
            self.entries.close()
        else:
            os.close(self.fd)


class Directory:
    """The entries of an open directory, "." and ".." first, as readdir(3) gives them."""

    def __init__(self, path: bytes) -> None:
        self.path = path
        self.scan = os.scandir(path)
        self.dots = [b".", b".."]

    def next_batch(self) -> list[tuple[bytes, os.stat_result]]:
        batch = []
        while self.dots and len(batch) < READDIR_BATCH:
            name = self.dots.pop(0)
            try:
                batch.append((name, os.lstat(os.path.join(self.path, name))))
            except OSError:
                pass
        for entry in self.scan:
            try:
                batch.append((entry.name, entry.stat(follow_symlinks=False)))
            except OSError:
                continue  # gone since it was listed
            if len(batch) >= READDIR_BATCH:
                break
        return batch

    def close(self) -> None:
        self.scan.close()


class Server:
    """Answers requests; each handler returns the reply's bytes, or its parts in a list."""

    def __init__(self) -> None:
        self.handles: dict[int, Handle] = {}
        # READ replies carry buffers of their own, used again once the replies are out.
        self.spare: list[bytearray] = []
        self.lent: list[bytearray] = []
        self.next_handle = 0
        self.ops = {
            OPEN: self.open,
            CLOSE: self.close,
            READ: self.read,
            WRITE: self.write,
            LSTAT: self.lstat,
            FSTAT: self.fstat,
            SETSTAT: self.setstat,
            FSETSTAT: self.fsetstat,
            OPENDIR: self.opendir,
            READDIR: self.readdir,
            REMOVE: self.remove,
            MKDIR: self.mkdir,
            RMDIR: self.rmdir,
            REALPATH: self.realpath,
            STAT: self.stat,
            RENAME: self.rename,
            READLINK: self.readlink,
            SYMLINK: self.symlink,
            EXTENDED: self.extended,
        }
        self.extensions = {name: getattr(self, op) for name, (_, op) in EXTENSIONS.items()}

    def replies_sent(self) -> None:
        """The replies handed out so far are written: their buffers can be reused."""
        self.spare += self.lent
        self.lent.clear()

    # -- dispatch ----------------------------------------------------------------------

    def handle(self, packet: memoryview, out: list) -> None:
        """Serve one packet (type and payload), appending its reply to `out`."""
        if len(packet) < 5:
            if len(packet) and packet[0] == INIT:  # a version we do not read: answer anyway
                out.append(self.version())
            return
        kind = packet[0]
        if kind == INIT:
            out.append(self.version())
            return
        (request_id,) = U32.unpack_from(packet, 1)
        op = self.ops.get(kind)
        if op is None:
            out.append(status(request_id, OP_UNSUPPORTED))
            return
        try:
            reply = op(request_id, Reader(packet, 5))
        except BadMessage:
            reply = status(request_id, BAD_MESSAGE)
        except OSError as e:
            reply = os_status(request_id, e)
        except (ValueError, OverflowError, UnicodeError):
            reply = status(request_id, BAD_MESSAGE)
        if isinstance(reply, list):
            out.extend(reply)
        else:
            out.append(reply)

    @staticmethod
    def version() -> bytes:
        body = b"".join(string(name) + string(version) for name, (version, _) in EXTENSIONS.items())
        return U32.pack(5 + len(body)) + bytes([VERSION_REPLY]) + U32.pack(VERSION) + body

    def extended(self, request_id: int, r: Reader) -> bytes:
        op = self.extensions.get(r.string())
        if op is None:
            return status(request_id, OP_UNSUPPORTED)
        return op(request_id, r)

    # -- handles -----------------------------------------------------------------------

    def _new_handle(self, handle: Handle) -> int:
        if len(self.handles) >= MAX_HANDLES:
            handle.close()
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        number = self.next_handle
        self.next_handle = (number + 1) & 0xFFFFFFFF
        self.handles[number] = handle
        return number

    def _handle(self, r: Reader) -> Handle | None:
        raw = r.view()
        if len(raw) != 4:
            return None
        return self.handles.get(U32.unpack(raw)[0])

    def _file(self, r: Reader) -> Handle | None:
        handle = self._handle(r)
        return handle if handle is not None and handle.entries is None else None

    # -- files -------------------------------------------------------------------------

    def open(self, request_id: int, r: Reader) -> bytes:
        path, pflags, attrs = r.path(), r.u32(), r.attrs()
        access = pflags & (FXF_READ | FXF_WRITE)
        flags = {0: os.O_RDONLY, FXF_READ: os.O_RDONLY, FXF_WRITE: os.O_WRONLY}.get(
            access, os.O_RDWR
        )
        for bit, flag in (
            (FXF_APPEND, os.O_APPEND),
            (FXF_CREAT, os.O_CREAT),
            (FXF_TRUNC, os.O_TRUNC),
            (FXF_EXCL, os.O_EXCL),
        ):
            if pflags & bit:
                flags |= flag
        fd = os.open(path, flags | os.O_NOCTTY | os.O_CLOEXEC, attrs.get("mode", 0o666))
        number = self._new_handle(Handle(fd, append=bool(pflags & FXF_APPEND)))
        return reply(HANDLE, request_id, string(U32.pack(number)))

    def close(self, request_id: int, r: Reader) -> bytes:
        raw = r.view()
        handle = self.handles.pop(U32.unpack(raw)[0], None) if len(raw) == 4 else None
        if handle is None:
            return status(request_id, NO_SUCH_FILE)
        handle.close()
        return status(request_id, OK)

    def read(self, request_id: int, r: Reader) -> list | bytes:
        handle, offset, length = self._file(r), r.u64(), r.u32()
        if handle is None:
            return status(request_id, FAILURE)
        buf = self.spare.pop() if self.spare else bytearray(MAX_IO)
        size = os.preadv(handle.fd, [memoryview(buf)[: min(length, MAX_IO)]], offset)
        if not size:
            self.spare.append(buf)
            return status(request_id, EOF)
        self.lent.append(buf)
        return [DATA_HEAD.pack(9 + size, DATA, request_id, size), memoryview(buf)[:size]]

    def write(self, request_id: int, r: Reader) -> bytes:
        handle = self._file(r)
        offset, data = r.u64(), r.view()
        if handle is None:
            return status(request_id, FAILURE)
        write_at(handle, data, offset)
        return status(request_id, OK)

    def fstat(self, request_id: int, r: Reader) -> bytes:
        handle = self._file(r)
        if handle is None:
            return status(request_id, FAILURE)
        return reply(ATTRS, request_id, encode_attrs(os.fstat(handle.fd)))

    def fsetstat(self, request_id: int, r: Reader) -> bytes:
        handle, attrs = self._file(r), r.attrs()
        if handle is None:
            return status(request_id, FAILURE)
        return self._set(request_id, handle.fd, attrs)

    def fsync(self, request_id: int, r: Reader) -> bytes:
        handle = self._file(r)
        if handle is None:
            return status(request_id, NO_SUCH_FILE)
        os.fsync(handle.fd)
        return status(request_id, OK)

    def copy_data(self, request_id: int, r: Reader) -> bytes:
        source, read_offset, length = self._file(r), r.u64(), r.u64()
        target, write_offset = self._file(r), r.u64()
        if source is None or target is None or _same_file(source.fd, target.fd):
            return status(request_id, FAILURE)  # a copy onto itself would never reach EOF
        until_eof = length == 0
        while until_eof or length > 0:
            data = os.pread(source.fd, MAX_IO if until_eof else min(MAX_IO, length), read_offset)
            if not data:
                return status(request_id, OK if until_eof else EOF)
            write_offset = write_at(target, memoryview(data), write_offset)
            read_offset += len(data)
            length -= 0 if until_eof else len(data)
        return status(request_id, OK)

    # -- paths -------------------------------------------------------------------------

    def stat(self, request_id: int, r: Reader) -> bytes:
        return reply(ATTRS, request_id, encode_attrs(os.stat(r.path())))

    def lstat(self, request_id: int, r: Reader) -> bytes:
        return reply(ATTRS, request_id, encode_attrs(os.lstat(r.path())))

    def setstat(self, request_id: int, r: Reader) -> bytes:
        path, attrs = r.path(), r.attrs()
        return self._set(request_id, path, attrs)

    def lsetstat(self, request_id: int, r: Reader) -> bytes:
        path, attrs = r.path(), r.attrs()
        if "size" in attrs:
            return status(request_id, BAD_MESSAGE)  # as OpenSSH: no truncate without following
        return self._set(request_id, path, attrs, follow=False)

    @staticmethod
    def _set(request_id: int, target: bytes | int, attrs: dict, follow: bool = True) -> bytes:
        """Apply attributes in OpenSSH's order; the last failure is the answer."""
        code, message, steps = OK, None, []
        nofollow = {} if follow else {"follow_symlinks": False}
        if "size" in attrs:
            steps.append(lambda: os.truncate(target, attrs["size"]))
        if "mode" in attrs:
            steps.append(lambda: _chmod(target, attrs["mode"], follow))
        if "times" in attrs:
            steps.append(lambda: os.utime(target, attrs["times"], **nofollow))
        if "uid" in attrs:
            steps.append(lambda: os.chown(target, attrs["uid"], attrs["gid"], **nofollow))
        for step in steps:
            try:
                step()
            except OSError as e:
                code, message = ERRNO_STATUS.get(e.errno, FAILURE), e.strerror
        return status(request_id, code, message)

    def opendir(self, request_id: int, r: Reader) -> bytes:
        number = self._new_handle(Handle(entries=Directory(r.path())))
        return reply(HANDLE, request_id, string(U32.pack(number)))

    def readdir(self, request_id: int, r: Reader) -> bytes:
        handle = self._handle(r)
        if handle is None or handle.entries is None:
            return status(request_id, FAILURE)
        batch = handle.entries.next_batch()
        if not batch:
            return status(request_id, EOF)
        now = time.time()
        body = [U32.pack(len(batch))]
        for name, st in batch:
            body += (string(name), string(long_name(name, st, now)), encode_attrs(st))
        return reply(NAME, request_id, b"".join(body))

    def remove(self, request_id: int, r: Reader) -> bytes:
        os.unlink(r.path())
        return status(request_id, OK)

    def mkdir(self, request_id: int, r: Reader) -> bytes:
        path, attrs = r.path(), r.attrs()
        os.mkdir(path, attrs.get("mode", 0o777))
        return status(request_id, OK)

    def rmdir(self, request_id: int, r: Reader) -> bytes:
        os.rmdir(r.path())
        return status(request_id, OK)

    def realpath(self, request_id: int, r: Reader) -> bytes:
        return names(request_id, _resolved(r.path()))

    def expand_path(self, request_id: int, r: Reader) -> bytes:
        """Like REALPATH, with "~" (the directory the session started in) and "~user"."""
        path = r.path()
        if path == b"~" or path.startswith(b"~/"):
            path = os.getcwd().encode() + path[1:]
        elif path.startswith(b"~"):
            expanded = os.path.expanduser(path)
            if expanded == path:
                return status(request_id, NO_SUCH_FILE, "no such user")
            path = expanded
        return names(request_id, _resolved(path))

    def home_directory(self, request_id: int, r: Reader) -> bytes:
        user = r.string()
        try:
            entry = pwd.getpwnam(user.decode()) if user else pwd.getpwuid(os.getuid())
        except KeyError:
            return status(request_id, FAILURE, "no such user")
        return names(request_id, entry.pw_dir.encode())

    def readlink(self, request_id: int, r: Reader) -> bytes:
        return names(request_id, os.readlink(r.path()))

    def symlink(self, request_id: int, r: Reader) -> bytes:
        # OpenSSH sends the target first and the new link second (the reverse of the draft).
        target, link = r.path(), r.path()
        os.symlink(target, link)
        return status(request_id, OK)

    def hardlink(self, request_id: int, r: Reader) -> bytes:
        source, link = r.path(), r.path()
        os.link(source, link)
        return status(request_id, OK)

    def posix_rename(self, request_id: int, r: Reader) -> bytes:
        source, target = r.path(), r.path()
        os.rename(source, target)
        return status(request_id, OK)

    def rename(self, request_id: int, r: Reader) -> bytes:
        """Version 3's rename, which never replaces the target (OpenSSH's link, then unlink)."""
        source, target = r.path(), r.path()
        if stat.S_ISREG(os.lstat(source).st_mode):
            try:
                os.link(source, target)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV, errno.EPERM):
                    raise
                return self._rename_if_absent(request_id, source, target)
            try:
                os.unlink(source)
            except OSError:
                os.unlink(target)
                raise
            return status(request_id, OK)
        return self._rename_if_absent(request_id, source, target)

    @staticmethod
    def _rename_if_absent(request_id: int, source: bytes, target: bytes) -> bytes:
        if os.path.lexists(target):
            return status(request_id, FAILURE, os.strerror(errno.EEXIST))
        os.rename(source, target)
        return status(request_id, OK)

    # -- file systems, limits, names ---------------------------------------------------

    def statvfs(self, request_id: int, r: Reader) -> bytes:
        return statvfs_reply(request_id, os.statvfs(r.path()))

    def fstatvfs(self, request_id: int, r: Reader) -> bytes:
        handle = self._file(r)
        if handle is None:
            return status(request_id, FAILURE)
        return statvfs_reply(request_id, os.fstatvfs(handle.fd))

    def limits(self, request_id: int, r: Reader) -> bytes:
        body = U64.pack(MAX_PACKET) + U64.pack(MAX_IO) + U64.pack(MAX_IO) + U64.pack(MAX_HANDLES)
        return reply(EXTENDED_REPLY, request_id, body)

    def users_groups_by_id(self, request_id: int, r: Reader) -> bytes:
        uids, gids = Reader(r.view()), Reader(r.view())
        users = [_known_name(pwd.getpwuid, uids.u32()) for _ in range(len(uids.data) // 4)]
        groups = [_known_name(grp.getgrgid, gids.u32()) for _ in range(len(gids.data) // 4)]
        packed = [string(b"".join(string(n) for n in part)) for part in (users, groups)]
        return reply(EXTENDED_REPLY, request_id, b"".join(packed))


def _known_name(lookup, number: int) -> bytes:
    try:
        return lookup(number)[0].encode()
    except KeyError:
        return b""


def write_at(handle: Handle, data: memoryview, offset: int) -> int:
    """Write all of `data` at `offset` (at the end if opened to append); the offset after."""
    while data:
        fd = handle.fd
        written = os.write(fd, data) if handle.append else os.pwrite(fd, data, offset)
        if not written:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        data, offset = data[written:], offset + written
    return offset


def _same_file(fd: int, other: int) -> bool:
    first, second = os.fstat(fd), os.fstat(other)
    return (first.st_dev, first.st_ino) == (second.st_dev, second.st_ino)


def _chmod(target: bytes | int, mode: int, follow: bool) -> None:
    if follow or isinstance(target, int) or not os.path.islink(target):
        os.chmod(target, mode)
    else:  # Linux has no mode on a symlink itself
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))


def _resolved(path: bytes) -> bytes:
    """The canonical path; only its last component may be missing, as OpenSSH's realpath."""
    resolved = os.path.realpath(path)
    parent = os.path.dirname(resolved)
    if not os.path.isdir(parent):
        raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))
    return resolved


def reply(kind: int, request_id: int, body: bytes) -> bytes:
    return REPLY_HEAD.pack(5 + len(body), kind, request_id) + body


def status(request_id: int, code: int, message: str | None = None) -> bytes:
    text = (message or MESSAGES.get(code, "Failure")).encode(errors="replace")
    tail = string(text) + string(b"")
    return STATUS_HEAD.pack(9 + len(tail), STATUS, request_id, code) + tail


def os_status(request_id: int, error: OSError) -> bytes:
    """A failed system call's status: OpenSSH's code, the system's words."""
    code = ERRNO_STATUS.get(error.errno, FAILURE)
    return status(request_id, code, error.strerror or MESSAGES[code])


def names(request_id: int, path: bytes) -> bytes:
    """A NAME reply with one entry and no attributes (REALPATH, READLINK and the like)."""
    return reply(NAME, request_id, U32.pack(1) + string(path) + string(path) + NO_ATTRS)


def statvfs_reply(request_id: int, st: os.statvfs_result) -> bytes:
    flags = (1 if st.f_flag & os.ST_RDONLY else 0) | (2 if st.f_flag & os.ST_NOSUID else 0)
    fields = (
        st.f_bsize,
        st.f_frsize,
        st.f_blocks,
        st.f_bfree,
        st.f_bavail,
        st.f_files,
        st.f_ffree,
        st.f_favail,
        st.f_fsid,
        flags,
        st.f_namemax,
    )
    return reply(EXTENDED_REPLY, request_id, b"".join(U64.pack(f & (2**64 - 1)) for f in fields))


# -- the byte streams ----------------------------------------------------------------------


def write_all(fd: int, parts: list) -> None:
    while parts:
        written = os.writev(fd, parts[:IOV_MAX])
        done = 0
        while done < len(parts) and written >= len(parts[done]):
            written -= len(parts[done])
            done += 1
        parts = parts[done:]
        if written:
            parts[0] = memoryview(parts[0])[written:]


class Oversized(Exception):
    """A packet longer than MAX_PACKET: OpenSSH's server ends the session, and so do we."""


def packet_end(data: bytes, pos: int) -> int:
    """Where the packet that starts at `pos` ends (`data` holds at least its length)."""
    (length,) = U32.unpack_from(data, pos)
    if length > MAX_PACKET:
        raise Oversized(length)
    return pos + 4 + length


def serve(server: Server, infd: int, outfd: int) -> None:
    """Serve the packets that arrive on `infd` until it ends, replies to `outfd`.

    Input is read into one buffer that always has room for a whole packet after the
    incomplete one it may hold: no allocation, and one copy, per read.
    """
    buf = bytearray(READ_SIZE + 4 + MAX_PACKET)
    view = memoryview(buf)
    have = 0
    while True:
        received = os.readv(infd, [view[have:]])
        if not received:
            return
        have += received
        pos, out, size = 0, [], 0
        while have - pos >= 4:
            end = packet_end(buf, pos)
            if end > have:
                break
            before = len(out)
            server.handle(view[pos + 4 : end], out)
            pos = end
            size += sum(len(part) for part in out[before:])
            if size >= FLUSH_SIZE:
                write_all(outfd, out)
                server.replies_sent()
                out, size = [], 0
        if out:
            write_all(outfd, out)
            server.replies_sent()
        if pos:
            buf[: have - pos] = buf[pos:have]
            have -= pos


def enlarge_pipe(fd: int) -> None:
    """Fewer, larger reads and writes: a pipe of 1 MiB holds four full packets."""
    try:
        fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass  # not a pipe, or over the user's pipe quota: the default size works too


def main() -> None:
    infd, outfd = sys.stdin.fileno(), sys.stdout.fileno()
    for fd in (infd, outfd):
        enlarge_pipe(fd)
    try:
        serve(Server(), infd, outfd)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the client went away
    except Oversized as e:
        sys.exit(f"sftp-server: a packet of {e} bytes is over the limit of {MAX_PACKET} bytes")


if __name__ == "__main__":
    main()
