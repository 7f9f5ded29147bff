"""The ``%sandbox_ssh`` widget: SSH command, host key, countdown, live logs, buttons.

It follows the truth: a credential that expires or is revoked shows so and its
command is taken back from the views; a sandbox that ends, by anything (a kill
elsewhere, its deadline, a lapsed lease), shows why and its live actions go; one
that fails shows why, its Restart button starts it again, Kill ends it. A view
whose kernel is gone (restarted, shut down) says so itself (widget.js).

The SSH token never enters widget state, which front ends and nbclient save into
the notebook: the synced state holds only the masked command, and the full
command travels in a custom message sent to each live view when it asks
(``{"type": "ready"}``), so a reopened notebook shows nothing secret. Its
text/plain and text/html forms are a dated, masked record, and its output is
marked (``OUTPUT_METADATA``) so that a saved notebook keeps only them (see
``jupyter_sandbox.serverext.saving``).

Logs follow the sandbox on the background loop and reach the views as custom
messages batched every 100 ms; views and the replay buffer keep the last
``LOG_LIMIT`` lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anywidget
import traitlets

from .._errors import SandboxError, SandboxExpired, SandboxNotFound
from .._models import LogEntry, SandboxInfo, SshAccess
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

    # Marks the output that shows it: a saved notebook keeps its text forms only.
    OUTPUT_METADATA = {"jupyter_sandbox": {"saved_as": "text"}}

    sandbox_name = traitlets.Unicode().tag(sync=True)
    sandbox_id = traitlets.Unicode().tag(sync=True)
    status = traitlets.Unicode("running").tag(sync=True)
    failure = traitlets.Unicode().tag(sync=True)  # why it failed, while status is "failed"
    files_kept = traitlets.Bool(True).tag(sync=True)  # its files outlive a failure
    end_reason = traitlets.Unicode().tag(sync=True)  # why it ended, once status is "ended"
    ssh_status = traitlets.Unicode("active").tag(sync=True)
    masked_command = traitlets.Unicode().tag(sync=True)
    host_key_fingerprint = traitlets.Unicode().tag(sync=True)
    expires_at = traitlets.Float(None, allow_none=True).tag(sync=True)
    ssh_expires_at = traitlets.Float(None, allow_none=True).tag(sync=True)
    message = traitlets.Unicode().tag(sync=True)
    recording = traitlets.Bool(False).tag(sync=True)  # its terminal sessions are recorded

    def __init__(
        self, sandbox: Sandbox, name: str, access: SshAccess, sandboxes: KernelSandboxes
    ) -> None:
        info = sandbox.info()
        super().__init__(
            sandbox_name=name,
            sandbox_id=sandbox.id,
            status=info.status,
            failure=info.failure or "",
            files_kept=info.files_kept,
            masked_command=access.masked_command,
            host_key_fingerprint=access.host_key_fingerprint,
            expires_at=info.expires_at,
            ssh_expires_at=access.expires_at,
            recording=info.recording,
        )
        self._sandbox = sandbox
        self._access = access
        self._sandboxes = sandboxes
        self._info = info
        self._sent: deque[list[str]] = deque(maxlen=LOG_LIMIT)  # replayed to new views
        self._shown_at = time.time()
        self.on_msg(self._on_view_message)
        self._follower = _background.submit(self._follow_logs())
        self._expiry = _background.submit(self._expire_credential())
        sandboxes.on_revoke(sandbox.id, self._revoked_elsewhere)

    def close(self) -> None:
        self._follower.cancel()
        self._expiry.cancel()
        super().close()

    def __repr__(self) -> str:
        return _text.ssh_record(self.sandbox_name, self._info, self._access, self._shown_at)

    def _repr_mimebundle_(self, **kwargs: Any) -> tuple[dict, dict] | None:
        shown = super()._repr_mimebundle_(**kwargs)
        if shown is not None:
            data, _ = shown
            data["text/html"] = f'<pre class="jsbw-saved">{html.escape(data["text/plain"])}</pre>'
        return shown

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
        """End the sandbox; if it had ended already, show why."""
        try:
            self._sandbox.info()  # a kill itself does not tell whether there was one to end
        except (SandboxExpired, SandboxNotFound):
            self._sandboxes.forget(self.sandbox_id)
            self._ended(self.end_reason or _end_reason(self.sandbox_id))
            raise SandboxError(
                f"nothing to kill: sandbox {self.sandbox_name!r} had already ended "
                f"({self.end_reason})"
            ) from None
        self._sandboxes.kill(self._sandbox)
        self._follower.cancel()
        self._ended("killed")

    def _ended(self, reason: str) -> None:
        """The sandbox is gone: say why, and take the command back from the views."""
        self.status, self.ssh_status = "ended", "closed"
        self.end_reason = reason or self.end_reason or "ended"
        self._expiry.cancel()
        self._greet()

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
        self._revoked_elsewhere()

    def _revoked_elsewhere(self) -> None:
        if self.ssh_status == "active":
            self.ssh_status = "revoked"
            self._expiry.cancel()
            self._greet()  # views drop the command

    async def _expire_credential(self) -> None:
        """At the credential's TTL: it is expired, and the views drop its command."""
        if self.ssh_expires_at is None:
            return
        await asyncio.sleep(max(0.0, self.ssh_expires_at - time.time()))
        if self.ssh_status == "active":
            self.ssh_status = "expired"
            self._send_greeting()

    # -- log following (on the background loop) ---------------------------------------------

    async def _follow_logs(self) -> None:
        batches = _LogBatches(self._send_lines)
        end_reason = ""
        try:
            sandbox = await AsyncSandbox.connect(self.sandbox_id)
            async for entry in sandbox.logs(follow=True, tail=TAIL):
                batches.add(entry)
            self._info = await sandbox.info()
        except SandboxExpired:  # its log ends once its end is recorded: say why
            end_reason = await _ended_reason(self.sandbox_id)
        except SandboxError:
            pass
        finally:
            batches.flush()
        # The log ends when the sandbox does, or fails (its credentials then wait for a
        # restart).
        if self.status != "running":
            return
        if self._info.status == "failed":
            self.status, self.failure = "failed", self._info.failure or ""
            self.files_kept = self._info.files_kept
            self._send_greeting()
        else:
            self._ended(end_reason or self._info.end_reason or "")

    def _send_lines(self, lines: list[list[str]], skipped: int) -> None:
        self._sent.extend(lines)
        self.send({"type": "logs", "lines": lines, "skipped": skipped})


def _end_reason(sandbox_id: str) -> str:
    """Why the service says a sandbox ended ("" if it does not know it)."""
    return _reason_of(Sandbox.list(include_ended=True), sandbox_id)


async def _ended_reason(sandbox_id: str) -> str:
    """As ``_end_reason``, on the kernel's event loop ("" if the service cannot say)."""
    with contextlib.suppress(SandboxError):
        return _reason_of(await AsyncSandbox.list(include_ended=True), sandbox_id)
    return ""


def _reason_of(infos: list[SandboxInfo], sandbox_id: str) -> str:
    """Why the sandbox `sandbox_id` among `infos` ended ("" if it is not among them)."""
    ended = {i.id: i for i in infos}.get(sandbox_id)
    return (ended.end_reason or "") if ended else ""


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
        # The service's audit entries are numbered apart: they leave no gaps here.
        previous = 0 if self.last_seq is None else self.last_seq
        if entry.stream != "audit" and entry.seq > previous + 1:
            self.skipped += entry.seq - previous - 1
        if entry.stream != "audit":
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
