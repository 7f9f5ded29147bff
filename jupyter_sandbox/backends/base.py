"""What the service needs of a backend: the place where sandboxes run.

The manager, the state, the API and the SSH access code use a backend through
these two protocols only, so a sandbox can run as a bubblewrap container on
this host (``local``) or as a pod of a cluster (``kubernetes``) with nothing
above the backend changing.

Methods are called on the service's event loop unless their docstring says
otherwise; the synchronous ones must not block it (no network round trip, no
waiting on a process): they answer from what the backend already knows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from .cgroups import Limits

if TYPE_CHECKING:  # agent.remote may import backends modules (TLS credentials)
    from ..agent.remote import AgentClient

__all__ = ["Backend", "Limits", "Records", "Runtime", "SandboxSpec"]


@dataclass
class SandboxSpec:
    """What to start: the sandbox's id, network ("none" or "host"), limits, and
    whether its syscall filter is on (off only by explicit configuration)."""

    id: str
    network: str = "none"
    limits: Limits = field(default_factory=Limits)
    syscall_filter: bool = True


class Runtime(Protocol):
    """What the backend keeps to find, use and stop one started sandbox.

    The manager stores `to_json()` in the sandbox's record and gives the text back
    to `Backend.runtime` after a restart; it reads the attributes below and nothing
    else of it.
    """

    #: A directory of the service's, on its own host, for this sandbox only: the audit
    #: log and terminal recordings go there. It exists from `start` until `stop`.
    directory: str
    #: True for an agent started with ``files_only``: file operations and logs only.
    files_only: bool
    #: What of the sandbox's limits does not hold, and why; None when all of them do.
    #: `Backend.set_limits` updates it.
    limits_note: str | None
    #: What the sandbox's info says about its syscall filter (e.g. "seccomp: ...").
    syscall_filter: str
    #: Do its files outlive a failure (its processes killed, out of memory, its pod gone)
    #: until its deadline or a kill? The local backend: always; kubernetes: only with a
    #: PersistentVolumeClaim home (JUPYTER_SANDBOX_K8S_HOME=pvc), as an emptyDir home
    #: goes with its pod. The service tells users so when the sandbox fails.
    files_survive_failure: bool

    def to_json(self) -> str:
        """The runtime as JSON text, read back by `Backend.runtime`."""
        ...


class Records(Protocol):
    """Where each sandbox's own record lives (the state writes and reads them here)."""

    def write_record(self, sandbox_id: str, data: bytes) -> None:
        """Replace the sandbox's own record with `data`, atomically.

        Called ON THE EVENT LOOP, synchronously, by every `State.save` whose record
        changed: it must not wait on the network. The local backend writes a file and
        raises OSError when it cannot (the caller tells the user what was not kept). A
        backend whose records are remote queues the write and returns at once: it keeps
        only the latest data of each sandbox, writes them in the background in order,
        retries failures and logs them. Does nothing for a sandbox being stopped.
        """
        ...

    def read_records(self) -> dict[str, bytes]:
        """Every record of this service's sandboxes, by sandbox id; an unreadable one is
        left out and logged. Called once, after `prepare`, in a thread of its own while
        the event loop runs (``asyncio.to_thread``): it may block."""
        ...


class Backend(Records, Protocol):
    """Starts, finds and stops sandboxes, and keeps each sandbox's own record."""

    #: The service's storage directory on its own host: disk-full errors name it and
    #: requested disk limits are checked against its filesystem.
    storage: Path
    #: Why sandboxes cannot start here, in words (what to do included); None when they
    #: can. Set by `prepare`; the warm pool stays empty while it is set.
    unavailable: str | None

    # -- setup -------------------------------------------------------------------------

    async def prepare(self, data_dir: Path | None, uid_base: int) -> None:
        """Get ready to serve, once, before anything else is called.

        Claims what is this service's alone (the local backend: its storage and a range
        of host uids from `uid_base`; another service holding it raises StorageInUse),
        installs what sandboxes need and sets `unavailable`. `data_dir` is the
        service's data directory, which names the service claiming the storage.
        """
        ...

    async def close(self) -> None:
        """Let go of connections and background tasks at service shutdown. Sandboxes keep
        running: the next service re-adopts them."""
        ...

    def limits_status(self) -> str:
        """What enforces limits here, for the service status: e.g. "v1" (cgroup v1),
        or why nothing does."""
        ...

    # -- lifecycle ---------------------------------------------------------------------

    async def start(
        self, spec: SandboxSpec, *, resume: bool = False, files_only: bool = False
    ) -> Runtime:
        """Start a sandbox and return once its agent answers.

        With `resume`, start it again over the files (home, directory) it had, after
        `halt`; with `files_only` its agent serves file operations and logs only, so the
        files of a failed sandbox stay reachable. Anything this backend needs of its
        own per sandbox (the local backend: a host uid of its range) it picks here and
        gives up in `stop`. A start that fails undoes itself (a new sandbox leaves
        nothing; a resumed one keeps its files) and raises: IsolationUnavailable,
        DiskFull, or another SandboxError saying what happened and what to do.
        """
        ...

    async def halt(self, runtime: Runtime) -> None:
        """Stop every process of the sandbox; its files, record and directory stay."""
        ...

    async def stop(self, runtime: Runtime) -> None:
        """Stop the sandbox and delete everything of it: processes, files, its record
        and its `directory`. No record is written for it once this has begun."""
        ...

    def serving(self, runtime: Runtime) -> bool:
        """Is the sandbox's agent still the one started, and reachable? Cheap, no request
        to the agent (called before handing out a pooled sandbox)."""
        ...

    async def failure(
        self,
        runtime: Runtime,
        memory: int | None = None,
        service_was_down: bool = False,
        agent_lost: bool = False,
    ) -> str | None:
        """Why the sandbox can no longer serve, in words for its user; None while it can.

        Called for every running sandbox every few seconds: no request to the agent.
        `memory` is its memory limit in bytes, to name when it ran out of memory;
        `service_was_down` says the end happened while no service ran; `agent_lost` says
        a request found the agent unreachable just now: a backend whose view of the
        sandbox lags waits a bounded moment for it rather than answer None too early.
        """
        ...

    def usage(self, runtime: Runtime) -> dict | None:
        """User code's use now: ``{"memory_bytes", "cpu_seconds", "pids", "time"}``
        (each value may be None where unknown; time: ``time.time()``), or None when this
        backend cannot tell (`runtime.limits_note` then says why)."""
        ...

    def set_limits(self, runtime: Runtime, limits: Limits) -> bool:
        """Give a pooled sandbox `limits` (same memory, fds and disk, other cpus/pids);
        False, changing nothing, when it cannot take them: the manager then puts it back
        in the pool and starts a fresh sandbox for these limits."""
        ...

    def agent(self, runtime: Runtime) -> AgentClient:
        """A client for the sandbox's agent (one per start: the manager keeps it)."""
        ...

    # -- after a restart ---------------------------------------------------------------

    def runtime(self, sandbox_id: str, text: str) -> Runtime:
        """The runtime `to_json` wrote for `sandbox_id`; ValueError unless it is a valid
        runtime of this backend's, for that sandbox."""
        ...

    def stand_in(self, sandbox_id: str) -> Runtime | None:
        """A runtime for a sandbox whose recorded one is lost, good enough to `halt`,
        `stop` or `start(resume=True)` it; None unless the sandbox is this service's."""
        ...

    def exists(self, sandbox_id: str) -> bool:
        """Does the sandbox still have its files and record?"""
        ...

    async def sweep_orphans(self, known: set[str]) -> list[str]:
        """Stop and remove this service's sandboxes that have no record and that `known`
        does not name (a start killed before its record was written); their ids.

        Never touches a sandbox with a record, nor anything not provably this service's.
        Failures are logged and retried at a later start, never raised.
        """
        ...

    def unadopted(self, known: set[str]) -> list[str]:
        """Ids of this service's sandboxes that have a record `known` does not name (it
        could not be read): the manager adopts them as failed, never sweeps them."""
        ...

    def keep_record_aside(self, sandbox_id: str) -> str:
        """Move a sandbox's unreadable record out of the way (kept, not deleted), so a new
        one can be written; where it now is, in words. Raises OSError when it cannot."""
        ...
