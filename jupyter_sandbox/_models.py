"""Plain data returned by the client API."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class CommandResult:
    """Output and exit code of a finished command."""

    stdout: str
    stderr: str
    exit_code: int
    stdout_bytes: bytes = field(default=b"", repr=False)
    stderr_bytes: bytes = field(default=b"", repr=False)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


#: How to have a failed sandbox's files kept where a failure loses them (kubernetes).
KEEP_HOMES = "set JUPYTER_SANDBOX_K8S_HOME=pvc on the service to keep homes across failures"


@dataclass(frozen=True)
class SandboxInfo:
    """A sandbox as listed by the service."""

    id: str
    name: str
    status: str
    created_at: float
    timeout: str | float
    expires_at: float | None
    owner: str
    labels: dict[str, str]
    limits: dict[str, Any]
    network: str
    ended_at: float | None = None
    end_reason: str | None = None
    failure: str | None = None  # why it failed ("out of memory: limit 256 MiB"), when failed
    failed_at: float | None = None
    limits_note: str | None = None
    syscall_filter: str | None = None  # "on: <policy> ..." or "OFF (...)"
    usage: dict[str, Any] | None = None
    user: str = ""  # the OS user who created it
    uid: int = -1  # their uid (-1: a service too old to say)
    recording: bool = False  # its terminal sessions over SSH are recorded
    # Its files outlive a failure (a failed one's are there until its deadline or a kill);
    # False: a failure loses its home (kubernetes with an emptyDir home).
    files_kept: bool = True

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SandboxInfo:
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in names})

    @property
    def time_left(self) -> float | None:
        """Seconds until the deadline; None for a "session" sandbox."""
        return None if self.expires_at is None else max(0.0, self.expires_at - time.time())


@dataclass(frozen=True)
class FileInfo:
    """A file, directory or symlink inside a sandbox."""

    name: str
    path: str
    type: str
    size: int
    mode: int
    mtime: float
    target: str | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FileInfo:
        return cls(**{k: data.get(k) for k in cls.__dataclass_fields__})


# Control characters but tab: a terminal or notebook would act on them instead of showing.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")
AUDIT_STREAM = "audit"  # the stream of the service's audit entries; never a sandbox's


@dataclass(frozen=True)
class LogEntry:
    """One line of a sandbox's log: background process output or an event, or (stream
    ``AUDIT_STREAM``) a line of the service's own audit log of it."""

    seq: int
    time: float
    source: str
    stream: str
    text: str

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LogEntry:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})

    def line(self) -> str:
        """The entry as one line of text for a terminal or a notebook: its source first
        ("[service]" for an entry of the service's audit log, "[proc:12:stdout]" for
        output), then its text with control characters escaped, so that no output can
        pass for a note of the service (a carriage return or an escape sequence rewriting
        what comes before it)."""
        if self.stream == AUDIT_STREAM:
            where = "service"  # the service's own entry: no sandbox can write one
        elif self.stream == "event":
            where = self.source
        else:
            where = f"{self.source}:{self.stream}"
        text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", self.text.rstrip("\n"))
        return f"[{where}] {text}"


@dataclass(frozen=True)
class Recording:
    """One terminal session's recording (asciicast v2): ``Sandbox.recording(name)``."""

    name: str
    started_at: float
    size: int

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Recording:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class OutputLine:
    """A line (or final fragment) of a running command's output."""

    stream: str
    text: str


@dataclass(frozen=True)
class SshAccess:
    """How to SSH into a sandbox. The username is the credential: keep ``command`` private."""

    hostname: str
    port: int
    username: str
    command: str
    expires_at: float | None
    host_key_fingerprint: str
    known_hosts_line: str
    sandbox_id: str = ""

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SshAccess:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    def __repr__(self) -> str:  # never print the token by accident
        return (
            f"SshAccess(hostname={self.hostname!r}, port={self.port}, username='***', "
            f"expires_at={self.expires_at}, host_key_fingerprint="
            f"{self.host_key_fingerprint!r})"
        )

    @property
    def masked_command(self) -> str:
        """The command with the token hidden, safe to save or log."""
        return self.command.replace(self.username, self.username[:4] + "…")


@dataclass(frozen=True)
class Usage:
    """The caller's quota and what their running and failed sandboxes hold against it.

    ``quota`` and ``usage`` have the keys sandboxes, memory (bytes), cpus and (quota only)
    lifetime (seconds); a quota of None is unlimited. ``source`` says which table of the
    service's config file sets each quota key ('group "students"').
    """

    user: str
    uid: int
    instructor: bool
    mode: str  # "system" (one service for the machine), "hub" (hub users, by token), "user"
    quota: dict[str, Any]
    usage: dict[str, Any]
    source: dict[str, str | None] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Usage:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    def left(self, key: str) -> float | None:
        """How much of quota `key` is left (sandboxes, memory, cpus); None if unlimited."""
        limit = self.quota.get(key)
        return None if limit is None else max(0, limit - self.usage.get(key, 0))
