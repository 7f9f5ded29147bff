"""The service's own audit log of each sandbox: what it noted, out of the sandbox's reach.

SSH sessions, instructor actions, recordings, failures and restarts are noted here,
not in the sandbox's log (which its agent writes, so a sandbox could drop or forge
lines there). The file, ``audit.jsonl``, lives in the sandbox's directory beside its
record, which the sandbox cannot see; only the service writes it, appending whole
lines (``O_APPEND``, mode 0600), so what was written survives a SIGKILL of the service
and is read again by the next one. It goes with the sandbox's directory at its end.

Its size is bounded: past ``AUDIT_LIMIT`` bytes the file is rotated to
``audit.jsonl.1`` (the one before is dropped), so the newest lines are kept; entries
are numbered, and a reader told of dropped ones gets a line saying how many.
``logs()`` merges these entries, marked with stream ``AUDIT_STREAM``, with the
sandbox's own output; the checks of ``untrusted.messages`` keep that stream from ever
coming from an agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from .._models import AUDIT_STREAM

log = logging.getLogger("jupyter_sandbox.service")

AUDIT_NAME = "audit.jsonl"
AUDIT_LIMIT = 1 << 20  # bytes of audit.jsonl; rotated before it would grow past this
MAX_TEXT = 16 << 10  # characters of one entry's text
WATCHER_BACKLOG = 10_000  # entries a slow follower may fall behind before it misses some


class AuditLog:
    """One sandbox's audit entries: appended by the service, read by ``logs()``."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.path = Path(directory) / AUDIT_NAME
        self.rotated = self.path.with_name(AUDIT_NAME + ".1")
        self.seq: int | None = None  # the last entry's number, read from the files once
        self.watchers: set[asyncio.Queue] = set()

    def note(self, source: str, text: str) -> dict[str, Any]:
        """Append an entry; a full disk or a vanished directory loses it from the file
        (logged), never from those following the log now."""
        if self.seq is None:
            self.seq = max((e["seq"] for e in self.entries()), default=0)
        self.seq += 1
        entry = {
            "seq": self.seq,
            "time": time.time(),
            "source": source,
            "stream": AUDIT_STREAM,
            "text": text.replace("\0", "\ufffd")[:MAX_TEXT],
        }
        try:
            self._append((json.dumps(entry) + "\n").encode())
        except OSError as e:
            log.warning("could not write the audit log %s: %s (%r)", self.path, e, text)
        for queue in list(self.watchers):
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(entry)
        return entry

    def _append(self, line: bytes) -> None:
        with contextlib.suppress(FileNotFoundError):
            if os.lstat(self.path).st_size + len(line) > AUDIT_LIMIT:
                os.replace(self.path, self.rotated)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(self.path, flags, 0o600)
        try:
            start = os.fstat(fd).st_size
            if os.write(fd, line) != len(line):  # a full disk took part of it: take it back
                os.ftruncate(fd, start)
                raise OSError(errno.ENOSPC, "the disk took only part of an audit entry")
        finally:
            os.close(fd)

    def entries(self) -> list[dict[str, Any]]:
        """Every entry kept, oldest first; if older ones were dropped to keep the size
        bound, the first says how many."""
        found: list[dict[str, Any]] = []
        for path in (self.rotated, self.path):
            found += _read(path)
        if found and found[0]["seq"] > 1:
            dropped = found[0]["seq"] - 1
            found.insert(0, _dropped_note(dropped, found[0]["time"]))
        return found

    def watch(self) -> asyncio.Queue:
        """A queue that gets every entry noted from now on; give it back with `unwatch`."""
        queue: asyncio.Queue = asyncio.Queue(WATCHER_BACKLOG)
        self.watchers.add(queue)
        return queue

    def unwatch(self, queue: asyncio.Queue) -> None:
        self.watchers.discard(queue)


def _dropped_note(count: int, before: float) -> dict[str, Any]:
    return {
        "seq": count,
        "time": before,
        "source": "service",
        "stream": AUDIT_STREAM,
        "text": f"{count} earlier audit line(s) dropped: the audit log keeps its newest "
        f"{2 * AUDIT_LIMIT >> 10} KiB at most",
    }


def _read(path: Path) -> list[dict[str, Any]]:
    """The entries of one file; a line cut by a crash or damaged on disk is skipped."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return []
    with open(fd, "rb") as f:
        data = f.read(AUDIT_LIMIT * 2)
    found = []
    for line in data.splitlines():
        try:
            entry = json.loads(line)
            found.append(
                {
                    "seq": int(entry["seq"]),
                    "time": float(entry["time"]),
                    "source": str(entry["source"]),
                    "stream": AUDIT_STREAM,
                    "text": str(entry["text"]),
                }
            )
        except (ValueError, TypeError, KeyError):
            continue
    return found


class AuditTrail:
    """The audit logs of a service's sandboxes, by sandbox id."""

    def __init__(self) -> None:
        self.logs: dict[str, AuditLog] = {}

    def of(self, sandbox_id: str, directory: str | os.PathLike) -> AuditLog:
        audit = self.logs.get(sandbox_id)
        if audit is None or audit.path.parent != Path(directory):
            audit = self.logs[sandbox_id] = AuditLog(directory)
        return audit

    def forget(self, sandbox_id: str) -> None:
        """The sandbox ended: its file went with its directory."""
        self.logs.pop(sandbox_id, None)
