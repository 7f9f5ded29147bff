"""How a child process ended, in words for a log line."""

from __future__ import annotations

import contextlib
import signal


def describe_exit(returncode: int) -> str:
    """``"was killed by SIGKILL"`` or ``"exited with code 1"`` for a Popen returncode."""
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-returncode).name}"
        return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"
