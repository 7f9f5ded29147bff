"""The ``%sandbox_ssh`` widget: SSH command, host key, countdown, live logs, buttons.

A sandbox that fails shows why; its Restart button starts it again, Kill ends it.

The SSH token never enters widget state, which front ends and nbclient save into
the notebook: the synced state holds only the masked command, and the full
command travels in a custom message sent to each live view when it asks
(``{"type": "ready"}``), so a reopened notebook shows nothing secret.

Logs follow the sandbox on the background loop and reach the views as custom
messages batched every 100 ms; views and the replay buffer keep the last
``LOG_LIMIT`` lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anywidget
import traitlets

from .._errors import SandboxError
from .._models import LogEntry, SshAccess
from ..client import AsyncSandbox, Sandbox
from . import _background, _text
from ._sandboxes import KernelSandboxes

LOG_LIMIT = 1000
BATCH_SECONDS = 0.1
TAIL = 200
EXTEND_BY = 600.0
_HERE = Path(__file__).parent


class SshWidget(anywidget.AnyWidget):
    """Live view of a sandbox's SSH access. Its text/plain form hides the token."""

    _esm = _HERE / "widget.js"
    _css = _HERE / "widget.css"

    sandbox_name = traitlets.Unicode().tag(sync=True)
    sandbox_id = traitlets.Unicode().tag(sync=True)
    status = traitlets.Unicode("running").tag(sync=True)
    failure = traitlets.Unicode().tag(sync=True)  # why it failed, while status is "failed"
    ssh_status = traitlets.Unicode("active").tag(sync=True)
    masked_command = traitlets.Unicode().tag(sync=True)
    host_key_fingerprint = traitlets.Unicode().tag(sync=True)
    expires_at = traitlets.Float(None, allow_none=True).tag(sync=True)
    ssh_expires_at = traitlets.Float(None, allow_none=True).tag(sync=True)
    message = traitlets.Unicode().tag(sync=True)

    def __init__(
        self, sandbox: Sandbox, name: str, access: SshAccess, sandboxes: KernelSandboxes
    ) -> None:
        info = sandbox.info()
        super().__init__(
            sandbox_name=name,
            sandbox_id=sandbox.id,
            status=info.status,
            failure=info.failure or "",
            masked_command=access.masked_command,
            host_key_fingerprint=access.host_key_fingerprint,
            expires_at=info.expires_at,
            ssh_expires_at=access.expires_at,
        )
        self._sandbox = sandbox
        self._access = access
        self._sandboxes = sandboxes
        self._info = info
        self._sent: deque[list[str]] = deque(maxlen=LOG_LIMIT)  # replayed to new views
        self.on_msg(self._on_view_message)
        self._follower = _background.submit(self._follow_logs())

    def close(self) -> None:
        self._follower.cancel()
        super().close()

    def __repr__(self) -> str:
        return _text.ssh_text(
            self.sandbox_name, self._info, self._access, ssh_status=self.ssh_status
        )

    # -- messages from views (handled on the kernel's main thread) --------------------------

    def _on_view_message(self, _widget: Any, content: dict[str, Any], _buffers: Any) -> None:
        action = {
            "ready": self._greet,
            "kill": self.kill,
            "restart": self.restart,
            "extend": self.extend,
            "revoke": self.revoke,
        }.get(content.get("type"))
        if action is None:
            return
        try:
            action()
            self.message = ""
        except SandboxError as e:
            self.message = str(e)

    def _greet(self) -> None:
        """Send a view what is not in the state: the full command, the clock and recent logs."""
        _background.loop().call_soon_threadsafe(self._send_greeting)

    def _send_greeting(self) -> None:
        live = self.status == "running" and self.ssh_status == "active"
        self.send(
            {
                "type": "hello",
                "command": self._access.command if live else None,
                "now": time.time(),
                "lines": list(self._sent),
            }
        )

    def kill(self) -> None:
        """End the sandbox."""
        self._sandboxes.kill(self._sandbox)
        self._follower.cancel()
        self.status, self.ssh_status = "killed", "closed"

    def restart(self) -> None:
        """Start a failed sandbox again, with its files; its logs are followed again."""
        self._info = self._sandbox.restart()
        self.status, self.failure = self._info.status, ""
        self._follower.cancel()
        self._follower = _background.submit(self._follow_logs())
        self._greet()  # views get the command back

    def extend(self) -> None:
        """Push a duration sandbox's deadline 10 minutes further."""
        if self.expires_at is None:
            raise SandboxError(
                "a session sandbox lives as long as its kernel; "
                "use `%sandbox extend NAME T` to give it a deadline instead"
            )
        left = max(0.0, self.expires_at - time.time())
        self._info = self._sandbox.extend_timeout(left + EXTEND_BY)
        self.expires_at = self._info.expires_at

    def revoke(self) -> None:
        """Revoke this SSH credential; its live sessions close."""
        self._sandbox.revoke_ssh(self._access)
        self.ssh_status = "revoked"
        self._greet()  # views drop the command

    # -- log following (on the background loop) ---------------------------------------------

    async def _follow_logs(self) -> None:
        batches = _LogBatches(self._send_lines)
        try:
            sandbox = await AsyncSandbox.connect(self.sandbox_id)
            async for entry in sandbox.logs(follow=True, tail=TAIL):
                batches.add(entry)
            with contextlib.suppress(SandboxError):
                self._info = await sandbox.info()
        except SandboxError:
            pass
        finally:
            batches.flush()
        # The log ends when the sandbox does, or fails (its credentials then wait for a
        # restart).
        if self.status == "running":
            self.status = self._info.status if self._info.status != "running" else "ended"
            self.failure = self._info.failure or ""
            if self.status != "failed":
                self.ssh_status = "closed"

    def _send_lines(self, lines: list[list[str]], skipped: int) -> None:
        self._sent.extend(lines)
        self.send({"type": "logs", "lines": lines, "skipped": skipped})


class _LogBatches:
    """Collects log entries and hands them on at most every BATCH_SECONDS, bounded.

    Entries not read (older than the tail, or dropped from a burst larger than the
    log keeps) show up as gaps in ``seq`` and are reported as skipped, like the
    ones left out of a batch to keep it within LOG_LIMIT.
    """

    def __init__(self, send: Callable[[list[list[str]], int], None]) -> None:
        self.send = send
        self.pending: list[list[str]] = []
        self.skipped = 0
        self.last_seq: int | None = None
        self.timer: asyncio.TimerHandle | None = None

    def add(self, entry: LogEntry) -> None:
        # Log entries are numbered from 1: anything before the first one we get (older
        # than the tail we asked for) counts as skipped too.
        previous = 0 if self.last_seq is None else self.last_seq
        if entry.seq > previous + 1:
            self.skipped += entry.seq - previous - 1
        self.last_seq = entry.seq
        self.pending.append([entry.stream, entry.source, entry.text.rstrip("\n")])
        if self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(BATCH_SECONDS, self.flush)

    def flush(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.pending or self.skipped:
            lines = self.pending[-LOG_LIMIT:]
            self.send(lines, self.skipped + len(self.pending) - len(lines))
            self.pending, self.skipped = [], 0
