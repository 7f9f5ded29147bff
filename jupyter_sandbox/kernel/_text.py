"""Plain-text renderings: tables, SSH summaries and transfer progress.

Used in terminal IPython, under nbgrader, and as the text/plain fallback of the
widget. Anything that can be saved into a notebook shows the SSH token masked.
"""

from __future__ import annotations

import sys
import time
from datetime import datetime, timezone

from .._durations import format_duration
from .._durations import format_size as size
from .._models import KEEP_HOMES, SandboxInfo, SshAccess

PROGRESS_THRESHOLD = 4 * 1024 * 1024  # transfers smaller than this show no bar


def clock(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def lifetime(info: SandboxInfo) -> str:
    """How long a sandbox lives, as of now."""
    if info.expires_at is None:
        return "session (ends with its kernel)"
    return f"{format_duration(info.time_left or 0)} left (until {clock(info.expires_at)})"


def state(info: SandboxInfo) -> str:
    """Its lifetime while it runs; why it failed (and how long its files stay) or ended."""
    if info.status == "running":
        return lifetime(info)
    if info.status == "failed" and info.files_kept:
        return f"{info.failure}; files kept, {lifetime(info)}"
    if info.status == "failed":
        return f"{info.failure}; files not kept (a restart starts with an empty home)"
    return info.end_reason or ""


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]
    )


def info_text(local_name: str, info: SandboxInfo) -> str:
    limits = ", ".join(f"{k}={'unlimited' if v is None else v}" for k, v in info.limits.items())
    lines = [
        f"sandbox {local_name!r} ({info.id}, service name {info.name!r}): {info.status}",
        f"  lifetime: {lifetime(info)}"
        if info.status in ("running", "failed")
        else f"  ended:    {info.end_reason or info.status}",
        f"  network:  {info.network}",
        f"  limits:   {limits}",
    ]
    if info.status == "failed":
        kept = (
            "its files are kept: `%sandbox download`, "
            f"`%sandbox restart {local_name}` or `%sandbox kill {local_name}`"
            if info.files_kept
            else f"its files are not kept: `%sandbox restart {local_name}` starts it with an "
            f"empty home, or `%sandbox kill {local_name}`; {KEEP_HOMES}"
        )
        lines.insert(1, f"  failed:   {info.failure} (at {clock(info.failed_at or 0)}); {kept}")
    if info.limits_note:
        lines.append(f"  note:     {info.limits_note}")
    usage = info.usage or {}
    if usage.get("memory_bytes") is not None:
        lines.append(
            f"  usage:    memory {size(usage['memory_bytes'])}, "
            f"{usage.get('pids', '?')} processes, "
            f"cpu {usage.get('cpu_seconds') or 0:.2f} s"
        )
    lines.append(f"  owner:    {info.owner}")
    return "\n".join(lines)


def ssh_text(
    local_name: str,
    info: SandboxInfo,
    access: SshAccess,
    *,
    reveal: bool = False,
    ssh_status: str = "active",
) -> str:
    """What the SSH widget shows, as text. The token appears only with `reveal`."""
    lines = [
        f"SSH into sandbox {local_name!r} ({info.id}): {info.status}, credential {ssh_status}",
        *_access_lines(access, reveal),
        f"  sandbox:  {lifetime(info)}",
        *_recorded(info),
    ]
    if not reveal:
        lines.append(_hidden_note(local_name))
    return "\n".join(lines)


def ssh_record(local_name: str, info: SandboxInfo, access: SshAccess, shown_at: float) -> str:
    """The widget's text forms, which a saved notebook keeps: what it showed and when,
    not a state that would be stale when the notebook is opened again."""
    return "\n".join(
        [
            f"SSH into sandbox {local_name!r} ({info.id}), shown at {clock(shown_at)}",
            *_access_lines(access, reveal=False),
            *_recorded(info),
            _hidden_note(local_name),
        ]
    )


def _access_lines(access: SshAccess, reveal: bool) -> list[str]:
    if access.expires_at is None:
        valid = "until revoked or the sandbox ends"
    else:
        valid = f"until {clock(access.expires_at)} (or revoked, or the sandbox ends)"
    return [
        f"  command:  {access.command if reveal else access.masked_command}",
        f"  host key: {access.host_key_fingerprint}",
        f"  valid:    {valid}",
    ]


def _recorded(info: SandboxInfo) -> list[str]:
    return ["  note:     terminal sessions are recorded"] if info.recording else []


def _hidden_note(local_name: str) -> str:
    return (
        "  (the token is hidden in saved output: copy the command with the live widget's "
        f"Copy button, or run `%sandbox_ssh {local_name}` for a new one)"
    )


class TransferProgress:
    """A progress bar for an upload or download, redrawn from the main thread.

    ``update`` may be called from any thread; ``draw`` shows the bar once the
    transfer is big enough, as a display that updates in place (kernel) or a
    carriage-return line (terminal).
    """

    def __init__(self, label: str, in_kernel: bool) -> None:
        self.label = label
        self.in_kernel = in_kernel
        self.done = 0
        self.total: int | None = None
        self.started = time.monotonic()
        self._handle = None

    def update(self, done: int, total: int | None) -> None:
        self.done, self.total = done, total

    def _repr_mimebundle_(self, **kwargs: object) -> dict[str, str]:
        if self.total:
            bar = f'<progress value="{self.done}" max="{self.total}"></progress>'
        else:
            bar = "<progress></progress>"
        return {"text/plain": self.text(), "text/html": f"{bar} <code>{self.text()}</code>"}

    def text(self) -> str:
        rate = self.done / max(time.monotonic() - self.started, 1e-6)
        if self.total:
            # A directory travels as a tar stream, a little larger than its files.
            done = min(self.done, self.total)
            filled = int(30 * done / self.total)
            return (
                f"{self.label} [{'#' * filled}{'.' * (30 - filled)}] "
                f"{100 * done // self.total:3d}%  {size(done)} / "
                f"{size(self.total)}  {size(rate)}/s"
            )
        return f"{self.label} {size(self.done)}  {size(rate)}/s"

    def draw(self) -> None:
        if max(self.done, self.total or 0) < PROGRESS_THRESHOLD:
            return
        if not self.in_kernel:
            sys.stderr.write(f"\r{self.text()}")
            sys.stderr.flush()
            return
        from IPython.display import display

        if self._handle is None:
            self._handle = display(self, display_id=True)
        else:
            self._handle.update(self)

    def finish(self) -> None:
        """Draw the final state and end the terminal line."""
        self.draw()
        if not self.in_kernel and self.done >= PROGRESS_THRESHOLD:
            sys.stderr.write("\n")
