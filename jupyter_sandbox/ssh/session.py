"""Session channels (shell, exec, subsystem) bridged to an agent ``exec`` stream.

One `SandboxSession` per channel: the client's requests choose what to run
(login shell, ``bash -lc COMMAND`` or the SFTP server), the agent runs it
inside the sandbox, and two copy loops relay data with flow control both ways:
client input is queued and the channel paused while the agent is behind;
agent output is read only while the channel can take more. Each session's start
and end go into the sandbox's log (``audit``); a pty session of a sandbox whose
terminals are recorded is told so and its output recorded (``recording``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncssh

from .._errors import SandboxError
from ..agent.protocol import Frame
from ..agent.remote import AgentStream
from .audit import ChannelAudit, exit_outcome, shown
from .recording import NOTICE, Recording
from .sftp import SubsystemUnavailable, sftp_server_argv

if TYPE_CHECKING:
    from .gateway import Target

LOGIN_SHELL = ["/bin/bash", "-l"]
CLIENT_ENV = re.compile(r"LANG|LC_[A-Z_]+|TERM")
LOST = 255  # exit status when the sandbox went away, as OpenSSH reports a lost connection
INPUT_QUEUE_LIMIT = 16  # queued client messages before the channel stops reading
MAX_TERM_CELLS = 10_000  # rows or columns of a pty (tmux's limit too; the kernel's is 65535)
DEFAULT_TERM_SIZE = (80, 24)
TERM_TYPE = re.compile(r"[\w.+-]{0,64}")


def clamp_term_size(cols: int, rows: int) -> tuple[int, int]:
    """A client's terminal size within 1..MAX_TERM_CELLS; 0 (unset) is the default."""

    def clamp(value: int, default: int) -> int:
        return min(value, MAX_TERM_CELLS) if value > 0 else default

    return clamp(cols, DEFAULT_TERM_SIZE[0]), clamp(rows, DEFAULT_TERM_SIZE[1])


def session_env(base: dict[str, str], client: Any) -> dict[str, str]:
    """The target's environment plus the locale and TERM variables the client sent."""
    sent = {k: v for k, v in client.items() if CLIENT_ENV.fullmatch(k)}
    return {**base, **sent}


class SandboxSession(asyncssh.SSHServerSession):
    """One session channel, served by a command the agent runs inside the sandbox."""

    def __init__(self, target: Target, audit: ChannelAudit) -> None:
        self.target = target
        self.audit = audit
        self.chan: asyncssh.SSHServerChannel | None = None
        self.pty: dict[str, Any] | None = None
        self.argv: list[str] | None = None
        self.what = ""  # what the client asked for, as the sandbox's log shows it
        self.sftp = False
        self.recording: Recording | None = None
        self.inbound: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue()
        # Requests the client can repeat at will wait in `inbound` at most once each: the
        # latest terminal size (sent when its turn comes) and each signal.
        self.size_pending: bytes | None = None
        self.signals_pending: set[bytes] = set()
        self.writable = asyncio.Event()
        self.writable.set()
        self.reading_paused = False
        self.task: asyncio.Task | None = None

    # -- requests from the client ------------------------------------------------------

    def connection_made(self, chan: asyncssh.SSHServerChannel) -> None:
        self.chan = chan

    def pty_requested(
        self, term_type: str, term_size: tuple[int, int, int, int], term_modes: Any
    ) -> bool:
        """A pty of a sane type and a size clamped to MAX_TERM_CELLS (pixels are unused)."""
        if not TERM_TYPE.fullmatch(term_type):
            return False  # the client goes on without a pty, as OpenSSH's does when refused
        cols, rows = clamp_term_size(*term_size[:2])
        self.pty = {"rows": rows, "cols": cols, "term": term_type}
        return True

    def shell_requested(self) -> bool:
        self.argv = LOGIN_SHELL
        self.what = "shell"
        return True

    def exec_requested(self, command: str) -> bool:
        self.argv = ["/bin/bash", "-lc", command]
        self.what = f"exec {shown(command)}"
        return True

    def subsystem_requested(self, subsystem: str) -> bool:
        self.sftp = subsystem == "sftp"
        if self.sftp:
            self.what = "sftp"
        else:
            self.audit.refused(f"subsystem {shown(subsystem, 100)}", "only sftp is served")
        return self.sftp

    def session_started(self) -> None:
        pty = self.pty
        terminal = f", pty {pty['cols']}x{pty['rows']} {shown(pty['term'])}" if pty else ""
        self.audit.start(self.what + terminal)
        self.task = asyncio.ensure_future(self._serve())

    def connection_lost(self, exc: Exception | None) -> None:
        if self.task is not None:
            self.task.cancel()  # closing the agent stream ends the command
        else:
            self.audit.end("closed before it started")

    # -- input ------------------------------------------------------------------------

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self.audit.bytes_in += len(data)
        self._queue(Frame.STDIN, data)

    def eof_received(self) -> bool:
        if self.pty is None:  # on a tty OpenSSH keeps the terminal open, so do we
            self._queue(Frame.EOF, b"")
        return True  # half-open: output may still follow

    def terminal_size_changed(self, width: int, height: int, pixwidth: int, pixheight: int) -> None:
        cols, rows = clamp_term_size(width, height)
        if self.recording is not None:
            self.recording.resize(cols, rows)
        if self.size_pending is None:
            self._queue(Frame.RESIZE, b"")  # stands for whatever size is latest when sent
        self.size_pending = json.dumps({"rows": rows, "cols": cols}).encode()

    def signal_received(self, signal_name: str) -> None:
        number = getattr(signal, f"SIG{signal_name}", None)
        payload = str(int(number)).encode() if isinstance(number, signal.Signals) else None
        if payload is not None and payload not in self.signals_pending:
            self.signals_pending.add(payload)
            self._queue(Frame.SIGNAL, payload)

    def break_received(self, msec: int) -> bool:
        self.signal_received("INT")
        return True

    def _queue(self, kind: int, payload: bytes) -> None:
        self.inbound.put_nowait((kind, payload))
        if self.inbound.qsize() >= INPUT_QUEUE_LIMIT and not self.reading_paused:
            self.reading_paused = True
            self.chan.pause_reading()

    # -- output flow control ------------------------------------------------------------

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    # -- the bridge -------------------------------------------------------------------

    async def _serve(self) -> None:
        outcome = "closed before the command ended"
        try:
            outcome = await self._bridge()
        finally:
            self._stop_recording()
            self.audit.end(outcome)

    async def _bridge(self) -> str:
        """Run the command and relay it; how it ended, in words."""
        assert self.chan is not None
        try:
            stream = await self._start()
        except (SandboxError, SubsystemUnavailable) as e:
            self.chan.write_stderr(f"jupyter-sandbox: {e}\r\n".encode())
            self.chan.exit(LOST if isinstance(e, SandboxError) else 1)
            return f"could not start: {e}"
        if self.pty is not None and self.target.record_in is not None:
            self._start_recording()
        sender = asyncio.ensure_future(self._to_agent(stream))
        try:
            status = await self._from_agent(stream)
        except SandboxError as e:  # an agent that broke the protocol: end, and say why
            self.chan.write_stderr(f"\r\njupyter-sandbox: {e}\r\n".encode())
            self.chan.exit(LOST)
            return f"ended: {e} (exit status {LOST})"
        finally:
            sender.cancel()
            await stream.close()
        if status is None:
            self.chan.exit(LOST)
            return f"the sandbox went away (exit status {LOST})"
        self.chan.exit(status["exit_code"])
        return exit_outcome(status["exit_code"], status.get("signal"))

    def _start_recording(self) -> None:
        """Tell the user, then record; a recording that cannot start is said in the log."""
        assert self.chan is not None and self.pty is not None
        notice = f"{NOTICE}\r\n".encode()
        self.chan.write(notice)
        self.audit.bytes_out += len(notice)
        try:
            self.recording = Recording.start(
                Path(self.target.record_in),
                self.pty["cols"],
                self.pty["rows"],
                self.pty["term"],
                self.what,
            )
        except OSError as e:
            self.audit.note(f"terminal not recorded: {e.strerror or e}")
            return
        self.audit.note(f"recording the terminal to {self.recording.name}")

    def _stop_recording(self) -> None:
        recording, self.recording = self.recording, None
        if recording is None:
            return
        recording.close()
        if recording.stopped is not None:
            self.audit.note(f"recording {recording.name} truncated: {recording.stopped}")

    async def _start(self) -> AgentStream:
        target = self.target
        argv = await sftp_server_argv(target.agent, target.sftp) if self.sftp else self.argv
        env = session_env(self.target.env, self.chan.get_environment())
        stream = await self.target.agent.open("exec", argv=argv, env=env, pty=self.pty, stdin=True)
        try:
            await stream.result()
        except SandboxError:
            await stream.close()
            raise
        return stream

    async def _to_agent(self, stream: AgentStream) -> None:
        with contextlib.suppress(ConnectionError):
            while True:
                kind, payload = await self.inbound.get()
                if kind == Frame.RESIZE:
                    payload, self.size_pending = self.size_pending or b"", None
                elif kind == Frame.SIGNAL:
                    self.signals_pending.discard(payload)
                await stream.send(kind, payload)
                if self.reading_paused and self.inbound.qsize() < INPUT_QUEUE_LIMIT // 2:
                    self.reading_paused = False
                    self.chan.resume_reading()

    async def _from_agent(self, stream: AgentStream) -> dict[str, Any] | None:
        """Command output to the channel; the command's exit status at the end (its
        ``exit_code`` and ``signal``), None if the sandbox went away first."""
        while (frame := await stream.recv()) is not None:
            kind, payload = frame
            if kind == Frame.EXIT:
                return json.loads(payload)
            if kind == Frame.STDOUT:
                self.chan.write(payload)
            elif kind == Frame.STDERR:
                self.chan.write_stderr(payload)
            if kind in (Frame.STDOUT, Frame.STDERR):
                self.audit.bytes_out += len(payload)
                if self.recording is not None:
                    self.recording.output(payload)
            await self.writable.wait()
        return None
