"""Durable state of the service: SQLite in WAL mode (stdlib).

Everything needed to find running sandboxes again after the service is
killed lives here: their records, how to reach their agents, their leases and
deadlines, and the hashes of their SSH credentials.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

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
    failed_at REAL
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
    revoked INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS ssh_tokens_sandbox ON ssh_tokens(sandbox_id);
"""

RUNNING = "running"
POOLED = "pooled"
FAILED = "failed"  # ended unexpectedly: processes stopped, files kept until deadline or kill
ENDED = "ended"
# Columns added after the first release, with their types: added to older databases.
ADDED_COLUMNS = {"failure": "TEXT", "failed_at": "REAL"}
_JSON_FIELDS = ("labels", "env", "limits")


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


class State:
    """Thin synchronous access to the database; calls are short and local."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        have = {row[1] for row in self.db.execute("PRAGMA table_info(sandboxes)")}
        for name, kind in ADDED_COLUMNS.items():
            if name not in have:
                self.db.execute(f"ALTER TABLE sandboxes ADD COLUMN {name} {kind}")

    def close(self) -> None:
        self.db.close()

    def save(self, record: SandboxRecord) -> None:
        row = asdict(record)
        for name in _JSON_FIELDS:
            row[name] = json.dumps(row[name])
        columns = ", ".join(row)
        marks = ", ".join(f":{k}" for k in row)
        self.db.execute(f"INSERT OR REPLACE INTO sandboxes ({columns}) VALUES ({marks})", row)

    def running(self) -> list[SandboxRecord]:
        rows = self.db.execute("SELECT * FROM sandboxes WHERE status = ?", (RUNNING,))
        return [_record(r) for r in rows]

    def failed(self) -> list[SandboxRecord]:
        rows = self.db.execute("SELECT * FROM sandboxes WHERE status = ?", (FAILED,))
        return [_record(r) for r in rows]

    def pooled(self) -> list[SandboxRecord]:
        rows = self.db.execute("SELECT * FROM sandboxes WHERE status = ?", (POOLED,))
        return [_record(r) for r in rows]

    def get(self, ref: str) -> SandboxRecord | None:
        """The sandbox with this id, or the newest with this name."""
        row = self.db.execute(
            "SELECT * FROM sandboxes WHERE id = ? OR name = ? "
            "ORDER BY (status IN ('running', 'failed')) DESC, created_at DESC LIMIT 1",
            (ref, ref),
        ).fetchone()
        return _record(row) if row else None

    def forget_ended(self, older_than: float) -> None:
        self.db.execute(
            "DELETE FROM sandboxes WHERE status = ? AND ended_at < ?",
            (ENDED, time.time() - older_than),
        )

    # -- SSH credentials ---------------------------------------------------------------

    def add_token(
        self,
        token_hash: str,
        sandbox_id: str,
        expires_at: float | None,
        single_use: bool,
        public_key: str | None,
    ) -> None:
        self.db.execute(
            "INSERT INTO ssh_tokens (token_hash, sandbox_id, created_at, expires_at, single_use,"
            " public_key) VALUES (?, ?, ?, ?, ?, ?)",
            (token_hash, sandbox_id, time.time(), expires_at, int(single_use), public_key),
        )

    def token(self, token_hash: str) -> sqlite3.Row | None:
        return self.db.execute(
            "SELECT * FROM ssh_tokens WHERE token_hash = ?", (token_hash,)
        ).fetchone()

    def use_token(self, token_hash: str) -> bool:
        """Mark a single-use token used; False if it already was."""
        cursor = self.db.execute(
            "UPDATE ssh_tokens SET used = 1 WHERE token_hash = ? AND used = 0", (token_hash,)
        )
        return cursor.rowcount == 1

    def revoke_tokens(self, sandbox_id: str, token_hash: str | None = None) -> list[str]:
        """Revoke one or all of a sandbox's tokens; returns the hashes revoked."""
        query = "SELECT token_hash FROM ssh_tokens WHERE sandbox_id = ? AND revoked = 0"
        args: tuple = (sandbox_id,)
        if token_hash is not None:
            query += " AND token_hash = ?"
            args += (token_hash,)
        hashes = [r[0] for r in self.db.execute(query, args)]
        self.db.executemany(
            "UPDATE ssh_tokens SET revoked = 1 WHERE token_hash = ?", [(h,) for h in hashes]
        )
        return hashes

    def delete_tokens(self, sandbox_id: str) -> None:
        self.db.execute("DELETE FROM ssh_tokens WHERE sandbox_id = ?", (sandbox_id,))


def _record(row: sqlite3.Row) -> SandboxRecord:
    data = dict(row)
    for name in _JSON_FIELDS:
        data[name] = json.loads(data[name])
    return SandboxRecord(**data)
