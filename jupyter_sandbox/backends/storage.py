"""A service's claim on its storage directory and, as root, on a range of host uids.

Two services must never share either: a service sweeps what it finds in its
storage at start, and a sandbox's host uid is all that separates it from the
sandboxes of every other service on the machine.

* The storage is claimed with an ``flock`` held for the service's whole life; a
  second service on the same storage fails at start, naming the first. The
  storage remembers the data directory of the service it belongs to, so it is
  not taken over by another one either, even while the first is stopped.
* Each sandbox directory carries a manifest naming the storage that created it;
  a service only ever ends sandboxes whose manifest is its own. Beside it, once the
  sandbox is recorded, is its record: what the service needs to re-adopt it, so the
  sandbox survives the loss of the service's database. Both live in the sandbox's
  directory itself, which the sandbox cannot reach (it sees only its ``home`` and
  ``state`` subdirectories).
* Host-uid ranges are claimed in a machine-wide registry (one file per range,
  flocked by the live service that uses it), recorded in the storage so a
  restarted service gets the same range back for the sandboxes it re-adopts, and
  free again once that storage is gone. A range never overlaps a user's or
  group's id, a subordinate id range, the windows ``useradd`` allocates those
  from, or the ids of any running process.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from .._config import SYSTEM_DIR

log = logging.getLogger("jupyter_sandbox.service")

SANDBOXES = "sandboxes"  # the storage's directory of sandbox directories
MANIFEST = "manifest.json"
RECORD = "record.json"
MAX_RECORD = 4 << 20  # bytes: a record holds a sandbox's env and labels (a request's worth)
LOCK_FILE = "service.lock"
IDENTITY_FILE = "storage.json"
UID_RANGE_FILE = "uid-range.json"
UID_REGISTRY = SYSTEM_DIR / "uid-ranges"
UID_RANGE_SIZE = 65536
UID_LIMIT = 1 << 31  # some tools read ids as signed 32-bit numbers
# What /etc/login.defs says when it says nothing: useradd's windows.
LOGIN_DEFAULTS = {
    "UID_MIN": 1000,
    "UID_MAX": 60000,
    "GID_MIN": 1000,
    "GID_MAX": 60000,
    "SUB_UID_MIN": 100000,
    "SUB_UID_MAX": 600100000,
    "SUB_GID_MIN": 100000,
    "SUB_GID_MAX": 600100000,
}


class StorageInUse(RuntimeError):
    """The storage directory or host-uid range belongs to another service."""


@dataclass(frozen=True)
class UidRange:
    """Host uids ``first`` to ``first + size - 1``; each sandbox uses one as uid and gid."""

    first: int
    size: int

    def __contains__(self, uid: object) -> bool:
        return isinstance(uid, int) and self.first <= uid < self.first + self.size

    def overlaps(self, low: int, high: int) -> bool:
        """Does any id from `low` to `high` (inclusive) fall in this range?"""
        return low < self.first + self.size and high >= self.first


@dataclass(frozen=True)
class Manifest:
    """What a sandbox directory says about itself."""

    storage: str
    sandbox: str
    host_uid: int


class Storage:
    """The claim of one service on its storage directory, held until `close()`."""

    def __init__(self, directory: Path, identity: str, lock_fd: int) -> None:
        self.directory = directory
        self.id = identity
        self.uids: UidRange | None = None
        self._fds = [lock_fd]

    @classmethod
    def claim(
        cls,
        directory: Path,
        *,
        data_dir: Path | None = None,
        shared: bool = False,
        uid_base: int | None = None,
    ) -> Storage:
        """Claim `directory` for the service whose data lives in `data_dir`.

        `shared`: the sandboxes run as other uids and must traverse the directory.
        `uid_base`: claim a host-uid range too, the first free one from there.
        Raises StorageInUse, saying which service has it and what to do.
        """
        if directory.parent == SYSTEM_DIR / "services":
            _make_system_dir(directory.parent)
        directory.mkdir(parents=True, exist_ok=True)
        owner = os.stat(directory).st_uid
        if owner != os.geteuid():
            raise StorageInUse(
                f"sandbox storage {directory} belongs to uid {owner}, not to this service's "
                f"uid {os.geteuid()}; set JUPYTER_SANDBOX_DIR to a directory of this user's"
            )
        os.chmod(directory, 0o711 if shared else 0o700)
        lock_fd = _lock_storage(directory, data_dir)
        storage = cls(directory, "", lock_fd)
        try:
            storage.id = _identity(directory, data_dir)
            if uid_base is not None:
                storage.uids = storage._claim_uids(uid_base)
        except BaseException:
            storage.close()
            raise
        return storage

    def close(self) -> None:
        """Give up the claim (the ranges and storage stay recorded for the next start)."""
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = []

    # -- sandbox manifests and records --------------------------------------------------

    def write_manifest(self, sandbox_dir: Path, sandbox_id: str, host_uid: int) -> None:
        """Mark a new sandbox directory as this storage's."""
        text = json.dumps({"storage": self.id, "sandbox": sandbox_id, "host_uid": host_uid})
        fd = os.open(
            sandbox_dir / MANIFEST,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
        )
        with os.fdopen(fd, "w") as f:
            f.write(text)

    def manifest(self, sandbox_dir: Path) -> Manifest | None:
        """The manifest of a sandbox directory, if it says it is this storage's."""
        try:
            fd = os.open(sandbox_dir / MANIFEST, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with os.fdopen(fd) as f:
                data = json.loads(f.read(4096))
            manifest = Manifest(str(data["storage"]), str(data["sandbox"]), int(data["host_uid"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if manifest.storage != self.id or manifest.sandbox != sandbox_dir.name:
            return None
        return manifest

    @staticmethod
    def write_record(sandbox_dir: Path, data: bytes) -> None:
        """Replace a sandbox's record atomically: a private temp file, then a rename."""
        tmp = sandbox_dir / f".{RECORD}.{secrets.token_hex(4)}.tmp"
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, sandbox_dir / RECORD)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    @staticmethod
    def read_record(sandbox_dir: Path) -> bytes | None:
        """A sandbox's record as written (None if it has none); ValueError if too large."""
        try:
            fd = os.open(sandbox_dir / RECORD, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        with os.fdopen(fd, "rb") as f:
            data = f.read(MAX_RECORD + 1)
        if len(data) > MAX_RECORD:
            raise ValueError(f"larger than {MAX_RECORD} bytes")
        return data

    @staticmethod
    def keep_record_aside(sandbox_dir: Path) -> Path:
        """Rename an unreadable record, with a timestamp, for a person to look at; its path."""
        target = sandbox_dir / f"{RECORD}.unreadable-{time.strftime('%Y%m%dT%H%M%S')}"
        os.rename(sandbox_dir / RECORD, target)
        return target

    @staticmethod
    def has_record(sandbox_dir: Path) -> bool:
        return os.path.lexists(sandbox_dir / RECORD)

    @staticmethod
    def drop_record(sandbox_dir: Path) -> None:
        """Take the record away first when removing a sandbox: a directory whose removal
        fails halfway is then a leftover to sweep, never a sandbox to re-adopt."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sandbox_dir / RECORD)

    # -- host uids ---------------------------------------------------------------------

    def _claim_uids(self, uid_base: int) -> UidRange:
        """This storage's range: the one it had, or the first free one from `uid_base`."""
        _make_system_dir(UID_REGISTRY)
        registry_lock = _open_locked(UID_REGISTRY / ".lock", blocking=True)
        try:
            recorded = _read_json(self.directory / UID_RANGE_FILE)
            if recorded is not None:
                wanted = UidRange(int(recorded["first"]), int(recorded["size"]))
                if not self._take_range(wanted):
                    raise StorageInUse(_range_taken(self.directory, wanted))
                return wanted
            reserved = _reserved_ids()
            running = _running_ids()
            for first in range(uid_base, UID_LIMIT - UID_RANGE_SIZE + 1, UID_RANGE_SIZE):
                candidate = UidRange(first, UID_RANGE_SIZE)
                if any(candidate.overlaps(low, high) for low, high in reserved):
                    continue
                if any(uid in candidate for uid in running) or not self._take_range(candidate):
                    continue
                record = {"first": candidate.first, "size": candidate.size}
                _write_json(self.directory / UID_RANGE_FILE, record)
                return candidate
            raise StorageInUse(f"no free range of {UID_RANGE_SIZE} host uids from {uid_base}")
        finally:
            os.close(registry_lock)

    def _take_range(self, uids: UidRange) -> bool:
        """Hold the registry entry of `uids`, unless it overlaps a range another storage has.

        Entries of storages that are gone are free: they are removed when they overlap.
        Called with the registry locked.
        """
        overlapping = [
            (other, path)
            for other, path in _registry()
            if other.overlaps(uids.first, uids.first + uids.size - 1)
        ]
        stale = []
        for other, path in overlapping:
            if self._held_by_another(path):
                return False
            if other != uids:
                stale.append(path)
        for path in stale:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        path = UID_REGISTRY / f"{uids.first}-{uids.size}"
        fd = _open_locked(path, blocking=False)
        record = {"storage": str(self.directory), "id": self.id, "pid": os.getpid()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self._fds.append(fd)
        return True

    def _held_by_another(self, entry: Path) -> bool:
        """Is a registry entry locked by a live service, or recorded for another storage?"""
        try:
            fd = _open_locked(entry, blocking=False)
        except BlockingIOError:
            return True
        except FileNotFoundError:
            return False
        try:
            holder = _read_json(entry) or {}
        finally:
            os.close(fd)
        return holder.get("id") not in (None, self.id) and _storage_exists(holder)


def _registry() -> list[tuple[UidRange, Path]]:
    """The ranges claimed so far, from the registry's entry names ("<first>-<size>")."""
    entries = []
    for path in UID_REGISTRY.iterdir():
        first, _, size = path.name.partition("-")
        if first.isdigit() and size.isdigit():
            entries.append((UidRange(int(first), int(size)), path))
    return entries


def _make_system_dir(path: Path) -> None:
    """A machine-wide directory of root's: made if missing, refused if anyone could plant in it."""
    for directory in (SYSTEM_DIR, path):
        with contextlib.suppress(FileExistsError):
            os.mkdir(directory, 0o700)
            os.chmod(directory, 0o711)  # the sandboxes' uids pass through to their own
        st = os.lstat(directory)
        if st.st_uid != 0 or st.st_mode & 0o022 or not os.path.isdir(directory):
            raise StorageInUse(
                f"{directory} must be a directory of root's that only root can write to"
            )


def _lock_storage(directory: Path, data_dir: Path | None) -> int:
    path = directory / LOCK_FILE
    try:
        fd = _open_locked(path, blocking=False)
    except BlockingIOError:
        holder = _read_json(path) or {}
        raise StorageInUse(
            f"sandbox storage {directory} is in use by another sandbox service (pid "
            f"{holder.get('pid', '?')}, data dir {holder.get('data_dir') or 'unknown'}). "
            "Stop that service first, or give this one a storage of its own: unset "
            "JUPYTER_SANDBOX_DIR (each service then gets its own) or point it elsewhere"
        ) from None
    holder = {"pid": os.getpid(), "data_dir": _where(data_dir), "uid": os.geteuid()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode(), 0)
    return fd


def _identity(directory: Path, data_dir: Path | None) -> str:
    """The storage's id, made once; refused if the storage belongs to another service."""
    path = directory / IDENTITY_FILE
    recorded = _read_json(path)
    if recorded is None or not isinstance(recorded.get("id"), str):
        identity = _identity_of_sandboxes(directory, path)
        _write_json(path, {"id": identity, "data_dir": _where(data_dir), "created": time.time()})
        return identity
    owner = recorded.get("data_dir")
    if data_dir is not None and owner and owner != _where(data_dir):
        raise StorageInUse(
            f"sandbox storage {directory} belongs to the sandbox service with data dir {owner}, "
            f"not to this one ({_where(data_dir)}): its sandboxes are that service's. Give "
            "this service a storage of its own: unset JUPYTER_SANDBOX_DIR or point it elsewhere"
        )
    return str(recorded["id"])


def _identity_of_sandboxes(directory: Path, path: Path) -> str:
    """The id the sandboxes' manifests name when the identity file is missing or damaged.

    Only this storage's services write manifests in it, so when they all name one id,
    that is this storage's: its sandboxes are re-adopted rather than left unknown. A new
    id otherwise (a new storage, or manifests that disagree: those sandboxes are left
    alone, and said so).
    """
    named: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for sandbox_dir in (directory / SANDBOXES).iterdir():
            data = _read_json(sandbox_dir / MANIFEST)
            if data is not None and isinstance(data.get("storage"), str):
                named[data["storage"]] = named.get(data["storage"], 0) + 1
    if len(named) == 1:
        (identity, count), *_ = named.items()
        log.warning(
            "sandbox storage %s: %s was missing or damaged; took its id back from the "
            "manifests of its %d sandbox(es), which are kept",
            directory,
            path,
            count,
        )
        return identity
    if named:
        log.warning(
            "sandbox storage %s: %s was missing or damaged and its sandboxes' manifests name "
            "%d different storages: started a new id, and left all %d sandbox directories "
            "alone (their files are kept); restore %s to have them back",
            directory,
            path,
            len(named),
            sum(named.values()),
            path,
        )
    return secrets.token_hex(8)


def _range_taken(directory: Path, uids: UidRange) -> str:
    return (
        f"host uids {uids.first}-{uids.first + uids.size - 1}, recorded in {directory} for "
        "its sandboxes, are claimed by another storage; its sandboxes would share uids "
        f"with another service's. See {UID_REGISTRY}"
    )


def _storage_exists(holder: dict) -> bool:
    """Does the storage a range was claimed for still exist (the range is then its own)?"""
    recorded = _read_json(Path(str(holder.get("storage", ""))) / IDENTITY_FILE)
    return recorded is not None and recorded.get("id") == holder.get("id")


def _reserved_ids() -> list[tuple[int, int]]:
    """Id ranges (inclusive) a sandbox must never use: users, groups, subordinate ids."""
    reserved = []
    for path in ("/etc/passwd", "/etc/group"):
        for fields in _colon_lines(path):
            with contextlib.suppress(IndexError, ValueError):
                reserved.append((int(fields[2]), int(fields[2])))
    for path in ("/etc/subuid", "/etc/subgid"):
        for fields in _colon_lines(path):
            with contextlib.suppress(IndexError, ValueError):
                start, count = int(fields[1]), int(fields[2])
                reserved.append((start, start + count - 1))
    defs = dict(LOGIN_DEFAULTS)
    with contextlib.suppress(OSError), open("/etc/login.defs") as f:
        for line in f:
            fields = line.partition("#")[0].split()
            if len(fields) == 2 and fields[0] in defs and fields[1].isdigit():
                defs[fields[0]] = int(fields[1])
    for kind in ("UID", "GID", "SUB_UID", "SUB_GID"):
        reserved.append((defs[f"{kind}_MIN"], defs[f"{kind}_MAX"]))
    return reserved


def _running_ids() -> set[int]:
    """Real and effective uids and gids of every process now."""
    ids: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError), open(f"/proc/{entry}/status") as f:
            for line in f:
                if line.startswith(("Uid:", "Gid:")):
                    ids.update(int(v) for v in line.split()[1:])
    return ids


def _colon_lines(path: str) -> list[list[str]]:
    try:
        with open(path) as f:
            return [line.rstrip("\n").split(":") for line in f if not line.startswith("#")]
    except OSError:
        return []


def _open_locked(path: Path, blocking: bool) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_json(path: Path) -> dict | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd) as f:
            data = json.loads(f.read(65536) or "null")
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(data))
    os.replace(tmp, path)


def _where(data_dir: Path | None) -> str | None:
    return os.path.realpath(data_dir) if data_dir is not None else None
