"""CPU, memory and pid limits and usage through cgroups (v2 delegation or v1 as root).

bubblewrap has no cgroup support of its own: the backend creates a group per
sandbox, opens its ``cgroup.procs`` files before starting bwrap, and the child
moves itself in (writing "0") just before exec, so every sandbox process is
accounted from the first instruction.

On cgroup v1 a sandbox's group has two children. ``user`` holds user code and
gets the limits the user asked for; ``agent`` holds bwrap and the agent. The
parent holds the user's memory and pids plus a reserve for the agent (for
memory: its own, and the sandbox's tmpfs sizes, which files the agent writes
there for the owner are charged to), and the user's CPU quota (which the two
share at equal weights). So user code filling its memory (with a memfd, say,
which is in no process's RSS) or its pids never makes the OOM killer pick the
agent, nor leaves the agent without threads. The agent's spawner thread moves
itself alone into ``user`` (v1 groups threads separately) through descriptors of
its ``tasks`` files, once it forked the user init (which stays in ``agent``, out
of reach of an OOM in ``user``) and before it forks user code; the agent's memory
stays charged to ``agent``, its main thread's group.
cgroup v2 cannot split a process's threads for memory: there the agent shares
the user's limits.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
PARENT = "jupyter-sandbox"
CPU_PERIOD_US = 100_000


MiB = 1 << 20
DEFAULT_MEMORY = 1 << 30  # also the basis of tmpfs sizes when no memory limit is given
# Shares of the memory limit for each tmpfs a sandbox can write (its RAM is charged to
# the sandbox): together well under the limit, so that filling them all fails with
# ENOSPC and leaves room for the agent and the user's processes.
TMPFS_SHARES = {"/tmp": 3 / 8, "/var/tmp": 1 / 16, "/dev/shm": 1 / 8, "/run": 1 / 32}
TMPFS_MAX = {"/run": 16 * MiB}
AGENT, USER = "agent", "user"  # a v1 group's children
AGENT_MEMORY = 96 * MiB  # what the agent's processes may use besides the user's memory
AGENT_PIDS = 256  # and on top of the user's pid limit


@dataclass
class Limits:
    """What a sandbox may use: bytes of memory, CPUs, processes, open files per process,
    bytes of disk for its home (the last two are not cgroup limits)."""

    memory: int | None = None
    cpus: float | None = None
    pids: int | None = None
    fds: int | None = None
    disk: int | None = None

    def tmpfs_sizes(self) -> dict[str, int]:
        """Bytes for each writable tmpfs, in mount order (/dev/shm after /dev)."""
        basis = self.memory or DEFAULT_MEMORY
        return {
            path: min(int(basis * share), TMPFS_MAX.get(path, basis))
            for path, share in TMPFS_SHARES.items()
        }

    def as_dict(self) -> dict:
        return {
            "memory": self.memory,
            "cpus": self.cpus,
            "pids": self.pids,
            "fds": self.fds,
            "disk": self.disk,
            "tmpfs": self.tmpfs_sizes(),
        }


@dataclass
class Group:
    """The cgroup directories of one sandbox, one per controller hierarchy."""

    version: int
    paths: dict[str, str] = field(default_factory=dict)

    @property
    def split(self) -> bool:
        """Whether the agent and user code have groups of their own (cgroup v1)."""
        return self.version == 1

    def _dirs(self, child: str = "") -> list[str]:
        """Each hierarchy's directory of the sandbox, or of its `child` when split."""
        child = child if self.split else ""
        return [os.path.join(p, child) for p in dict.fromkeys(self.paths.values())]

    def open_procs(self) -> list[int]:
        """File descriptors a child writes "0" to, to join every hierarchy (the agent's)."""
        return [_open_write(os.path.join(p, "cgroup.procs")) for p in self._dirs(AGENT)]

    def open_user_tasks(self) -> list[int]:
        """Descriptors a thread writes "0" to, to move itself alone into the user's group;
        none when not split."""
        return (
            [_open_write(os.path.join(p, "tasks")) for p in self._dirs(USER)] if self.split else []
        )

    def apply(self, limits: Limits) -> None:
        settings = [("", name, value) for name, value in self._settings(limits)]
        if self.split:  # the user's limits on its group, with the agent's reserve around both
            # The agent's own memory, and the tmpfs files it may write for the owner
            # (charged to it, like an upload into /tmp), on top of the user's.
            agent_memory = AGENT_MEMORY + sum(limits.tmpfs_sizes().values())
            reserve = Limits(
                memory=limits.memory and limits.memory + agent_memory,
                cpus=limits.cpus,
                pids=limits.pids and limits.pids + AGENT_PIDS,
            )
            parent = [("", name, value) for name, value in self._settings(reserve)]
            settings = parent + [(USER, name, value) for _, name, value in settings]
        # cgroup v1 refuses a CPU quota below a child's or above the parent's (EINVAL), so
        # lowering one must go child first, raising parent first: a setting refused in
        # the first pass is written again after the others.
        refused = []
        for setting in settings:
            try:
                self._write(*setting)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                refused.append(setting)
        for setting in refused:
            self._write(*setting)

    def _write(self, child: str, name: str, value: str) -> None:
        controller, _, _ = name.partition(".")
        path = self.paths.get("unified" if self.version == 2 else controller)
        if path is not None:
            Path(path, child, name).write_text(value)

    def _settings(self, limits: Limits) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        if self.version == 2:
            if limits.memory:
                out += [("memory.max", str(limits.memory)), ("memory.swap.max", "0")]
            if limits.cpus:
                out.append(("cpu.max", f"{int(limits.cpus * CPU_PERIOD_US)} {CPU_PERIOD_US}"))
            if limits.pids:
                out.append(("pids.max", str(limits.pids)))
            return out
        if limits.memory:
            out.append(("memory.limit_in_bytes", str(limits.memory)))
            if os.path.exists(os.path.join(self.paths["memory"], "memory.memsw.limit_in_bytes")):
                out.append(("memory.memsw.limit_in_bytes", str(limits.memory)))
        if limits.cpus:
            out += [
                ("cpu.cfs_period_us", str(CPU_PERIOD_US)),
                ("cpu.cfs_quota_us", str(int(limits.cpus * CPU_PERIOD_US))),
            ]
        if limits.pids:
            out.append(("pids.max", str(limits.pids)))
        return out

    def usage(self) -> dict:
        """User code's memory in bytes, CPU time in seconds and process count, where
        readable."""

        def read(controller: str, name: str) -> str | None:
            path = self.paths.get("unified" if self.version == 2 else controller)
            try:
                return Path(path, USER if self.split else "", name).read_text() if path else None
            except OSError:
                return None

        if self.version == 2:
            memory, pids = read("memory", "memory.current"), read("pids", "pids.current")
            cpu_stat = read("cpu", "cpu.stat") or ""
            usec = next(
                (
                    int(line.split()[1])
                    for line in cpu_stat.splitlines()
                    if line.startswith("usage_usec")
                ),
                None,
            )
            cpu = usec / 1e6 if usec is not None else None
        else:
            memory, pids = read("memory", "memory.usage_in_bytes"), read("pids", "pids.current")
            nanos = read("cpuacct", "cpuacct.usage")
            cpu = int(nanos) / 1e9 if nanos else None
        return {
            "memory_bytes": int(memory) if memory else None,
            "cpu_seconds": cpu,
            "pids": int(pids) if pids else None,
            "time": time.time(),
        }

    def out_of_memory(self) -> list[tuple[str, int | None]]:
        """Where the OOM killer struck: (child group, or "" for the sandbox's, limit in bytes).

        Read before `remove`: the counters go with the groups. cgroup v1 counts kills
        in ``memory.oom_control`` (``oom_kill N``; kernels before 4.13 only have
        ``memory.failcnt``, the times the limit was hit), v2 in ``memory.events``.
        """
        base = self.paths.get("unified" if self.version == 2 else "memory")
        if base is None:
            return []
        found = []
        for child in ("", AGENT, USER) if self.split else ("",):
            if self.version == 2:
                counters = _counters(Path(base, "memory.events"))
                killed = counters.get("oom_kill", 0)
                limit = _read_int(Path(base, "memory.max"))
            else:
                counters = _counters(Path(base, child, "memory.oom_control"))
                killed = counters.get("oom_kill")
                if killed is None:
                    killed = _read_int(Path(base, child, "memory.failcnt")) or 0
                limit = _read_int(Path(base, child, "memory.limit_in_bytes"))
            if killed:
                found.append((child, limit))
        return found

    def remove(self) -> None:
        """Remove the directories once their processes are gone (retrying briefly)."""
        children = [*self._dirs(USER), *self._dirs(AGENT)] if self.split else []
        for path in [*children, *dict.fromkeys(self.paths.values())]:
            for _ in range(100):
                try:
                    os.rmdir(path)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.01)


class Controller:
    """Finds where this process may create cgroups, or why it may not."""

    V1_CONTROLLERS = ("memory", "cpu", "cpuacct", "pids")

    def __init__(self) -> None:
        self.version, self.bases, self.unavailable = self._detect()

    def _detect(self) -> tuple[int, dict[str, Path], str | None]:
        own = _own_cgroups()
        if (ROOT / "cgroup.controllers").exists():
            base = ROOT / own.get("", "/").lstrip("/")
            enabled = (
                (base / "cgroup.subtree_control").read_text().split()
                if (base / "cgroup.subtree_control").exists()
                else []
            )
            if os.access(base, os.W_OK) and {"memory", "pids"} <= set(enabled):
                return 2, {"unified": base / PARENT}, None
            return (
                2,
                {},
                (
                    f"cgroup v2 at {base} is not delegated to this user with the memory "
                    "and pids controllers enabled"
                ),
            )
        bases = {}
        for name in self.V1_CONTROLLERS:
            mount = ROOT / name
            if not mount.is_dir():
                return 1, {}, f"cgroup v1 controller {name!r} is not mounted"
            base = mount / own.get(name, "/").lstrip("/")
            if not os.access(base, os.W_OK):
                return (
                    1,
                    {},
                    (
                        "cgroup v1 hierarchies are writable only by root; run the service "
                        "as root or on a host with cgroup v2 delegation"
                    ),
                )
            bases[name] = base / PARENT
        return 1, bases, None

    def create(self, sandbox_id: str) -> Group | None:
        """A fresh group for a sandbox, or None where cgroups cannot be used."""
        if self.unavailable:
            return None
        group = Group(self.version)
        try:
            for name, base in self.bases.items():
                base.mkdir(exist_ok=True)
                if self.version == 2:
                    with contextlib.suppress(OSError):
                        (base / "cgroup.subtree_control").write_text("+memory +pids +cpu")
                path = base / sandbox_id
                path.mkdir(exist_ok=True)
                group.paths[name] = str(path)
                if group.split:
                    for child in (AGENT, USER):
                        (path / child).mkdir(exist_ok=True)
        except OSError as e:
            group.remove()
            self.unavailable = f"cannot create cgroups: {e}"
            return None
        return group


def _counters(path: Path) -> dict[str, int]:
    """``name value`` lines of a cgroup file; empty when it cannot be read."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    return {k: int(v) for k, _, v in (line.partition(" ") for line in lines) if v.isdigit()}


def _read_int(path: Path) -> int | None:
    """A number in a cgroup file; None for "max", an unreadable file or an unlimited v1 limit."""
    try:
        value = int(path.read_text())
    except (OSError, ValueError):
        return None
    return value if value < 1 << 62 else None


def _open_write(path: str) -> int:
    return os.open(path, os.O_WRONLY | os.O_CLOEXEC)


def _own_cgroups() -> dict[str, str]:
    """This process's cgroup path per controller ("" for the v2 hierarchy)."""
    out: dict[str, str] = {}
    with contextlib.suppress(OSError), open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for name in controllers.split(",") if controllers else [""]:
                out[name] = path
    return out
