"""The limits a sandbox may ask for: parsed, and bounded by what this host can ever give.

A limit the host cannot honour (more memory than its RAM, more CPUs than it has, a home
larger than the filesystem it lives on, more processes than the kernel can hold, more
open files than the service may have) is refused with the host's figure, whatever the
mode and whatever a quota would allow.
"""

from __future__ import annotations

import math
import os
import resource
from pathlib import Path
from typing import Any

from .._config import host_cpus, host_memory, host_pids
from .._durations import format_size_down, parse_size, shown
from .._errors import InvalidRequest
from ..backends.cgroups import Limits

MIN_MEMORY = 64 << 20  # the agent, a shell and the tmpfs shares need about this much
MIN_DISK = 16 << 20
MIN_PIDS, MAX_PIDS = 8, 1 << 22  # MAX_PIDS: the kernel's own ceiling for pid_max
MIN_FDS = 64


def _too_much(name: str, asked: str, host: str, most: str) -> InvalidRequest:
    return InvalidRequest(f"{name} {asked} is more than {host}; ask for at most {most}")


def memory(value: Any) -> int | None:
    """Bytes of memory: at least MIN_MEMORY, at most the host's RAM."""
    size = parse_size(value)
    if size is None:
        return None
    if size < MIN_MEMORY:
        raise InvalidRequest(f"invalid memory {shown(value)}: a sandbox needs at least 64M")
    ram = host_memory()
    if size > ram:
        raise _too_much(
            "memory",
            format_size_down(size),
            f"this host's {format_size_down(ram)} of RAM",
            format_size_down(ram),
        )
    return size


def cpus(value: Any) -> float | None:
    """CPUs: at least 0.01, at most the host's CPU count."""
    if value is None:
        return None
    try:
        count = float(value)
    except (TypeError, ValueError, OverflowError):
        count = math.nan
    host = host_cpus()
    if isinstance(value, bool) or not count >= 0.01:  # also NaN
        raise InvalidRequest(
            f"invalid cpus {shown(value)}: expected a number from 0.01 to this host's "
            f"{host} CPUs, such as 0.5 or 2"
        )
    if count > host:
        asked = f"{count:g}" if count < 1e9 else shown(value)
        raise _too_much("cpus", asked, f"this host's {host} CPUs", str(host))
    return count


def _whole(name: str, value: Any, low: int, most: int, host: str) -> int | None:
    """`value` as a whole number from `low` to `most`, the figure `host` describes."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidRequest(
            f"invalid {name} {shown(value)}: expected a whole number from {low} up"
        )
    if value > most:
        raise _too_much(name, shown(value), host, str(most))
    return value


def pids(value: Any) -> int | None:
    """Processes and threads: at least MIN_PIDS, at most what the kernel can hold at all."""
    most = max_pids()
    host = f"the {most} processes and threads this host's kernel can hold at once"
    return _whole("pids", value, MIN_PIDS, most, host)


def max_pids() -> int:
    return max(MIN_PIDS, min(MAX_PIDS, host_pids()))


def fds(value: Any) -> int | None:
    """Open files per process: bwrap's child cannot raise them past the service's own."""
    most = max_fds()
    host = f"the {most} open files a process of this service may have (RLIMIT_NOFILE)"
    return _whole("fds", value, MIN_FDS, most, host)


def max_fds() -> int:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return 1 << 20 if hard == resource.RLIM_INFINITY else min(hard, 1 << 20)


def disk(value: Any, storage: Path) -> int | None:
    """Bytes for a home: at least MIN_DISK, at most the filesystem that holds it."""
    size = parse_size(value)
    if size is None:
        return None
    if size < MIN_DISK:
        raise InvalidRequest(f"invalid disk {shown(value)}: a home needs at least 16M")
    most = disk_size(storage)
    if size > most:
        host = f"the {format_size_down(most)} the filesystem of {storage} can ever hold"
        raise _too_much("disk", format_size_down(size), host, format_size_down(most))
    return size


def disk_size(storage: Path) -> int:
    """Bytes of the filesystem sandboxes' homes live on, used and free."""
    stats = os.statvfs(storage)
    return stats.f_blocks * stats.f_frsize


def requested(defaults: Limits, storage: Path, **asked: Any) -> Limits:
    """The limits of a new sandbox: those `asked` for, checked, else the `defaults`."""
    return Limits(
        memory=memory(asked.get("memory")) or defaults.memory,
        cpus=cpus(asked.get("cpus")) or defaults.cpus,
        pids=pids(asked.get("pids")) or defaults.pids,
        fds=fds(asked.get("fds")) or defaults.fds,
        disk=disk(asked.get("disk"), storage) or defaults.disk,
    )
