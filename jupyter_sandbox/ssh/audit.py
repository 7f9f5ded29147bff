"""What the sandbox's log says about SSH: each connection and each channel, start and end.

The lines go through the gateway's event sink into the service's audit log of the
sandbox (``service.audit_log``), which ``logs()``, the widget and the panel show with
the sandbox's output, so the student sees what the teacher sees. A line
names the time (UTC), the client's address and port, the local peer's OS user when
the client runs on this host, what was asked for (a shell and its pty, the exact
exec command, SFTP, a forward), and at the end how long it took, how it ended and the
bytes each way. Text the client chose (commands, terminal types, forward targets) is
escaped and bounded by `shown`; tokens are never passed here.
"""

from __future__ import annotations

import itertools
import pwd
import signal
import time
from collections.abc import Callable

from . import peers

SHOWN_LIMIT = 1000  # characters of client-chosen text a line shows, escaped
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}

Emit = Callable[[str], None]


def shown(text: str, limit: int = SHOWN_LIMIT) -> str:
    """`text` quoted, with control and non-printable characters escaped, at most about
    `limit` characters; a longer one ends in an ellipsis and says how long it was."""
    out, used = [], 0
    for count, char in enumerate(text):
        piece = _escape(char)
        if used + len(piece) > limit:
            return f'"{"".join(out)}…" ({len(text)} characters, the first {count} shown)'
        out.append(piece)
        used += len(piece)
    return f'"{"".join(out)}"'


def _escape(char: str) -> str:
    if char in _ESCAPES:
        return _ESCAPES[char]
    if char.isprintable():
        return char
    code = ord(char)
    return (
        f"\\x{code:02x}"
        if code < 0x100
        else f"\\u{code:04x}"
        if code < 0x10000
        else f"\\U{code:08x}"
    )


def utc(moment: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(moment))


def size(count: int) -> str:
    """Bytes as people read them: 512 B, 3.4 KiB, 1.2 MiB."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{count} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def peer_user(uid: int | None) -> str:
    """ "local user alice, uid 1001" for a local peer, "local user unknown" if not asked."""
    if uid is None:
        return "local user unknown"
    try:
        return f"local user {pwd.getpwuid(uid).pw_name}, uid {uid}"
    except KeyError:
        return f"local user uid {uid}"


def exit_outcome(exit_code: int | None, signal_number: int | None) -> str:
    if signal_number is not None:
        try:
            name = signal.Signals(signal_number).name
        except ValueError:
            name = str(signal_number)
        return f"killed by signal {name.removeprefix('SIG')} (exit status {exit_code})"
    return f"exit status {exit_code}"


class ConnectionAudit:
    """The log lines of one SSH connection; numbers its channels."""

    def __init__(self, emit: Emit, address: str, port: int, peer: peers.Peer) -> None:
        self.emit = emit
        self.started = time.time()
        local = f" ({peer_user(peer.uid)})" if peer.local else ""
        self.peer = f"{address} port {port}"
        self.origin = self.peer + local  # the first line of each says who, the others refer
        self._numbers = itertools.count(1)

    def opened(self, single_use: bool) -> None:
        single = " (single-use token)" if single_use else ""
        self.emit(f"SSH connection from {self.origin} at {utc(self.started)}{single}")

    def closed(self) -> None:
        self.emit(
            f"SSH connection from {self.peer} closed after {duration(time.time() - self.started)}"
        )

    def channel(self) -> ChannelAudit:
        return ChannelAudit(self, next(self._numbers))


class ChannelAudit:
    """One channel's start and end lines, and the bytes it carried each way."""

    def __init__(self, connection: ConnectionAudit, number: int) -> None:
        self.connection = connection
        self.number = number
        self.started: float | None = None
        self.bytes_in = 0  # from the client
        self.bytes_out = 0  # to the client

    @property
    def label(self) -> str:
        return f"SSH session {self.number} from {self.connection.peer}"

    def start(self, what: str) -> None:
        """`what`: "shell, pty 80x24 xterm", 'exec "ls"', "sftp", "forward to h:p"."""
        self.started = time.time()
        self.connection.emit(
            f"SSH session {self.number} from {self.connection.origin} at {utc(self.started)}: "
            f"{what}"
        )

    def refused(self, what: str, why: str) -> None:
        self.connection.emit(f"{self.label}: {what} refused: {why}")

    def note(self, text: str) -> None:
        self.connection.emit(f"{self.label}: {text}")

    def end(self, outcome: str) -> None:
        """Once, after `start`: how long, how it ended, the bytes each way."""
        if self.started is None:
            return
        took, self.started = time.time() - self.started, None
        self.connection.emit(
            f"{self.label} ended after {duration(took)}: {outcome}, "
            f"{size(self.bytes_in)} in, {size(self.bytes_out)} out"
        )
