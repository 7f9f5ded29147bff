"""Why a sandbox stopped serving, in words a person understands.

The evidence is what the host still knows once the sandbox's agent is gone: the
exit status of its bwrap (known when this service started it), the OOM counters
of its cgroups, whether its init is still there, and whether the host restarted
since it started. The first piece of evidence that explains the end wins.
"""

from __future__ import annotations

import signal

from ..agent import protocol
from .cgroups import AGENT

MiB = 1 << 20


def out_of_memory(kills: list[tuple[str, int | None]], memory: int | None, split: bool) -> str:
    """The OOM kill that ended a sandbox whose memory limit is `memory`.

    `kills` are (group, limit) pairs from ``Group.out_of_memory``; kills in the user's
    own group (cgroup v1, `split`) end user processes only, never the agent, so they
    are not given. The agent's group first, then the sandbox's.
    """
    where, limit = min(kills, key=lambda kill: kill[0] != AGENT)
    if limit is None:
        return "out of memory: the host ran out (the sandbox has no memory limit of its own)"
    if where == AGENT:
        return f"out of memory: limit {_mib(limit)} (the sandbox's agent)"
    if split and memory and limit > memory:
        reserve = _mib(limit - memory)
        return f"out of memory: limit {_mib(memory)} (and {reserve} for the sandbox's agent)"
    return f"out of memory: limit {_mib(limit)}"


def bwrap_exit(returncode: int, init_alive: bool) -> str:
    """An end told by its bwrap's exit status, which is its agent's (128+N for signal N).

    The agent's death leaves the sandbox's init waiting on the user's processes; the
    init's death takes the agent with it.
    """
    if returncode == protocol.EXIT_USER_INIT_LOST:
        return "its init process ended, which stops every process in it"
    if returncode < 0:  # bwrap itself was killed
        returncode = 128 - returncode
    if returncode > 128 and returncode - 128 in signal.valid_signals():
        number = returncode - 128
        killed = f"killed by signal {number} ({signal.Signals(number).name})"
        if init_alive:
            return f"its agent was {killed}"
        return f"its init process was {killed}, which stops every process in it"
    return f"its agent exited with code {returncode}"


def gone(init_alive: bool, rebooted: bool, service_was_down: bool) -> str:
    """An end with no exit status or OOM kill to explain it."""
    when = " while no service ran" if service_was_down else ""
    if rebooted:
        return f"the host restarted{when}, which ended its processes"
    if not init_alive:
        return f"its processes ended{when}"
    return f"its agent stopped{when} (its socket refuses connections)"


def _mib(size: int) -> str:
    return f"{size / MiB:.0f} MiB" if size % MiB == 0 or size > 10 * MiB else f"{size} bytes"
