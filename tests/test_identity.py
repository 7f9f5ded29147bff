"""Who a sandbox belongs to: its creator's OS user, kept in its record and shown to clients.

In per-user mode every caller is the service's own user; records written before users
were kept read as the service's user.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import sqlite3
from pathlib import Path

import pytest

from jupyter_sandbox import Sandbox
from jupyter_sandbox.backends.storage import RECORD
from jupyter_sandbox.service.identity import Caller, Directory, acting_for, service_caller
from jupyter_sandbox.service.state import State
from tests.conftest import ServiceEnv, unnamed_id

pytestmark = pytest.mark.unprivileged

OWN_NAME = pwd.getpwuid(os.getuid()).pw_name

# The schema of the version before users were kept, with one sandbox and one credential.
OLD_SCHEMA = """
CREATE TABLE sandboxes (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, status TEXT NOT NULL, created_at REAL NOT NULL,
    timeout REAL, expires_at REAL, lease_id TEXT, lease_expires REAL,
    owner TEXT NOT NULL DEFAULT '', labels TEXT NOT NULL DEFAULT '{}',
    env TEXT NOT NULL DEFAULT '{}', network TEXT NOT NULL DEFAULT 'none',
    limits TEXT NOT NULL DEFAULT '{}', runtime TEXT, ended_at REAL, end_reason TEXT,
    failure TEXT, failed_at REAL
);
CREATE TABLE ssh_tokens (
    token_hash TEXT PRIMARY KEY, sandbox_id TEXT NOT NULL, created_at REAL NOT NULL,
    expires_at REAL, single_use INTEGER NOT NULL DEFAULT 0, used INTEGER NOT NULL DEFAULT 0,
    public_key TEXT, revoked INTEGER NOT NULL DEFAULT 0
);
INSERT INTO sandboxes (id, name, status, created_at, ended_at, end_reason)
    VALUES ('sb-0ld0000001', 'old', 'ended', 1.0, 2.0, 'killed');
INSERT INTO ssh_tokens (token_hash, sandbox_id, created_at) VALUES ('h1', 'sb-0ld0000002', 1.0);
"""

OLD_RECORD_FILE = {
    "format": 1,
    "record": {"id": "sb-0ld0000002", "name": "kept", "status": "failed", "created_at": 1.0},
    "ssh_tokens": [{"token_hash": "h1", "sandbox_id": "sb-0ld0000002", "created_at": 1.0}],
}


class _Files:
    """Sandbox record files held in memory, as the backend would read them from disk."""

    def __init__(self, records: dict[str, bytes]) -> None:
        self.records = records

    def write_record(self, sandbox_id: str, data: bytes) -> None:
        self.records[sandbox_id] = data

    def read_records(self) -> dict[str, bytes]:
        return dict(self.records)


def test_a_sandbox_belongs_to_the_os_user_who_created_it(
    sandbox: Sandbox, service_env: ServiceEnv
) -> None:
    listed = {info.id: info for info in Sandbox.list()}
    assert (listed[sandbox.id].user, listed[sandbox.id].uid) == (OWN_NAME, os.getuid())
    info = sandbox.info()
    assert (info.user, info.uid) == (OWN_NAME, os.getuid())
    sandbox.expose_ssh()  # the credential keeps the uid of whoever asked for it
    record = json.loads((service_env.storage / "sandboxes" / sandbox.id / RECORD).read_text())
    assert (record["record"]["user"], record["record"]["uid"]) == (OWN_NAME, os.getuid())
    assert [token["uid"] for token in record["ssh_tokens"]] == [os.getuid()]


def test_records_from_before_users_were_kept_read_as_the_services_user(tmp_path: Path) -> None:
    database = tmp_path / "state.sqlite3"
    with sqlite3.connect(database) as db:
        db.executescript(OLD_SCHEMA)
    files = _Files({"sb-0ld0000002": json.dumps(OLD_RECORD_FILE).encode()})

    async def load() -> State:
        return await State.open(database, files, 10.0)

    state = asyncio.run(load())
    try:
        ended, kept = state.get("sb-0ld0000001"), state.get("sb-0ld0000002")
        assert ended is not None and kept is not None
        assert (ended.user, ended.uid) == (OWN_NAME, os.getuid())
        assert (kept.user, kept.uid) == (OWN_NAME, os.getuid())
        token = state.token("h1")
        assert token is not None and token.uid == os.getuid()
    finally:
        state.close()
    with sqlite3.connect(database) as db:  # the one rebuilt from its file, written back
        row = db.execute("SELECT user, uid FROM sandboxes WHERE id = 'sb-0ld0000002'").fetchone()
    assert row == (OWN_NAME, os.getuid())


def test_the_service_user_is_never_an_instructor() -> None:
    own = service_caller()
    assert (own.uid, own.user, own.instructor) == (os.getuid(), OWN_NAME, False)
    assert own.groups  # at least its primary group


def test_a_uid_without_a_passwd_entry_is_named_by_its_number() -> None:
    uid = unnamed_id()
    caller = Directory(["teachers"]).caller(uid)
    assert caller == Caller(uid=uid, user=str(uid), groups=frozenset(), instructor=False)


def test_root_is_an_instructor_and_so_are_members_of_an_instructor_group() -> None:
    assert Directory().caller(0).instructor
    nobody = pwd.getpwnam("nobody")
    assert not Directory(["no-such-group-here"]).caller(nobody.pw_uid).instructor
    (group,) = Directory().caller(nobody.pw_uid).groups
    assert Directory([group]).caller(nobody.pw_uid).instructor


def test_acting_for_is_honoured_only_from_root_or_an_instructor() -> None:
    student = Caller(uid=4242, user="alice", groups=frozenset(), instructor=False)
    teacher = Caller(uid=4343, user="bob", groups=frozenset({"t"}), instructor=True)
    assert acting_for(student, "bob").acting_for is None
    assert acting_for(teacher, "carol").actor == "carol (via bob)"
    assert acting_for(teacher, "\x1b[2Jcarol\n").acting_for == "[2Jcarol"
    assert acting_for(teacher, None) is teacher
