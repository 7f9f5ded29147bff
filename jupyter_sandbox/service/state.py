"""What the service knows about its sandboxes and SSH credentials, kept so no one file loses it.

Reads are served from memory. Every change is kept in two places:

* the sandbox's own record, kept by the backend (``base.Records``: a file in the
  sandbox's directory, a Secret of the cluster), written at once whenever the change
  matters for re-adopting the sandbox: its settings, status, runtime, lease id and
  SSH credential hashes.
  Lease renewals are not written there; a sandbox re-adopted from its file alone gets
  a fresh lease period.
* the SQLite database (WAL), written by a background thread that waits out another
  process's lock and retries, so no database wait ever holds up the event loop. It
  also remembers ended sandboxes for a while, and lease renewals.

At start the database is loaded and the sandboxes' own records are laid over it. A
damaged database is moved aside and replaced; a missing, empty, damaged or locked
one never costs a sandbox: at most the list of sandboxes that ended before.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
import stat
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .._typed import typed
from ..backends.base import Records
from .identity import user_name

log = logging.getLogger("jupyter_sandbox.service")

SCHEMA = """
CREATE TABLE IF NOT EXISTS sandboxes (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    timeout REAL,
    expires_at REAL,
    lease_id TEXT,
    lease_expires REAL,
    owner TEXT NOT NULL DEFAULT '',
    labels TEXT NOT NULL DEFAULT '{}',
    env TEXT NOT NULL DEFAULT '{}',
    network TEXT NOT NULL DEFAULT 'none',
    limits TEXT NOT NULL DEFAULT '{}',
    runtime TEXT,
    ended_at REAL,
    end_reason TEXT,
    failure TEXT,
    failed_at REAL,
    user TEXT,
    uid INTEGER
);
CREATE INDEX IF NOT EXISTS sandboxes_status ON sandboxes(status);
CREATE TABLE IF NOT EXISTS ssh_tokens (
    token_hash TEXT PRIMARY KEY,
    sandbox_id TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL,
    single_use INTEGER NOT NULL DEFAULT 0,
    used INTEGER NOT NULL DEFAULT 0,
    public_key TEXT,
    revoked INTEGER NOT NULL DEFAULT 0,
    uid INTEGER
);
CREATE INDEX IF NOT EXISTS ssh_tokens_sandbox ON ssh_tokens(sandbox_id);
"""

RUNNING = "running"
POOLED = "pooled"
FAILED = "failed"  # ended unexpectedly: processes stopped, files kept until deadline or kill
ENDED = "ended"
ON_DISK = (RUNNING, POOLED, FAILED)  # statuses whose sandbox has a directory and record
_JSON_FIELDS = ("labels", "env", "limits")
RECORD_FORMAT = 1
OPEN_TIMEOUT = 1.0  # seconds the start waits for another process's lock to read the database
BUSY_TIMEOUT = 0.5  # seconds one write waits for it before the writer tries again
RETRY_MAX = 2.0  # the longest pause between two tries of a delayed write
CLOSE_WAIT = 3.0  # seconds a stopping service waits for writes delayed by a lock


@dataclass
class SandboxRecord:
    """One sandbox as the service knows it."""

    id: str
    name: str
    status: str
    created_at: float
    timeout: float | None = None
    expires_at: float | None = None
    lease_id: str | None = None
    lease_expires: float | None = None
    owner: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    network: str = "none"
    limits: dict[str, Any] = field(default_factory=dict)
    runtime: str | None = None
    ended_at: float | None = None
    end_reason: str | None = None
    failure: str | None = None  # why it failed, in words; set while status is FAILED
    failed_at: float | None = None
    # The OS user who created it (records from before users were kept: the service's).
    user: str = field(default_factory=lambda: user_name(os.getuid()))
    uid: int = field(default_factory=os.getuid)
    recording: bool = False  # its terminal sessions are recorded (ssh.recording)

    @property
    def live(self) -> bool:
        return self.status == RUNNING

    def deadline(self) -> tuple[float, str] | None:
        """The earliest moment this sandbox must end, and why."""
        candidates = []
        if self.expires_at is not None:
            candidates.append((self.expires_at, "expired"))
        if self.lease_expires is not None:
            candidates.append((self.lease_expires, "owner went away (lease not renewed)"))
        return min(candidates) if candidates else None


@dataclass
class SshToken:
    """The hash of one SSH credential and what it grants."""

    token_hash: str
    sandbox_id: str
    created_at: float
    expires_at: float | None = None
    single_use: bool = False
    used: bool = False
    public_key: str | None = None
    # The uid of the caller who issued it (tokens from before uids were kept: the service's).
    uid: int = field(default_factory=os.getuid)


class State:
    """Records of sandboxes and SSH tokens: in memory, in each sandbox's directory, in SQLite."""

    def __init__(self, database: Path, files: Records, writer: _Writer) -> None:
        self.database = database
        self.files = files
        self._writer = writer
        self._records: dict[str, SandboxRecord] = {}
        self._tokens: dict[str, SshToken] = {}
        self._on_disk: dict[str, bytes] = {}  # the record file last written, by sandbox
        # Sandboxes whose record file does not check out, unknown to the database: why.
        self.unreadable: dict[str, str] = {}

    @classmethod
    async def open(cls, database: Path, files: Records, lease_grace: float) -> State:
        """Load the database and the sandboxes' own records; log one line if they disagree.

        A session sandbox known only from its own record gets `lease_grace` seconds
        for its owner to renew its lease.
        """
        database.parent.mkdir(parents=True, exist_ok=True)
        loaded = await asyncio.to_thread(_load, database)
        on_disk = await asyncio.to_thread(files.read_records)
        writer = _Writer(database, loaded.db, asyncio.get_running_loop())
        state = cls(database, files, writer)
        state._records = dict(loaded.records)
        rebuilt = state._lay_over(loaded, on_disk, lease_grace)
        writer.resend = state._resend_all
        writer.late = state._adopt_late
        writer.start()
        if loaded.db is None:  # everything goes in once the database can be opened
            state._resend_all()
        message = loaded.describe(database, rebuilt)
        if message:
            log.warning("%s", message)
        return state

    def _lay_over(self, loaded: _Loaded, on_disk: dict[str, bytes], lease_grace: float) -> int:
        """Take what each sandbox's record says over the database; the number it added."""
        now = time.time()
        on_disk_ids = set()
        rebuilt = dropped = 0
        for sandbox_id, text in sorted(on_disk.items()):
            try:
                record, tokens = _parse_record_file(sandbox_id, text)
            except ValueError as e:
                known = loaded.records.get(sandbox_id)
                if known is None or known.status not in ON_DISK:
                    self.unreadable[sandbox_id] = str(e)  # the manager adopts it as failed
                    continue
                log.warning(
                    "the record file of sandbox %s does not check out (%s): taking it from "
                    "the database instead",
                    sandbox_id,
                    e,
                )
                continue
            on_disk_ids.add(sandbox_id)
            known = loaded.records.get(sandbox_id)
            if known is not None and known.lease_id == record.lease_id:
                record.lease_expires = known.lease_expires
            elif record.lease_id is not None:
                record.lease_expires = now + lease_grace
            rebuilt += known is None or known.status not in ON_DISK
            if known is not None:
                # A revocation whose record file could not be written must not be undone.
                kept = [t for t in tokens if t.token_hash in loaded.tokens]
                dropped += len(tokens) - len(kept)
                tokens = kept
            self._records[sandbox_id] = record
            self._on_disk[sandbox_id] = text
            for token in tokens:
                self._tokens[token.token_hash] = token
            self._writer.put({sandbox_id: _row(record)}, {t.token_hash: asdict(t) for t in tokens})
        for token in loaded.tokens.values():
            if token.sandbox_id not in on_disk_ids:
                self._tokens[token.token_hash] = token
            elif token.token_hash not in self._tokens:  # revoked after the database last heard
                self._writer.put({}, {token.token_hash: None})
        if dropped:
            log.warning(
                "dropped %d SSH credential(s) that sandboxes' record files hold but %s does "
                "not (revoked, or issued while it could not be written): expose SSH again "
                "where one is missing",
                dropped,
                self.database,
            )
        return rebuilt

    def close(self) -> None:
        """Write what is still waiting (waiting a few seconds at most for a lock)."""
        unwritten = self._writer.close(CLOSE_WAIT)
        if unwritten:
            log.warning(
                "%d change(s) were not written to %s (it is still locked by another process); "
                "the sandboxes' own records keep what the next start needs",
                unwritten,
                self.database,
            )

    # -- sandboxes ---------------------------------------------------------------------

    def add(self, record: SandboxRecord) -> None:
        """Keep a new sandbox's record; OSError, keeping nothing, if its own record file
        cannot be written (a sandbox without one is swept at the next start)."""
        self._write_file(record)
        self.save(record)

    def save(self, record: SandboxRecord, *, quiet: bool = False) -> None:
        """Keep a change of `record` in memory and the database, and in its own record file
        when that matters for a restart. OSError, once the change is kept, if that file
        cannot be written; with `quiet` (for changes the service makes on its own) that
        is logged instead."""
        self._records[record.id] = record
        self._writer.put({record.id: _row(record)}, {})
        if record.status not in ON_DISK:
            self._on_disk.pop(record.id, None)
        elif quiet:
            self._write_file_or_log(record)
        else:
            self._write_file(record)

    def get(self, ref: str) -> SandboxRecord | None:
        """The sandbox with this id, or the newest with this name (running or failed first)."""
        record = self._records.get(ref)
        if record is not None:
            return record
        named = [r for r in self._records.values() if r.name == ref]
        return max(named, key=lambda r: (r.status in (RUNNING, FAILED), r.created_at), default=None)

    def records(self, *statuses: str) -> list[SandboxRecord]:
        """The sandboxes with one of these statuses, oldest first."""
        found = [r for r in self._records.values() if r.status in statuses]
        return sorted(found, key=lambda r: r.created_at)

    def forget_ended(self, older_than: float) -> None:
        cutoff = time.time() - older_than
        old = [
            r.id
            for r in self._records.values()
            if r.status == ENDED and r.ended_at is not None and r.ended_at < cutoff
        ]
        for sandbox_id in old:
            del self._records[sandbox_id]
        if old:
            self._writer.put(dict.fromkeys(old), {})

    # -- SSH credentials ---------------------------------------------------------------

    def add_token(self, token: SshToken) -> None:
        self._tokens[token.token_hash] = token
        self._token_changed(token.sandbox_id, token.token_hash)

    def token(self, token_hash: str) -> SshToken | None:
        return self._tokens.get(token_hash)

    def tokens(self) -> list[SshToken]:
        return list(self._tokens.values())

    def use_token(self, token_hash: str) -> bool:
        """Mark a single-use token used; False if it already was (or is gone)."""
        token = self._tokens.get(token_hash)
        if token is None or token.used:
            return False
        token.used = True
        self._token_changed(token.sandbox_id, token_hash, quiet=True)
        return True

    def revoke_tokens(self, sandbox_id: str, token_hash: str | None = None) -> list[str]:
        """Revoke one or all of a sandbox's tokens; returns the hashes revoked."""
        hashes = [
            t.token_hash
            for t in self._tokens.values()
            if t.sandbox_id == sandbox_id and token_hash in (None, t.token_hash)
        ]
        for revoked in hashes:
            del self._tokens[revoked]
        if hashes:  # in effect at once, whether or not its record file can be written
            self._token_changed(sandbox_id, *hashes, quiet=True)
        return hashes

    def delete_tokens(self, sandbox_id: str) -> None:
        """Forget every token of a sandbox that is ending (its record file goes with it)."""
        hashes = [t.token_hash for t in self._tokens.values() if t.sandbox_id == sandbox_id]
        for token_hash in hashes:
            del self._tokens[token_hash]
        self._writer.put({}, dict.fromkeys(hashes))

    def _token_changed(self, sandbox_id: str, *hashes: str, quiet: bool = False) -> None:
        """Keep a change of tokens; OSError as `save` (a login's use of one is `quiet`)."""
        rows = {h: asdict(t) if (t := self._tokens.get(h)) else None for h in hashes}
        self._writer.put({}, rows)
        record = self._records.get(sandbox_id)
        if record is not None:
            self.save(record, quiet=quiet)

    # -- keeping it ----------------------------------------------------------------------

    def _write_file(self, record: SandboxRecord) -> None:
        """Rewrite the sandbox's own record if what a restart needs from it changed."""
        durable = asdict(record)
        del durable["lease_expires"]  # renewed every few seconds; a restart grants a new one
        tokens = [asdict(t) for t in self._tokens.values() if t.sandbox_id == record.id]
        data = {"format": RECORD_FORMAT, "record": durable, "ssh_tokens": tokens}
        text = json.dumps(data, sort_keys=True).encode()
        if self._on_disk.get(record.id) != text:
            self.files.write_record(record.id, text)
            self._on_disk[record.id] = text

    def _write_file_or_log(self, record: SandboxRecord) -> None:
        try:
            self._write_file(record)
        except OSError as e:
            log.warning(
                "could not write the record of sandbox %s in its directory (%s); a restart "
                "without the database would take it back as it was last recorded",
                record.id,
                e,
            )

    def _resend_all(self) -> None:
        """Give the writer everything (for a database that was replaced or just opened)."""
        self._writer.put(
            {i: _row(r) for i, r in self._records.items()},
            {h: asdict(t) for h, t in self._tokens.items()},
        )

    def _adopt_late(self, loaded: _Loaded) -> None:
        """A database that was locked at start opened later: take the sandboxes it alone knew."""
        for sandbox_id, record in loaded.records.items():
            if sandbox_id not in self._records and record.status == ENDED:
                self._records[sandbox_id] = record
        log.info("state database %s is readable again; writes go through", self.database)


def _parse_record_file(sandbox_id: str, text: bytes) -> tuple[SandboxRecord, list[SshToken]]:
    """A sandbox's record and tokens from its record file, every field checked."""
    try:
        data = json.loads(text)
    except ValueError:
        raise ValueError("not JSON") from None
    if not isinstance(data, dict) or data.get("format") != RECORD_FORMAT:
        raise ValueError(f"not a record of format {RECORD_FORMAT}")
    record = typed(SandboxRecord, data.get("record"))
    if record.id != sandbox_id:
        raise ValueError(f"it is the record of {record.id!r}")
    if record.status not in ON_DISK:
        raise ValueError(f"status {record.status!r}")
    if record.runtime is not None:
        json.loads(record.runtime)  # checked field by field by the backend that reads it
    raw_tokens = data.get("ssh_tokens")
    if not isinstance(raw_tokens, list):
        raise ValueError("ssh_tokens is not a list")
    tokens = [typed(SshToken, t) for t in raw_tokens]
    if any(t.sandbox_id != sandbox_id for t in tokens):
        raise ValueError("an SSH token of another sandbox")
    return record, tokens


def _row(record: SandboxRecord) -> dict[str, Any]:
    row = asdict(record)
    for name in _JSON_FIELDS:
        row[name] = json.dumps(row[name])
    return row


# -- the database ------------------------------------------------------------------------


@dataclass
class _Loaded:
    """What reading the database at start found."""

    db: sqlite3.Connection | None
    records: dict[str, SandboxRecord] = field(default_factory=dict)
    tokens: dict[str, SshToken] = field(default_factory=dict)
    fault: str | None = None  # "missing", "empty", "damaged (...)", "locked (...)"
    kept_as: Path | None = None
    skipped: int = 0  # rows that could not be read

    def describe(self, database: Path, rebuilt: int) -> str | None:
        """The one line that says what happened to the database, if anything worth saying."""
        ended = "the list of sandboxes that ended before"
        if self.db is None:
            what = f"is {self.fault}: running without it until {_remedy(self.fault, database)}"
            lost = f"nothing ({ended} comes back then)"
        elif self.kept_as is not None:
            what = f"was {self.fault}: kept it as {self.kept_as} and started a new one"
            lost = ended
        elif self.fault == "missing" and rebuilt:  # (not on a first start)
            what, lost = "was missing: started a new one", ended
        elif rebuilt or self.skipped:
            what, lost = "had no record of some sandboxes", "nothing"
        else:
            return None
        skipped = f" (skipped {self.skipped} unreadable row(s))" if self.skipped else ""
        return (
            f"state database {database} {what}; rebuilt {rebuilt} sandbox(es) from their own "
            f"records{skipped}; lost: {lost}; running sandboxes, their files and SSH "
            "credentials are all kept"
        )


def _load(path: Path) -> _Loaded:
    """Open and read the database; a damaged or empty one is moved aside for a new one."""
    fault = _missing_or_empty(path)
    # An empty file is kept aside like a damaged one; a WAL without its database must
    # not be replayed into a new one.
    kept_as = _move_aside(path, _ASIDE.get(fault, "stale")) if fault else None
    try:
        db = _connect(path, OPEN_TIMEOUT)
        loaded = _Loaded(db, fault=fault, kept_as=kept_as)
        try:
            _read(db, loaded)
        except BaseException:
            db.close()
            raise
        return loaded
    except sqlite3.DatabaseError as e:
        if not _is_damage(e):
            return _Loaded(None, fault=_unavailable(e))
        fault, kept_as = f"damaged ({e})", _move_aside(path, "damaged")
    try:
        return _Loaded(_connect(path, OPEN_TIMEOUT), fault=fault, kept_as=kept_as)
    except sqlite3.DatabaseError as e:
        return _Loaded(None, fault=f"{fault}, and a new one cannot be made: {_unavailable(e)}")


def _connect(path: Path, timeout: float) -> sqlite3.Connection:
    """A connection with the schema in place; DatabaseError (see `_is_damage`) if damaged."""
    db = sqlite3.connect(path, isolation_level=None, timeout=timeout, check_same_thread=False)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(SCHEMA)
        _add_missing_columns(db)
        check = db.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise sqlite3.DatabaseError(f"database disk image is malformed: {check}")
    except BaseException:
        db.close()
        raise
    return db


def _read(db: sqlite3.Connection, loaded: _Loaded) -> None:
    db.row_factory = sqlite3.Row
    try:
        for row in db.execute("SELECT * FROM sandboxes"):
            data = _defaults_for_nulls(SandboxRecord, dict(row))
            try:
                for name in _JSON_FIELDS:
                    data[name] = json.loads(data[name])
                data["recording"] = bool(data.get("recording"))  # INTEGER; NULL: older row
                record = typed(SandboxRecord, data)
            except (ValueError, TypeError):
                loaded.skipped += 1
                continue
            loaded.records[record.id] = record
        for row in db.execute("SELECT * FROM ssh_tokens WHERE revoked = 0"):
            data = dict(row, single_use=bool(row["single_use"]), used=bool(row["used"]))
            data = _defaults_for_nulls(SshToken, data)
            try:
                token = typed(SshToken, data)
            except ValueError:
                loaded.skipped += 1
                continue
            loaded.tokens[token.token_hash] = token
    finally:
        db.row_factory = None


def _defaults_for_nulls(cls: type, row: dict[str, Any]) -> dict[str, Any]:
    """`row` without the NULLs of fields whose default is not None: columns added by an
    upgrade are NULL in older rows, which then read as the field's default."""
    keep_null = {f.name for f in fields(cls) if f.default is None}
    return {k: v for k, v in row.items() if v is not None or k in keep_null}


def _add_missing_columns(db: sqlite3.Connection) -> None:
    """Databases made by an older version lack the columns of newer fields."""
    for table, cls in (("sandboxes", SandboxRecord), ("ssh_tokens", SshToken)):
        have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        for column in (f.name for f in fields(cls)):
            if column not in have:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {column}")


def _is_damage(error: sqlite3.DatabaseError) -> bool:
    """Is the file not (or no longer) a database, as opposed to busy or unreachable?"""
    code = getattr(error, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in _DAMAGE
    return not isinstance(error, sqlite3.OperationalError)


# Errors that say the file is not (or no longer) a database of this service's: damaged,
# or with a schema of its own that the service's fixed statements fail on.
_DAMAGE = (
    sqlite3.SQLITE_CORRUPT,
    sqlite3.SQLITE_NOTADB,
    sqlite3.SQLITE_ERROR,  # no such column, views may not be indexed...
    sqlite3.SQLITE_MISMATCH,  # datatype mismatch: an INTEGER id, say
    sqlite3.SQLITE_CONSTRAINT,  # a CHECK or NOT NULL of a schema not ours
)


class _Unavailable(Exception):
    """The database cannot be opened for now; the message says why, in words."""


def _unavailable(error: Exception) -> str:
    """Why the database cannot be used for now, in words."""
    if isinstance(error, _Unavailable):
        return str(error)
    code = getattr(error, "sqlite_errorcode", 0) & 0xFF
    if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return f"locked by another process ({error})"
    return f"unusable ({error})"


def _remedy(fault: str | None, path: Path) -> str:
    """What brings a database that cannot be used back, in words."""
    if fault and fault.startswith("locked"):
        return f"the process that locks it lets go (fuser -v {path} names it)"
    return (
        f"it can be written again: fix its permissions, attributes (lsattr {path}) or disk, "
        "or move it away for a new one"
    )


_ASIDE = {"empty": "empty", "not a file": "damaged"}  # how a fault's file is named aside


def _missing_or_empty(path: Path) -> str | None:
    """ "missing", "empty" or "not a file" (a directory, say) if so; None for a file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "missing"
    if not stat.S_ISREG(st.st_mode):
        return "not a file"
    return "empty" if st.st_size == 0 else None


def _move_aside(path: Path, why: str) -> Path | None:
    """Rename the database and its WAL and SHM files with a timestamp; the database's new name.

    None if there was no database file (its WAL and SHM are moved all the same).
    """
    stamp = time.strftime("%Y%m%dT%H%M%S")
    target = path.with_name(f"{path.name}.{why}-{stamp}")
    n = 1
    while os.path.lexists(target):
        n += 1
        target = path.with_name(f"{path.name}.{why}-{stamp}-{n}")
    moved = None
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.rename(f"{path}{suffix}", f"{target}{suffix}")
            moved = moved or (target if suffix == "" else None)
    return moved


def _identity(path: Path) -> tuple[int, int, int] | None:
    """Device, inode and size of the database file; None if it is gone."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_size


_SANDBOX_COLUMNS = [f.name for f in fields(SandboxRecord)]
_TOKEN_COLUMNS = [f.name for f in fields(SshToken)]
_SAVE_SANDBOX = (
    f"INSERT OR REPLACE INTO sandboxes ({', '.join(_SANDBOX_COLUMNS)}) "
    f"VALUES ({', '.join(':' + c for c in _SANDBOX_COLUMNS)})"
)
_SAVE_TOKEN = (
    f"INSERT OR REPLACE INTO ssh_tokens ({', '.join(_TOKEN_COLUMNS)}) "
    f"VALUES ({', '.join(':' + c for c in _TOKEN_COLUMNS)})"
)


class _Writer(threading.Thread):
    """Writes changes to the database off the event loop, the newest of each row only.

    A lock held by another process delays writes (logged once, and again once they go
    through) but never loses them while the service runs. A database found damaged,
    deleted, emptied or replaced is moved aside and written anew from everything the
    service holds.
    """

    def __init__(
        self, path: Path, db: sqlite3.Connection | None, loop: asyncio.AbstractEventLoop
    ) -> None:
        super().__init__(name="jupyter-sandbox-state", daemon=True)
        self.path = path
        self.db = db
        self.loop = loop
        self.identity = _identity(path) if db is not None else None
        self.resend: Any = None  # State._resend_all, called on the event loop
        self.late: Any = None  # State._adopt_late, called on the event loop
        self._changed = threading.Condition()
        self._sandboxes: dict[str, dict | None] = {}
        self._tokens: dict[str, dict | None] = {}
        self._closing = False
        self._deadline = 0.0
        self._unwritten = 0

    def put(self, sandboxes: dict[str, dict | None], tokens: dict[str, dict | None]) -> None:
        """Rows to write (None: to delete), keyed by id and token hash; newer ones win."""
        with self._changed:
            self._sandboxes.update(sandboxes)
            self._tokens.update(tokens)
            self._changed.notify()

    def close(self, wait: float) -> int:
        """Finish writing within `wait` seconds; the number of rows left unwritten."""
        with self._changed:
            self._closing = True
            self._deadline = time.monotonic() + wait
            self._changed.notify()
        self.join(wait + BUSY_TIMEOUT + 1)
        if self.db is not None and not self.is_alive():
            with contextlib.suppress(sqlite3.Error):
                self.db.close()
        return self._unwritten

    def run(self) -> None:
        while True:
            with self._changed:
                while not (self._sandboxes or self._tokens or self._closing):
                    self._changed.wait()
                if self._closing and not (self._sandboxes or self._tokens):
                    return
                batch = self._sandboxes, self._tokens
                self._sandboxes, self._tokens = {}, {}
            if not self._write(*batch):
                return

    def _write(self, sandboxes: dict, tokens: dict) -> bool:
        """Write one batch, trying again while locked; False when closing gave up on it."""
        delayed_since = None
        pause = 0.05
        while True:
            try:
                self._check_file()
                self._commit(sandboxes, tokens)
            except Exception as e:  # the writer must outlive any failure, and say so
                error = e
            else:
                if delayed_since is not None:
                    log.info(
                        "state database %s: delayed writes went in after %.1f s",
                        self.path,
                        time.monotonic() - delayed_since,
                    )
                return True
            if isinstance(error, sqlite3.DatabaseError) and _is_damage(error):
                try:
                    self._replace(f"damaged ({error})")
                    continue
                except Exception as e:
                    error = e
            if delayed_since is None:
                delayed_since = time.monotonic()
                why = _unavailable(error)
                log.warning(
                    "writes to state database %s are delayed: %s; sandboxes keep running, "
                    "and the writes go in once %s",
                    self.path,
                    why,
                    _remedy(why, self.path),
                )
            with self._changed:
                if self._closing and time.monotonic() >= self._deadline:
                    self._unwritten = len(sandboxes) + len(tokens) + len(self._sandboxes)
                    self._unwritten += len(self._tokens)
                    return False
                self._changed.wait(pause)
                pause = min(pause * 2, RETRY_MAX)
                # What changed meanwhile goes in with this batch.
                sandboxes.update(self._sandboxes)
                tokens.update(self._tokens)
                self._sandboxes, self._tokens = {}, {}

    def _check_file(self) -> None:
        """Open the database if it is not open yet; replace it if it went away underneath."""
        if self.db is None:
            loaded = _load(self.path)
            if loaded.db is None:
                raise _Unavailable(loaded.fault or "unavailable")
            self.db, self.identity = loaded.db, _identity(self.path)
            self._call_loop(self.late, loaded)
            return
        now = _identity(self.path)
        if now is None:
            self._replace("deleted")
        elif now[2] == 0:
            self._replace("emptied")
        elif self.identity is not None and now[:2] != self.identity[:2]:
            self._replace("replaced by another file")

    def _commit(self, sandboxes: dict, tokens: dict) -> None:
        assert self.db is not None
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            for sandbox_id, row in sandboxes.items():
                if row is None:
                    db.execute("DELETE FROM sandboxes WHERE id = ?", (sandbox_id,))
                else:
                    db.execute(_SAVE_SANDBOX, row)
            for token_hash, row in tokens.items():
                if row is None:
                    db.execute("DELETE FROM ssh_tokens WHERE token_hash = ?", (token_hash,))
                else:
                    db.execute(_SAVE_TOKEN, row)
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        self.identity = _identity(self.path)

    def _replace(self, what: str) -> None:
        """Move a bad database aside, start a new one, and have everything written to it."""
        if self.db is not None:
            with contextlib.suppress(sqlite3.Error):
                self.db.close()
            self.db = None
        kept_as = _move_aside(self.path, what.split()[0])
        self.db = _connect(self.path, BUSY_TIMEOUT)
        self.identity = _identity(self.path)
        kept = f"kept it as {kept_as}, " if kept_as else ""
        log.warning(
            "state database %s was %s while the service ran: %sstarted a new one and wrote "
            "everything the service holds into it; nothing lost",
            self.path,
            what,
            kept,
        )
        self._call_loop(self.resend)

    def _call_loop(self, callback: Any, *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the service is stopping
            self.loop.call_soon_threadsafe(callback, *args)
