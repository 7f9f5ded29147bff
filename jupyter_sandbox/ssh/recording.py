"""Terminal recordings: a pty session's output as an asciicast v2 file, out of the sandbox's reach.

Recording is off unless the service records every sandbox's terminals
(``JUPYTER_SANDBOX_RECORD_TERMINALS=on``) or the sandbox was created with
``record_terminals=True``. Then each SSH session with a pty writes
``<sandbox dir>/recordings/<start>-<n>.cast``: a header line, then one
``[seconds, "o", text]`` event per chunk of output (and ``"r"`` for a resize).
Only output is recorded, as asciinema does by default: what a user types shows
in it as the terminal echoes it, and what a terminal does not echo (a password
at a prompt) stays out.

The directory is the service's (mode 0700 in the sandbox's own directory, which
the sandbox cannot see); files are created with ``O_EXCL|O_NOFOLLOW`` relative
to it, so nothing a sandbox does can redirect a write. Sizes are bounded: one
recording stops at `RECORDING_LIMIT`, all of a sandbox's at `SANDBOX_LIMIT`
(checked every `CHECK_EVERY` bytes, so sessions in other gateway processes count
too), each with a "recording truncated" marker; a full disk ends a recording,
never the session. Recordings go with the sandbox's directory at its end.
"""

from __future__ import annotations

import calendar
import codecs
import contextlib
import errno
import json
import os
import re
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from .._errors import FileNotFound, InvalidRequest

DIRECTORY = "recordings"
RECORDING_LIMIT = 64 << 20  # bytes of one recording
SANDBOX_LIMIT = 256 << 20  # bytes of all recordings of one sandbox
CHECK_EVERY = 1 << 20  # bytes written between two looks at the sandbox's total
BLOCK = 4096  # the least a file takes on disk, as counted (some filesystems say 0 blocks)
MAX_RECORDINGS = 1000  # files of one sandbox: each takes a block and an inode, however small
MARKER_ROOM = 512  # bytes kept free for the truncation marker
NAME = re.compile(r"(?P<start>[0-9]{8}T[0-9]{6}Z)-(?P<n>[1-9][0-9]{0,5})\.cast")
NAME_PATTERN = "YYYYMMDDTHHMMSSZ-N.cast"
NOTICE = "jupyter-sandbox: this terminal session is recorded"
MEDIA_TYPE = "application/x-asciicast"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class Recording:
    """One pty session's recording, written as its output arrives."""

    def __init__(self, directory: int, fd: int, name: str) -> None:
        self.directory = directory  # descriptor of the recordings directory
        self.fd = fd
        self.name = name
        self.started = time.monotonic()
        self.size = 0
        self.stopped: str | None = None  # why the recording ended before the session
        self._since_check = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    @classmethod
    def start(cls, sandbox_dir: Path, cols: int, rows: int, term: str, title: str) -> Recording:
        """A new recording in the sandbox's recordings directory, its header written.

        OSError if the directory cannot be used, or the sandbox's recordings are full."""
        directory = _open_directory(sandbox_dir, create=True)
        try:
            _check_room(directory)
            fd, name = _create(directory)
        except BaseException:
            os.close(directory)
            raise
        recording = cls(directory, fd, name)
        header = {
            "version": 2,
            "width": cols,
            "height": rows,
            "timestamp": int(time.time()),
            "title": title,
            "env": {"TERM": term, "SHELL": "/bin/bash"},
        }
        try:
            recording._write(json.dumps(header, ensure_ascii=False))
        except OSError:  # no file without its header: it would be no recording at all
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=directory)
            recording.close()
            raise
        return recording

    def output(self, data: bytes) -> None:
        """Record a chunk of terminal output (bytes; UTF-8 split across chunks is kept)."""
        text = self._decoder.decode(data)
        if text:
            self._event("o", text)

    def resize(self, cols: int, rows: int) -> None:
        self._event("r", f"{cols}x{rows}")

    def close(self) -> None:
        """Finish the file (the rest of a split character included)."""
        if self.fd < 0:
            return
        rest = self._decoder.decode(b"", final=True)
        if rest:
            self._event("o", rest)
        with contextlib.suppress(OSError):
            os.close(self.fd)
        with contextlib.suppress(OSError):
            os.close(self.directory)
        self.fd = -1

    # -- writing ---------------------------------------------------------------------

    def _event(self, kind: str, text: str) -> None:
        if self.stopped is not None:
            return
        line = json.dumps([round(time.monotonic() - self.started, 6), kind, text])
        try:
            if self.size + len(line) + 1 > RECORDING_LIMIT - MARKER_ROOM:
                self._truncate(f"it reached {RECORDING_LIMIT >> 20} MiB")
                return
            if self._since_check >= CHECK_EVERY:
                self._since_check = 0
                if _total(self.directory) > SANDBOX_LIMIT - MARKER_ROOM:
                    self._truncate(f"the sandbox's recordings reached {SANDBOX_LIMIT >> 20} MiB")
                    return
            self._write(line)
        except OSError as e:
            self.stopped = f"writing it failed: {e.strerror or e}"

    def _truncate(self, why: str) -> None:
        """End the recording with a marker event and a line the replay shows."""
        self.stopped = why
        elapsed = round(time.monotonic() - self.started, 6)
        self._write(json.dumps([elapsed, "m", f"recording truncated: {why}"]))
        self._write(json.dumps([elapsed, "o", f"\r\n[recording truncated: {why}]\r\n"]))

    def _write(self, line: str) -> None:
        """Append all of `line` or none of it: a full disk takes part of a write, and the
        file would end in a broken event (a replay stops at the last whole line)."""
        data = (line + "\n").encode()
        view = memoryview(data)
        try:
            while view:
                written = os.write(self.fd, view)
                view = view[written:]
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, self.size)
                os.lseek(self.fd, self.size, os.SEEK_SET)
            raise
        self.size += len(data)
        self._since_check += len(data)


# -- the directory --------------------------------------------------------------------


@dataclass(frozen=True)
class RecordingInfo:
    name: str
    started_at: float
    size: int

    def to_json(self) -> dict:
        return {"name": self.name, "started_at": self.started_at, "size": self.size}


def list_recordings(sandbox_dir: Path) -> list[RecordingInfo]:
    """The sandbox's recordings, oldest first; none if it never recorded."""
    try:
        directory = _open_directory(sandbox_dir, create=False)
    except FileNotFoundError:
        return []
    try:
        found = []
        for entry in os.scandir(directory):
            match = NAME.fullmatch(entry.name)
            if match is None or not entry.is_file(follow_symlinks=False):
                continue
            started = float(calendar.timegm(time.strptime(match["start"], "%Y%m%dT%H%M%SZ")))
            info = RecordingInfo(entry.name, started, entry.stat(follow_symlinks=False).st_size)
            found.append((started, int(match["n"]), info))
    finally:
        os.close(directory)
    return [info for *_, info in sorted(found)]


def open_recording(sandbox_dir: Path, name: str) -> int:
    """A read-only descriptor of one recording; InvalidRequest for a name that is not
    one, FileNotFound for one the sandbox does not have."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise InvalidRequest(
            f"not a recording name: {name[:100]!r}; names look like {NAME_PATTERN} "
            "(list them with GET /v1/sandboxes/ID/recordings)"
        )
    missing = FileNotFound(
        f"no recording {name} in this sandbox; list them with GET /v1/sandboxes/ID/recordings"
    )
    try:
        directory = _open_directory(sandbox_dir, create=False)
    except FileNotFoundError:
        raise missing from None
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory)
    except FileNotFoundError:
        raise missing from None
    finally:
        os.close(directory)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise missing
    return fd


def _open_directory(sandbox_dir: Path, create: bool) -> int:
    """The recordings directory, never through a link, checked to be this process's own
    and closed to everyone else."""
    parent = os.open(sandbox_dir, _DIR_FLAGS)
    try:
        if create:
            with contextlib.suppress(FileExistsError):
                os.mkdir(DIRECTORY, 0o700, dir_fd=parent)
        directory = os.open(DIRECTORY, _DIR_FLAGS, dir_fd=parent)
    finally:
        os.close(parent)
    info = os.fstat(directory)
    if info.st_uid != os.geteuid() or info.st_mode & 0o077:
        os.close(directory)
        raise PermissionError(
            errno.EPERM, f"{sandbox_dir / DIRECTORY} is not the service's own private directory"
        )
    return directory


def _check_room(directory: int) -> None:
    """OSError (EDQUOT) if the sandbox's recordings leave no room for another one."""
    count = sum(1 for _ in os.scandir(directory))
    if count >= MAX_RECORDINGS:
        raise OSError(errno.EDQUOT, f"the sandbox has {MAX_RECORDINGS} recordings already")
    if _total(directory) >= SANDBOX_LIMIT - MARKER_ROOM:
        raise OSError(errno.EDQUOT, f"the sandbox's recordings reached {SANDBOX_LIMIT >> 20} MiB")


def _total(directory: int) -> int:
    """What the recordings take on disk: a file's blocks, not only its length, so that
    many tiny recordings count for the disk they fill."""
    total = 0
    for entry in os.scandir(directory):
        with contextlib.suppress(OSError):
            info = entry.stat(follow_symlinks=False)
            total += max(info.st_size, info.st_blocks * 512, BLOCK)
    return total


def _create(directory: int) -> tuple[int, str]:
    """A new recording file named by the time (UTC) and the next free number."""
    start = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    number = sum(1 for _ in os.scandir(directory)) + 1
    while True:
        name = f"{start}-{number}.cast"
        try:
            return os.open(name, _CREATE_FLAGS, 0o600, dir_fd=directory), name
        except FileExistsError:
            number += 1
